"""Evidence as an attacker holding a device's bundle can make it: genuine claims changed at will,
signed again with the device's own attestation key (so the signature check passes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from strongroom import cose
from strongroom.bundle import ATTESTATION_KEY_FILE
from strongroom.evidence import IAT, SR_SEQ, parse_evidence
from strongroom.signing import SigningKey

CLAIMS = {"iat": IAT, "seq": SR_SEQ}


def resigned(bundle: Path, device_id: str, token: bytes, **changes: Any) -> bytes:
    """`token` (the device's evidence) with the named claims replaced, signed again."""
    key = SigningKey.from_pem((bundle / ATTESTATION_KEY_FILE).read_bytes())
    claims = dict(cose.verify(parse_evidence(token), key.verify_key, "evidence"))
    for name, value in changes.items():
        claims[CLAIMS[name]] = value
    return cose.sign(claims, key, device_id.encode())
