"""Attestation evidence: an EAT (RFC 9711) as a CWT in a COSE_Sign1, signed with EdDSA by the
device's platform attestation key, built and checked by `strongroom.cose`.

Registered claims used: `eat_nonce` (10), `ueid` (256), `iat` (6), `exp` (4: `iat` + 7 days, so
evidence that waited in a device's outbox stays verifiable; freshness comes from nonces and
sequence numbers, not from `exp`), `nbf` (5, = `iat`), `dbgstat` (263), `swname` (270), `sub` (2,
the device id). Strongroom's private claims use negative keys from -70000 down
(docs/protocol.md lists them). The COSE `kid` is the device id, so a verifier can pick the
registered key before verifying. Pure: bytes in, objects out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from strongroom import cose
from strongroom.errors import FormatError
from strongroom.fields import (
    ARTIFACT_NAME_RE,
    DEVICE_ID_RE,
    INT64_MAX,
    MAX_EVIDENCE,
    MAX_VERSION,
    Array,
    Bool,
    Bytes,
    Int,
    Map,
    Nullable,
    Text,
    Time,
    Tuple,
)
from strongroom.image import EnclaveIdentity
from strongroom.signing import SigningKey, VerifyKey

EAT_NONCE, UEID, IAT, EXP, NBF, SUB, DBGSTAT, SWNAME = 10, 256, 6, 4, 5, 2, 263, 270
EVIDENCE_VALIDITY_S = 7 * 86400
SR_SEQ = -70000
SR_FIRMWARE = -70001
SR_SECURE_BOOT = -70002
SR_SMT = -70003
SR_ENCLAVE = -70004
SR_ARTIFACTS = -70005
SR_LOCAL_ATTESTATION = -70006
SR_ENCLAVE_KEY = -70007
SR_KEY_BINDING = -70008
DBGSTAT_ENABLED, DBGSTAT_DISABLED = 0, 1
SWNAME_VALUE = "strongroom-enclave"
MAX_ARTIFACTS = 64
UEID_TYPE_RAND = 0x01
NONCE_MIN, NONCE_MAX = 8, 64  # eat_nonce (RFC 9711 section 4.1)

# Every claim the verifier reads, with its type and bounds (docs/protocol.md). Claims the format
# does not define are ignored, up to 32 claims in all; the private maps admit nothing else.
_ENCLAVE_CLAIM = Map(
    {
        "mrenclave": Bytes.exactly(32),
        "mrsigner": Bytes.exactly(32),
        "product_id": Int(0, 65535),
        "svn": Int(0, MAX_VERSION),
        "debug": Bool(),
    }
)
_ARTIFACT_CLAIM = Tuple(
    (Text(64, 1, pattern=ARTIFACT_NAME_RE), Int(1, MAX_VERSION), Bytes.exactly(32))
)
CLAIMS = Map(
    {
        SUB: Text(64, 1, pattern=DEVICE_ID_RE),
        EXP: Time(integer=True),
        NBF: Time(integer=True),
        IAT: Time(integer=True),
        EAT_NONCE: Bytes(NONCE_MIN, NONCE_MAX),
        UEID: Bytes.exactly(33),
        DBGSTAT: Int(0, 4),  # RFC 9711 section 4.2.9: 0 enabled .. 4 disabled for good
        SWNAME: Text(64),
        SR_SEQ: Int(0, INT64_MAX),
        SR_FIRMWARE: Text(32),  # unparsable firmware is appraised as below the minimum
        SR_SECURE_BOOT: Bool(),
        SR_SMT: Nullable(Bool()),
        SR_ENCLAVE: _ENCLAVE_CLAIM,
        SR_ARTIFACTS: Array(_ARTIFACT_CLAIM, MAX_ARTIFACTS),
        SR_LOCAL_ATTESTATION: Text(32),
        SR_ENCLAVE_KEY: Bytes.exactly(32),
        SR_KEY_BINDING: Bytes.exactly(64),
    },
    extra=True,
    names={
        SUB: "sub",
        EXP: "exp",
        NBF: "nbf",
        IAT: "iat",
        EAT_NONCE: "eat_nonce",
        UEID: "ueid",
        DBGSTAT: "dbgstat",
        SWNAME: "swname",
        SR_SEQ: "seq (-70000)",
        SR_FIRMWARE: "firmware (-70001)",
        SR_SECURE_BOOT: "secure boot (-70002)",
        SR_SMT: "smt (-70003)",
        SR_ENCLAVE: "enclave (-70004)",
        SR_ARTIFACTS: "artifacts (-70005)",
        SR_LOCAL_ATTESTATION: "local attestation (-70006)",
        SR_ENCLAVE_KEY: "enclave key (-70007)",
        SR_KEY_BINDING: "key binding (-70008)",
    },
)


@dataclass(frozen=True)
class ArtifactClaim:
    name: str
    version: int
    sha256: str


@dataclass(frozen=True)
class Evidence:
    device_id: str
    nonce: bytes
    ueid: bytes
    iat: int
    seq: int
    platform_debug: bool
    firmware: str
    secure_boot: bool
    smt: bool | None
    enclave: EnclaveIdentity
    artifacts: tuple[ArtifactClaim, ...]
    local_attestation: str
    enclave_key: bytes
    key_binding: bytes


def ueid_for(attestation_key: VerifyKey) -> bytes:
    """A RAND-type UEID derived from the device's attestation public key."""
    return (
        bytes([UEID_TYPE_RAND]) + hashlib.sha256(b"strongroom-ueid" + attestation_key.raw).digest()
    )


