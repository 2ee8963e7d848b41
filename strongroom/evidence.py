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
MAX_EVIDENCE = 16 * 1024
UEID_TYPE_RAND = 0x01


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


def verify_evidence(token: bytes | cose.Sign1, key: VerifyKey) -> Evidence:
    """Check the signature with the device's registered key and parse the claims."""
    parsed = token if isinstance(token, cose.Sign1) else parse_evidence(token)
    claims: Any = cose.verify(parsed, key, "evidence")
    try:
        enclave = claims[SR_ENCLAVE]
        return Evidence(
            device_id=str(claims[SUB]),
            nonce=bytes(claims[EAT_NONCE]),
            ueid=bytes(claims[UEID]),
            iat=int(claims[IAT]),
            seq=int(claims[SR_SEQ]),
            platform_debug=claims[DBGSTAT] == DBGSTAT_ENABLED,
            firmware=str(claims[SR_FIRMWARE]),
            secure_boot=bool(claims[SR_SECURE_BOOT]),
            smt=None if claims[SR_SMT] is None else bool(claims[SR_SMT]),
            enclave=EnclaveIdentity(
                bytes(enclave["mrenclave"]).hex(),
                bytes(enclave["mrsigner"]).hex(),
                int(enclave["product_id"]),
                int(enclave["svn"]),
                bool(enclave["debug"]),
            ),
            artifacts=tuple(
                ArtifactClaim(str(n), int(v), bytes(d).hex()) for n, v, d in claims[SR_ARTIFACTS]
            ),
            local_attestation=str(claims[SR_LOCAL_ATTESTATION]),
            enclave_key=bytes(claims[SR_ENCLAVE_KEY]),
            key_binding=bytes(claims[SR_KEY_BINDING]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError("evidence lacks a required claim or has a malformed one") from e
