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
from strongroom.fields import (
    ARTIFACT_NAME_RE,
    DEVICE_ID_RE,
    HEX_RE,
    INT64_MAX,
    MAX_VERSION,
    Array,
    Const,
    Int,
    Map,
    MapOf,
    Text,
    Time,
)
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
MAX_REASONS = 256
MAX_TEXT = 1024
FRESHNESS = ("fresh", "periodic", "stale")

# The claims a consumer reads, with their types and bounds (docs/protocol.md). Unknown claims and
# unknown `details` entries are ignored (and dropped); the submodule admits nothing else.
_DETAILS = Map(
    {},
    {
        "firmware": Text(32),
        "svn": Int(0, MAX_VERSION),
        "mrenclave": Text(64, 64, pattern=HEX_RE),
        "artifacts": MapOf(Text(64, 1, pattern=ARTIFACT_NAME_RE), Int(1, MAX_VERSION), hi=64),
        "seq": Int(0, INT64_MAX),
        "freshness": Text(16, choices=FRESHNESS),
    },
    extra=True,
)
_SUBMOD = Map(
    {
        EAR_STATUS: Int(0, 96),  # one of TIERS' values, checked below
        EAR_VECTOR: Map({}, {i: Int(-128, 127) for i in range(len(VECTOR_KEYS))}),
        EAR_POLICY_ID: Text(64),
    },
    {SR_REASONS: Array(Text(MAX_TEXT), MAX_REASONS), SR_DETAILS: _DETAILS},
    names={
        EAR_STATUS: "ear.status",
        EAR_VECTOR: "ear.trustworthiness-vector",
        EAR_POLICY_ID: "ear.appraisal-policy-id",
        SR_REASONS: "reasons (-70100)",
        SR_DETAILS: "details (-70101)",
    },
)
CLAIMS = Map(
    {
        EAT_PROFILE: Const(EAR_PROFILE),
        IAT: Time(integer=True),
        EXP: Time(),
        NBF: Time(),
        EAR_VERIFIER_ID: Map({"developer": Text(64), "build": Text(64)}),
        SUBMODS: MapOf(Text(64, 1, pattern=DEVICE_ID_RE), _SUBMOD, hi=1),
    },
    extra=True,
    names={
        EAT_PROFILE: "eat_profile",
        IAT: "iat",
        EXP: "exp",
        NBF: "nbf",
        EAR_VERIFIER_ID: "ear.verifier-id",
        SUBMODS: "submods",
    },
)
_STATUS_OF = {v: k for k, v in TIERS.items()}


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


def verify_result(token: bytes, key: VerifyKey, *, now: float | None = None) -> AttestationResult:
    """Check a result's signature with the verifier's public key and parse it (`exp` and `nbf`
    checked at `now`, by default the clock); SignatureError or FormatError otherwise."""
    if len(token) > MAX_RESULT:
        raise FormatError("attestation result is too large")
    what = "attestation result"
    claims = CLAIMS.check(cose.verify(token, key, what, now=now), what)
    if len(claims[SUBMODS]) != 1:
        raise FormatError(f"{what} must hold exactly one submodule (the device's)")
    ((device_id, sub),) = claims[SUBMODS].items()
    status = _STATUS_OF.get(sub[EAR_STATUS])
    if status is None:
        raise FormatError(f"{what}: ear.status must be one of {sorted(_STATUS_OF)}")
    vector = sub[EAR_VECTOR]
    vid = claims[EAR_VERIFIER_ID]
    return AttestationResult(
        device_id=device_id,
        status=status,
        vector={k: vector.get(i, 0) for i, k in enumerate(VECTOR_KEYS)},
        reasons=tuple(sub.get(SR_REASONS, ())),
        policy_id=sub[EAR_POLICY_ID],
        iat=claims[IAT],
        details=sub.get(SR_DETAILS, {}),
        verifier_id=f"{vid['developer']}/{vid['build']}",
    )
