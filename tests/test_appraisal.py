"""Appraisal: one AR4SI claim per check, the status is the worst tier, and every failure says why.

`appraise` is pure, so these tests build evidence, policy and registry records directly; the
signature and freshness checks that come before it are tested with the service and the store.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from provisioning.registry import DeviceRecord
from strongroom.ear import VECTOR_KEYS
from strongroom.evidence import ArtifactClaim, Evidence
from strongroom.image import EnclaveIdentity
from strongroom.policy import ArtifactReference, EnclaveReference, FleetPolicy
from strongroom.report import key_binding
from strongroom.signing import SigningKey
from verifier.appraisal import appraise

SIGNER = "5a" * 32
OTHER_SIGNER = "6b" * 32
MRENCLAVE = "c1" * 32
OTHER_MRENCLAVE = "d2" * 32
MODEL_DIGEST = "e3" * 32
VENDOR_DIGEST = "f4" * 32
ENCLAVE_KEY = bytes(range(32))
NONCE = bytes(range(100, 132))

POLICY = FleetPolicy(
    min_firmware="1.4.0",
    allowed_signers=(SIGNER,),
    min_svn=2,
    enclave_references=(EnclaveReference(MRENCLAVE, svn=3),),
    artifact_floors={"model": 2},
    artifact_references=(
        ArtifactReference("model", 2, MODEL_DIGEST, "model"),
        ArtifactReference("vendor", 1, VENDOR_DIGEST, "code"),
    ),
)
DEVICE = DeviceRecord(
    device_id="dev-a",
    attestation_key=SigningKey(bytes(32)).verify_key,
    tls_cert_sha256="ab" * 32,
    firmware="1.4.0",
    debug=False,
    secure_boot=True,
)
GOOD = Evidence(
    device_id="dev-a",
    nonce=NONCE,
    ueid=b"\x01" + bytes(32),
    iat=1_700_000_000,
    seq=7,
    platform_debug=False,
    firmware="1.4.2",
    secure_boot=True,
    smt=False,
    enclave=EnclaveIdentity(MRENCLAVE, SIGNER, product_id=1, svn=3, debug=False),
    artifacts=(
        ArtifactClaim("model", 2, MODEL_DIGEST),
        ArtifactClaim("vendor", 1, VENDOR_DIGEST),
    ),
    local_attestation="passed",
    enclave_key=ENCLAVE_KEY,
    key_binding=key_binding(ENCLAVE_KEY, NONCE),
)


def with_enclave(**changes: Any) -> Evidence:
    return replace(GOOD, enclave=replace(GOOD.enclave, **changes))


def with_artifact(name: str, version: int, sha256: str) -> Evidence:
    others = tuple(a for a in GOOD.artifacts if a.name != name)
    return replace(GOOD, artifacts=(*others, ArtifactClaim(name, version, sha256)))


def expected_vector(**claims: int) -> dict[str, int]:
    vector = dict.fromkeys(VECTOR_KEYS, 2)
    vector["file-system"] = vector["sourced-data"] = 0
    for key, value in claims.items():
        vector[key.replace("_", "-")] = value
    return vector


def test_good_evidence_is_affirming_on_every_claim_it_makes_with_no_reasons() -> None:
    result = appraise(GOOD, POLICY, DEVICE)
    assert result.status == "affirming"
    assert result.vector == {
        "instance-identity": 2,
        "configuration": 2,
        "executables": 2,
        "file-system": 0,
        "hardware": 2,
        "runtime-opaque": 2,
        "storage-opaque": 2,
        "sourced-data": 0,
    }
    assert result.reasons == ()


CONTRAINDICATIONS = [
    pytest.param(
        replace(GOOD, firmware="1.3.9"),
        POLICY,
        DEVICE,
        "hardware",
        "firmware 1.3.9 is below the fleet minimum 1.4.0",
        id="firmware-below-minimum",
    ),
    pytest.param(
        replace(GOOD, firmware="0.9.99"),
        POLICY,
        DEVICE,
        "hardware",
        "firmware 0.9.99 is below the fleet minimum 1.4.0",
        id="firmware-below-minimum-major",
    ),
    pytest.param(
        replace(GOOD, firmware="v1.4.2"),
        POLICY,
        DEVICE,
        "hardware",
        "firmware v1.4.2 is below the fleet minimum 1.4.0",
        id="firmware-unparsable",
    ),
    pytest.param(
        replace(GOOD, firmware="99"),
        replace(POLICY, min_firmware="0.0.0"),
        DEVICE,
        "hardware",
        "firmware 99 is below the fleet minimum 0.0.0",
        id="firmware-unparsable-below-even-a-zero-minimum",
    ),
    pytest.param(
        replace(GOOD, platform_debug=True),
        POLICY,
        DEVICE,
        "configuration",
        "platform is in debug mode",
        id="platform-debug",
    ),
    pytest.param(
        replace(GOOD, secure_boot=False),
        POLICY,
        DEVICE,
        "configuration",
        "secure boot is off",
        id="secure-boot-off",
    ),
    pytest.param(
        replace(GOOD, smt=True),
        replace(POLICY, smt="deny"),
        DEVICE,
        "configuration",
        "SMT is on or unknown and the policy denies it",
        id="smt-on-denied",
    ),
    pytest.param(
        replace(GOOD, smt=None),
        replace(POLICY, smt="deny"),
        DEVICE,
        "configuration",
        "SMT is on or unknown and the policy denies it",
        id="smt-unknown-denied",
    ),
    pytest.param(
        with_enclave(mrsigner=OTHER_SIGNER),
        POLICY,
        DEVICE,
        "executables",
        "enclave signer is not allowed by the policy",
        id="signer-not-allowed",
    ),
    pytest.param(
        with_enclave(mrenclave=OTHER_MRENCLAVE),
        POLICY,
        DEVICE,
        "executables",
        f"enclave measurement {OTHER_MRENCLAVE[:16]} (SVN 3) is not a reference value",
        id="measurement-unknown",
    ),
    pytest.param(
        with_enclave(svn=4),
        POLICY,
        DEVICE,
        "executables",
        f"enclave measurement {MRENCLAVE[:16]} (SVN 4) is not a reference value",
        id="right-measurement-wrong-svn",
    ),
    pytest.param(
        with_enclave(debug=True),
        replace(POLICY, allow_debug_images=True),
        DEVICE,
        "executables",
        f"enclave measurement {MRENCLAVE[:16]} (SVN 3) is not a reference value",
        id="right-measurement-wrong-debug-flag",
    ),
    pytest.param(
        with_enclave(svn=1),
        replace(POLICY, enclave_references=(EnclaveReference(MRENCLAVE, svn=1),)),
        DEVICE,
        "executables",
        "enclave SVN 1 is below the fleet minimum 2",
        id="svn-below-minimum",
    ),
    pytest.param(
        with_enclave(debug=True),
        replace(POLICY, enclave_references=(EnclaveReference(MRENCLAVE, svn=3, debug=True),)),
        DEVICE,
        "executables",
        "debug enclave image",
        id="debug-image-not-allowed",
    ),
    pytest.param(
        with_artifact("model", 1, MODEL_DIGEST),
        replace(
            POLICY,
            artifact_references=(
                *POLICY.artifact_references,
                ArtifactReference("model", 1, MODEL_DIGEST, "model"),
            ),
        ),
        DEVICE,
        "executables",
        "artifact model v1 is below the floor v2 (rollback)",
        id="artifact-below-floor",
    ),
    pytest.param(
        with_artifact("vendor", 1, "00" * 32),
        POLICY,
        DEVICE,
        "executables",
        "artifact vendor v1 does not match its reference digest",
        id="artifact-digest-mismatch",
    ),
    pytest.param(
        replace(GOOD, local_attestation="failed"),
        POLICY,
        DEVICE,
        "runtime-opaque",
        "enclave local attestation did not pass",
        id="local-attestation-failed",
    ),
    pytest.param(
        replace(GOOD, local_attestation=""),
        POLICY,
        DEVICE,
        "runtime-opaque",
        "enclave local attestation did not pass",
        id="local-attestation-missing",
    ),
    pytest.param(
        replace(GOOD, key_binding=key_binding(ENCLAVE_KEY, bytes(32))),
        POLICY,
        DEVICE,
        "runtime-opaque",
        "enclave key is not bound to the nonce",
        id="key-bound-to-another-nonce",
    ),
    pytest.param(
        replace(GOOD, key_binding=key_binding(bytes(32), NONCE)),
        POLICY,
        DEVICE,
        "runtime-opaque",
        "enclave key is not bound to the nonce",
        id="another-key-bound-to-the-nonce",
    ),
    pytest.param(
        replace(GOOD, key_binding=b""),
        POLICY,
        DEVICE,
        "runtime-opaque",
        "enclave key is not bound to the nonce",
        id="key-binding-missing",
    ),
    pytest.param(
        GOOD,
        POLICY,
        replace(DEVICE, status="revoked"),
        "instance-identity",
        "device is revoked",
        id="device-revoked",
    ),
]


@pytest.mark.parametrize(("ev", "policy", "device", "claim", "reason"), CONTRAINDICATIONS)
def test_each_failed_check_contraindicates_its_own_claim_and_says_why(
    ev: Evidence, policy: FleetPolicy, device: DeviceRecord, claim: str, reason: str
) -> None:
    result = appraise(ev, policy, device)
    assert result.status == "contraindicated"
    assert result.vector == expected_vector(**{claim: 96})
    assert result.reasons == (reason,)


def test_the_good_cases_of_the_table_are_affirming_under_the_same_policies() -> None:
    """Each contraindication above differs from an affirming appraisal only in what it names."""
    assert appraise(GOOD, replace(POLICY, smt="deny"), DEVICE).status == "affirming"
    svn1 = replace(POLICY, enclave_references=(EnclaveReference(MRENCLAVE, svn=1),), min_svn=1)
    assert appraise(with_enclave(svn=1), svn1, DEVICE).status == "affirming"
    assert appraise(GOOD, replace(POLICY, min_firmware="1.4.2"), DEVICE).status == "affirming"


def test_an_unknown_artifact_is_a_warning_not_a_contraindication() -> None:
    ev = replace(GOOD, artifacts=(*GOOD.artifacts, ArtifactClaim("extra", 1, "00" * 32)))
    result = appraise(ev, POLICY, DEVICE)
    assert result.status == "warning"
    assert result.vector == expected_vector(executables=33)
    assert result.reasons == ("artifact extra v1 is not known",)


def test_a_known_artifact_at_an_unknown_version_is_unrecognized() -> None:
    result = appraise(with_artifact("vendor", 2, VENDOR_DIGEST), POLICY, DEVICE)
    assert result.status == "warning"
    assert result.vector["executables"] == 33
    assert result.reasons == ("artifact vendor v2 is not known",)


def test_an_unknown_artifact_does_not_soften_a_contraindicated_executables_claim() -> None:
    ev = replace(
        with_enclave(mrsigner=OTHER_SIGNER),
        artifacts=(*GOOD.artifacts, ArtifactClaim("extra", 1, "00" * 32)),
    )
    result = appraise(ev, POLICY, DEVICE)
    assert result.status == "contraindicated"
    assert result.vector["executables"] == 96
    assert result.reasons == (
        "enclave signer is not allowed by the policy",
        "artifact extra v1 is not known",
    )


def test_an_unreferenced_artifact_below_its_floor_is_still_a_rollback() -> None:
    result = appraise(with_artifact("model", 1, MODEL_DIGEST), POLICY, DEVICE)
    assert result.status == "contraindicated"
    assert result.vector["executables"] == 96
    assert result.reasons == (
        "artifact model v1 is below the floor v2 (rollback)",
        "artifact model v1 is not known",
    )


@pytest.mark.parametrize(
    ("ev", "policy"),
    [
        pytest.param(
            replace(GOOD, platform_debug=True),
            replace(POLICY, allow_debug_platform=True),
            id="platform-debug-allowed",
        ),
        pytest.param(
            replace(GOOD, secure_boot=False),
            replace(POLICY, require_secure_boot=False),
            id="secure-boot-not-required",
        ),
        pytest.param(replace(GOOD, smt=True), replace(POLICY, smt="allow"), id="smt-on-allowed"),
        pytest.param(
            replace(GOOD, smt=None), replace(POLICY, smt="allow"), id="smt-unknown-allowed"
        ),
        pytest.param(
            with_enclave(debug=True),
            replace(
                POLICY,
                allow_debug_images=True,
                enclave_references=(EnclaveReference(MRENCLAVE, svn=3, debug=True),),
            ),
            id="debug-image-allowed",
        ),
        pytest.param(
            with_enclave(mrsigner=OTHER_SIGNER),
            replace(POLICY, allowed_signers=(SIGNER, OTHER_SIGNER)),
            id="second-signer-allowed",
        ),
        pytest.param(
            replace(GOOD, artifacts=()),
            POLICY,
            id="no-artifacts-loaded",
        ),
    ],
)
def test_what_the_policy_allows_stays_affirming(ev: Evidence, policy: FleetPolicy) -> None:
    result = appraise(ev, policy, DEVICE)
    assert result.status == "affirming"
    assert result.vector == expected_vector()
    assert result.reasons == ()


def test_firmware_versions_compare_as_numbers_not_text() -> None:
    policy = replace(POLICY, min_firmware="1.10.0")
    assert appraise(replace(GOOD, firmware="1.9.9"), policy, DEVICE).status == "contraindicated"
    assert appraise(replace(GOOD, firmware="1.10.0"), policy, DEVICE).status == "affirming"
    assert appraise(replace(GOOD, firmware="10.0.0"), policy, DEVICE).status == "affirming"


def test_a_device_that_is_not_active_is_contraindicated_whatever_its_status_word() -> None:
    result = appraise(GOOD, POLICY, replace(DEVICE, status="suspended"))
    assert result.status == "contraindicated"
    assert result.vector["instance-identity"] == 96
    assert result.reasons == ("device is suspended",)


def test_several_failures_list_every_reason_and_mark_every_claim() -> None:
    ev = replace(
        GOOD,
        firmware="1.0.0",
        platform_debug=True,
        secure_boot=False,
        smt=None,
        enclave=replace(GOOD.enclave, mrsigner=OTHER_SIGNER, svn=1, debug=True),
        artifacts=(ArtifactClaim("vendor", 1, "00" * 32), ArtifactClaim("extra", 3, "11" * 32)),
        local_attestation="failed",
        key_binding=b"\x00" * 64,
    )
    result = appraise(ev, replace(POLICY, smt="deny"), replace(DEVICE, status="revoked"))
    assert result.status == "contraindicated"
    assert result.vector == expected_vector(
        instance_identity=96, configuration=96, executables=96, hardware=96, runtime_opaque=96
    )
    assert result.reasons == (
        "device is revoked",
        "firmware 1.0.0 is below the fleet minimum 1.4.0",
        "platform is in debug mode",
        "secure boot is off",
        "SMT is on or unknown and the policy denies it",
        "enclave signer is not allowed by the policy",
        f"enclave measurement {MRENCLAVE[:16]} (SVN 1) is not a reference value",
        "enclave SVN 1 is below the fleet minimum 2",
        "debug enclave image",
        "artifact vendor v1 does not match its reference digest",
        "artifact extra v3 is not known",
        "enclave local attestation did not pass",
        "enclave key is not bound to the nonce",
    )


def test_appraisal_is_pure_and_repeatable() -> None:
    ev = replace(GOOD, secure_boot=False)
    first = appraise(ev, POLICY, DEVICE)
    second = appraise(ev, POLICY, DEVICE)
    assert first == second
    assert appraise(GOOD, POLICY, DEVICE).reasons == ()  # no state carried between calls
