"""Key release: which attested enclaves may have an artifact's data key, and why the rest may not.

`refusal` is pure; keystore entries, evidence and policy are built directly.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from provisioning.keystore import KeyEntry, ReleasePolicy
from strongroom.evidence import Evidence
from strongroom.image import EnclaveIdentity
from strongroom.policy import FleetPolicy
from verifier.release import refusal

SIGNER = "5a" * 32
OTHER_SIGNER = "6b" * 32
MRENCLAVE = "c1" * 32
NEXT_MRENCLAVE = "c2" * 32
OTHER_MRENCLAVE = "d2" * 32

ENTRY = KeyEntry(
    key_id="k1",
    name="model",
    version=3,
    kind="model",
    sha256="e3" * 32,
    release=ReleasePolicy(
        signers=(SIGNER,),
        measurements=(MRENCLAVE, NEXT_MRENCLAVE),
        min_svn=2,
        min_firmware="1.4.0",
    ),
)
POLICY = FleetPolicy(allowed_signers=(SIGNER,), artifact_floors={"model": 3})
EVIDENCE = Evidence(
    device_id="dev-a",
    nonce=bytes(32),
    ueid=b"\x01" + bytes(32),
    iat=1_700_000_000,
    seq=1,
    platform_debug=False,
    firmware="1.4.0",
    secure_boot=True,
    smt=False,
    enclave=EnclaveIdentity(MRENCLAVE, SIGNER, product_id=1, svn=2, debug=False),
    artifacts=(),
    local_attestation="passed",
    enclave_key=bytes(32),
    key_binding=bytes(64),
)


def enclave(**changes: Any) -> Evidence:
    return replace(EVIDENCE, enclave=replace(EVIDENCE.enclave, **changes))


def release(**changes: Any) -> KeyEntry:
    return replace(ENTRY, release=replace(ENTRY.release, **changes))


def test_an_enclave_meeting_every_condition_gets_the_key() -> None:
    assert refusal(ENTRY, EVIDENCE, POLICY) is None


@pytest.mark.parametrize(
    ("entry", "ev"),
    [
        pytest.param(ENTRY, enclave(mrenclave=NEXT_MRENCLAVE), id="second-listed-measurement"),
        pytest.param(release(measurements=()), enclave(mrenclave=OTHER_MRENCLAVE), id="any-mr"),
        pytest.param(ENTRY, enclave(svn=9), id="svn-above-minimum"),
        pytest.param(ENTRY, replace(EVIDENCE, firmware="1.10.0"), id="firmware-numerically-newer"),
        pytest.param(replace(ENTRY, version=4), EVIDENCE, id="artifact-above-floor"),
        pytest.param(replace(ENTRY, name="other"), EVIDENCE, id="artifact-without-floor"),
        pytest.param(release(signers=(OTHER_SIGNER, SIGNER)), EVIDENCE, id="one-of-the-signers"),
    ],
)
def test_variations_the_release_policy_allows_get_the_key(entry: KeyEntry, ev: Evidence) -> None:
    assert refusal(entry, ev, POLICY) is None


@pytest.mark.parametrize(
    ("entry", "ev", "reason"),
    [
        pytest.param(
            ENTRY,
            enclave(mrsigner=OTHER_SIGNER),
            "enclave signer is not allowed for this key",
            id="signer",
        ),
        pytest.param(
            release(signers=()),
            EVIDENCE,
            "enclave signer is not allowed for this key",
            id="no-signers-listed",
        ),
        pytest.param(
            ENTRY,
            enclave(mrenclave=OTHER_MRENCLAVE),
            "enclave measurement is not allowed for this key",
            id="measurement",
        ),
        pytest.param(
            ENTRY,
            enclave(svn=1),
            "enclave SVN 1 is below the key's minimum 2",
            id="svn",
        ),
        pytest.param(
            ENTRY,
            replace(EVIDENCE, firmware="1.3.99"),
            "firmware 1.3.99 is below the key's minimum 1.4.0",
            id="firmware",
        ),
        pytest.param(
            release(min_firmware="1.10.0"),
            replace(EVIDENCE, firmware="1.9.0"),
            "firmware 1.9.0 is below the key's minimum 1.10.0",
            id="firmware-compared-as-numbers",
        ),
        pytest.param(
            ENTRY,
            replace(EVIDENCE, firmware="1.4"),
            "firmware version is unreadable",
            id="evidence-firmware-unreadable",
        ),
        pytest.param(
            release(min_firmware="latest"),
            EVIDENCE,
            "firmware version is unreadable",
            id="key-minimum-firmware-unreadable",
        ),
        pytest.param(
            replace(ENTRY, version=2),
            EVIDENCE,
            "artifact model v2 is below the floor v3 (rollback)",
            id="artifact-rollback",
        ),
        pytest.param(
            ENTRY,
            enclave(debug=True),
            "debug enclaves get no keys",
            id="debug-enclave",
        ),
    ],
)
def test_each_unmet_condition_refuses_the_key_with_its_reason(
    entry: KeyEntry, ev: Evidence, reason: str
) -> None:
    assert refusal(entry, ev, POLICY) == reason


def test_a_debug_enclave_gets_keys_only_when_the_policy_allows_debug_images() -> None:
    debug = enclave(debug=True)
    assert refusal(ENTRY, debug, POLICY) == "debug enclaves get no keys"
    assert refusal(ENTRY, debug, replace(POLICY, allow_debug_images=True)) is None


def test_the_floor_comes_from_the_current_policy_not_the_key_entry() -> None:
    raised = replace(POLICY, artifact_floors={"model": 4})
    assert refusal(ENTRY, EVIDENCE, POLICY) is None
    assert refusal(ENTRY, EVIDENCE, raised) == "artifact model v3 is below the floor v4 (rollback)"


def test_the_first_unmet_condition_is_the_reason_given() -> None:
    everything_wrong = replace(
        EVIDENCE,
        firmware="0.1.0",
        enclave=replace(EVIDENCE.enclave, mrsigner=OTHER_SIGNER, svn=1, debug=True),
    )
    assert refusal(ENTRY, everything_wrong, POLICY) == "enclave signer is not allowed for this key"
    signer_ok = replace(
        everything_wrong, enclave=replace(everything_wrong.enclave, mrsigner=SIGNER)
    )
    assert refusal(ENTRY, signer_ok, POLICY) == "enclave SVN 1 is below the key's minimum 2"
