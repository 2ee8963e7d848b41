"""Attestation results: EAR (EAT Attestation Result, draft-ietf-rats-ear) as a CWT / COSE_Sign1,
signed with EdDSA by the verifier's result key and retained on `fleet/<device>/result`.

Claims: `eat_profile` (265) = the EAR profile, `iat` (6), `exp` (4: iat + one year; consumers judge
freshness by `iat`), `ear.verifier-id` (1004), and `submods` (266) with one entry named after the
device: `ear.status` (1000), `ear.trustworthiness-vector` (1001, AR4SI keys 0-7),
`ear.appraisal-policy-id` (1003), plus Strongroom's private `reasons` (-70100) and `details`
(-70101: firmware, enclave SVN and measurement, artifact versions, evidence sequence and its
freshness: "fresh" for an answered challenge, "periodic" for the device's own nonce). `nbf` (5) =
`iat`. Anyone with
the verifier's public key can check a result. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from strongroom import __version__, cose
from strongroom.errors import FormatError
from strongroom.signing import SigningKey, VerifyKey

EAT_PROFILE, IAT, EXP, NBF, SUBMODS = 265, 6, 4, 5, 266
EAR_STATUS, EAR_VECTOR, EAR_POLICY_ID, EAR_VERIFIER_ID = 1000, 1001, 1003, 1004
SR_REASONS, SR_DETAILS = -70100, -70101
EAR_PROFILE = "tag:github.com,2023:veraison/ear"
VERIFIER_KID = "strongroom-verifier"
RESULT_VALIDITY_S = 365 * 86400
MAX_RESULT = 64 * 1024

TIERS = {"none": 0, "affirming": 2, "warning": 32, "contraindicated": 96}
VECTOR_KEYS = (
    "instance-identity",
    "configuration",
    "executables",
    "file-system",
    "hardware",
    "runtime-opaque",
    "storage-opaque",
    "sourced-data",
)


def tier_of(value: int) -> str:
    """The status tier a trustworthiness claim value falls in (AR4SI)."""
    if value >= 96 or value <= -97:
        return "contraindicated"
    if value >= 32 or value <= -33:
        return "warning"
    if value >= 2 or value <= -2:
        return "affirming"
    return "none"


@dataclass(frozen=True)
class AttestationResult:
    device_id: str
    status: str
    vector: dict[str, int]
    reasons: tuple[str, ...]
    policy_id: str
    iat: int
    details: dict[str, Any] = field(default_factory=dict)
    verifier_id: str = f"strongroom/{__version__}"


def _claims(r: AttestationResult) -> dict[int, Any]:
    developer, _, build = r.verifier_id.partition("/")
    return {
        EAT_PROFILE: EAR_PROFILE,
        IAT: r.iat,
        EXP: r.iat + RESULT_VALIDITY_S,
        NBF: r.iat,
        EAR_VERIFIER_ID: {"developer": developer, "build": build},
        SUBMODS: {
            r.device_id: {
                EAR_STATUS: TIERS[r.status],
                EAR_VECTOR: {i: r.vector.get(k, 0) for i, k in enumerate(VECTOR_KEYS)},
                EAR_POLICY_ID: r.policy_id,
                SR_REASONS: list(r.reasons),
                SR_DETAILS: r.details,
            }
        },
    }


def sign_result(result: AttestationResult, key: SigningKey) -> bytes:
    return cose.sign(_claims(result), key, VERIFIER_KID.encode())


def verify_result(token: bytes, key: VerifyKey) -> AttestationResult:
    """Check a result's signature with the verifier's public key and parse it."""
    if len(token) > MAX_RESULT:
        raise FormatError("attestation result is too large")
    claims: Any = cose.verify(token, key, "attestation result")
    try:
        if claims[EAT_PROFILE] != EAR_PROFILE or len(claims[SUBMODS]) != 1:
            raise ValueError("not a Strongroom EAR")
        ((device_id, sub),) = claims[SUBMODS].items()
        status = {v: k for k, v in TIERS.items()}[int(sub[EAR_STATUS])]
        vid = claims[EAR_VERIFIER_ID]
        return AttestationResult(
            device_id=str(device_id),
            status=status,
            vector={k: int(sub[EAR_VECTOR].get(i, 0)) for i, k in enumerate(VECTOR_KEYS)},
            reasons=tuple(str(r) for r in sub.get(SR_REASONS, [])),
            policy_id=str(sub[EAR_POLICY_ID]),
            iat=int(claims[IAT]),
            details=dict(sub.get(SR_DETAILS, {})),
            verifier_id=f"{vid['developer']}/{vid['build']}",
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise FormatError("attestation result lacks a required claim") from e