def _claims(ev: Evidence) -> dict[int, Any]:
    return {
        SUB: ev.device_id,
        EAT_NONCE: ev.nonce,
        UEID: ev.ueid,
        IAT: ev.iat,
        EXP: ev.iat + EVIDENCE_VALIDITY_S,
        NBF: ev.iat,
        DBGSTAT: DBGSTAT_ENABLED if ev.platform_debug else DBGSTAT_DISABLED,
        SWNAME: SWNAME_VALUE,
        SR_SEQ: ev.seq,
        SR_FIRMWARE: ev.firmware,
        SR_SECURE_BOOT: ev.secure_boot,
        SR_SMT: ev.smt,
        SR_ENCLAVE: {
            "mrenclave": bytes.fromhex(ev.enclave.mrenclave),
            "mrsigner": bytes.fromhex(ev.enclave.mrsigner),
            "product_id": ev.enclave.product_id,
            "svn": ev.enclave.svn,
            "debug": ev.enclave.debug,
        },
        SR_ARTIFACTS: [[a.name, a.version, bytes.fromhex(a.sha256)] for a in ev.artifacts],
        SR_LOCAL_ATTESTATION: ev.local_attestation,
        SR_ENCLAVE_KEY: ev.enclave_key,
        SR_KEY_BINDING: ev.key_binding,
    }


def sign_evidence(ev: Evidence, key: SigningKey) -> bytes:
    return cose.sign(_claims(ev), key, ev.device_id.encode())


def parse_evidence(token: bytes) -> cose.Sign1:
    """The token's structure, unverified: its `kid` names the device whose key verifies it."""
    if len(token) > MAX_EVIDENCE:
        raise FormatError("evidence is too large")
    return cose.parse(token, "evidence")


def evidence_kid(token: bytes | cose.Sign1) -> str:
    """The device id in the COSE `kid` header, read without verifying (to pick the key)."""
    parsed = token if isinstance(token, cose.Sign1) else parse_evidence(token)
    try:
        return parsed.kid.decode()
    except UnicodeDecodeError as e:
        raise FormatError("evidence key id is not a device id") from e


def verify_evidence(
    token: bytes | cose.Sign1, key: VerifyKey, *, now: float | None = None
) -> Evidence:
    """Check the signature with the device's registered key and parse the claims.

    SignatureError for a bad signature; FormatError for anything else wrong, a validly signed
    token with an absurd claim (a `seq` past 64 bits, an infinite time, an integer for bytes...)
    included: every claim is checked against `CLAIMS` before it is used. `now` (default: the
    clock) is the time at which `exp` and `nbf` are checked."""
    parsed = token if isinstance(token, cose.Sign1) else parse_evidence(token)
    claims = CLAIMS.check(cose.verify(parsed, key, "evidence", now=now), "evidence")
    enclave = claims[SR_ENCLAVE]
    return Evidence(
        device_id=claims[SUB],
        nonce=claims[EAT_NONCE],
        ueid=claims[UEID],
        iat=claims[IAT],
        seq=claims[SR_SEQ],
        platform_debug=claims[DBGSTAT] == DBGSTAT_ENABLED,
        firmware=claims[SR_FIRMWARE],
        secure_boot=claims[SR_SECURE_BOOT],
        smt=claims[SR_SMT],
        enclave=EnclaveIdentity(
            enclave["mrenclave"].hex(),
            enclave["mrsigner"].hex(),
            enclave["product_id"],
            enclave["svn"],
            enclave["debug"],
        ),
        artifacts=tuple(ArtifactClaim(n, v, d.hex()) for n, v, d in claims[SR_ARTIFACTS]),
        local_attestation=claims[SR_LOCAL_ATTESTATION],
        enclave_key=claims[SR_ENCLAVE_KEY],
        key_binding=claims[SR_KEY_BINDING],
    )
