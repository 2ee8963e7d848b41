"""Key derivation of the simulated platform: everything comes from the 256-bit root secret.

Pure functions. Report keys are per target enclave (by MRENCLAVE); sealing keys are per identity:
by signer (MRSIGNER, product id and a requested SVN that may not exceed the enclave's own, so a
newer enclave can open an older one's blobs but never the reverse) or by exact measurement. A
per-blob key id (as SGX's KEYID) makes every sealing key distinct.
"""

from __future__ import annotations

from typing import Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from strongroom.image import EnclaveIdentity

SealPolicy = Literal["signer", "measurement"]
KEY_SIZE = 32


class KeyRequestError(Exception):
    """The enclave asked for a key its identity does not entitle it to."""


def _derive(root_secret: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=label).derive(
        root_secret
    )


def report_key(root_secret: bytes, mrenclave: str) -> bytes:
    return _derive(root_secret, b"strongroom/report-key/v1|" + mrenclave.encode())


def counters_key(root_secret: bytes) -> bytes:
    return _derive(root_secret, b"strongroom/counters/v1")


def seal_key(
    root_secret: bytes,
    identity: EnclaveIdentity,
    policy: SealPolicy,
    key_svn: int,
    key_id: bytes,
) -> bytes:
    """The sealing key for `identity`; refuses an SVN above the enclave's own."""
    if len(key_id) != 32:
        raise KeyRequestError("a key id has 32 bytes")
    if policy == "signer":
        if not 1 <= key_svn <= identity.svn:
            raise KeyRequestError(
                f"an enclave at SVN {identity.svn} cannot derive keys of SVN {key_svn}"
            )
        label = f"signer|{identity.mrsigner}|{identity.product_id}|{key_svn}".encode()
    elif policy == "measurement":
        label = f"measurement|{identity.mrenclave}".encode()
    else:
        raise KeyRequestError(f"unknown sealing policy {policy!r}")
    debug = b"|debug" if identity.debug else b""
    return _derive(root_secret, b"strongroom/seal/v1|" + label + debug + b"|" + key_id)
