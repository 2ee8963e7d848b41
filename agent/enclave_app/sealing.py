"""Sealed blobs: a data key encrypted under a platform sealing key for this enclave's identity.

Blob = CBOR {header, nonce, ct}; header = canonical CBOR of policy, key SVN, key id, artifact name,
version, data key id and the platform counter value at sealing time; `ct` = AES-256-GCM of the data
key with the header as associated data. The host stores blobs but cannot read or alter them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAX_BLOB = 4096
SealKeyFn = Callable[[str, int, bytes], bytes]


class SealError(Exception):
    """A sealed blob is malformed, was made for another enclave or device, or is stale."""


@dataclass(frozen=True)
class SealedHeader:
    policy: str
    svn: int
    key_id: bytes
    artifact: str
    version: int
    data_key_id: str
    counter: int
    deadline: float  # lease end + offline grace: no unsealing after it

    def encode(self) -> bytes:
        return cbor2.dumps(self.__dict__, canonical=True)


def seal(seal_key: SealKeyFn, header: SealedHeader, data_key: bytes | bytearray) -> bytes:
    key = seal_key(header.policy, header.svn, header.key_id)
    nonce = os.urandom(12)
    body = header.encode()
    ct = AESGCM(key).encrypt(nonce, bytes(data_key), body)
    return cbor2.dumps({"header": body, "nonce": nonce, "ct": ct})


def read_header(blob: bytes) -> tuple[SealedHeader, dict[str, Any]]:
    if len(blob) > MAX_BLOB:
        raise SealError("sealed blob is too large")
    try:
        outer = cbor2.loads(blob)
        h = cbor2.loads(outer["header"])
        header = SealedHeader(
            str(h["policy"]),
            int(h["svn"]),
            bytes(h["key_id"]),
            str(h["artifact"]),
            int(h["version"]),
            str(h["data_key_id"]),
            int(h["counter"]),
            float(h["deadline"]),
        )
        if not isinstance(outer["nonce"], bytes) or not isinstance(outer["ct"], bytes):
            raise TypeError("nonce and ct must be bytes")
    except Exception as e:  # any malformed blob is the same failure
        raise SealError("sealed blob is corrupt") from e
    return header, outer


def unseal(seal_key: SealKeyFn, blob: bytes) -> tuple[SealedHeader, bytearray]:
    """Open a blob; SealError if it is corrupt or not for this enclave on this platform."""
    header, outer = read_header(blob)
    key = seal_key(header.policy, header.svn, header.key_id)
    try:
        data_key = AESGCM(key).decrypt(outer["nonce"], outer["ct"], outer["header"])
    except (InvalidTag, ValueError) as e:
        raise SealError("sealed blob does not open for this enclave on this platform") from e
    return header, bytearray(data_key)
