"""Wrapping a data key and its lease to one enclave instance: HPKE (RFC 9180) base mode.

Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM (pyhpke). The recipient is the
enclave's ephemeral X25519 key, whose public half the enclave bound into its attestation report;
`info` names the key id and `aad` carries the caller's binding (device, request nonce). The sealed
plaintext is CBOR `{"key": data key, "until": lease end (epoch s), "grace": offline grace (s)}`:
only the enclave reads the lease, and only the holder of the data key can have written it, since
the enclave checks the key against the artifact's key check value. Wire form:
`enc (32 bytes) || ciphertext`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import cbor2
from cryptography.hazmat.primitives.asymmetric import x25519

from strongroom.errors import FormatError, IntegrityError
from strongroom.fields import Bytes, Map, Number, Time, load_cbor

if TYPE_CHECKING:
    from pyhpke import CipherSuite

_INFO_DOMAIN = b"strongroom/key-release/v1\x00"
ENC_SIZE = 32
PUBLIC_KEY_SIZE = 32
# the HPKE plaintext: the data key and its lease (only the verifier can make one, but it is parsed
# as strictly as anything else: bytes where bytes belong, finite times)
_PAYLOAD = Map({"key": Bytes.exactly(32), "until": Time(), "grace": Number(0, 2**40)})


@cache
def _suite() -> CipherSuite:
    """The HPKE suite. pyhpke is imported here, on first use: an enclave that starts from sealed
    keys never needs it, and its import is a sizeable part of the enclave's start."""
    from pyhpke import AEADId, CipherSuite, KDFId, KEMId  # noqa: PLC0415 - see above

    return CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES256_GCM)


def _kem_key(key: x25519.X25519PublicKey | x25519.X25519PrivateKey) -> Any:
    from pyhpke import KEMKey  # noqa: PLC0415 - see _suite

    return KEMKey.from_pyca_cryptography_key(key)


@dataclass(frozen=True)
class Lease:
    until: float  # epoch seconds
    grace_s: float  # how long past `until` the enclave may serve without renewing

    @property
    def deadline(self) -> float:
        return self.until + self.grace_s


def wrap_key(
    recipient: bytes, data_key: bytes | bytearray, lease: Lease, *, key_id: str, aad: bytes
) -> bytes:
    """Encrypt `data_key` and its lease to the X25519 public key `recipient` (32 raw bytes)."""
    if len(recipient) != PUBLIC_KEY_SIZE:
        raise FormatError("an enclave public key has 32 bytes")
    pk = _kem_key(x25519.X25519PublicKey.from_public_bytes(recipient))
    try:
        enc, ctx = _suite().create_sender_context(pk, _INFO_DOMAIN + key_id.encode())
    except ValueError as e:  # a low-order point (all zeros, ...): no shared secret to be had
        raise FormatError("the enclave public key is not a usable X25519 key") from e
    plaintext = cbor2.dumps({"key": bytes(data_key), "until": lease.until, "grace": lease.grace_s})
    return bytes(enc) + bytes(ctx.seal(plaintext, aad))


def unwrap_key(
    private_key: x25519.X25519PrivateKey, wrapped: bytes, *, key_id: str, aad: bytes
) -> tuple[bytearray, Lease]:
    """Decrypt a wrapped key; IntegrityError if it was not made for this key and binding."""
    if len(wrapped) <= ENC_SIZE:
        raise FormatError("wrapped key is too short")
    sk = _kem_key(private_key)
    try:
        ctx = _suite().create_recipient_context(
            wrapped[:ENC_SIZE], sk, _INFO_DOMAIN + key_id.encode()
        )
        plaintext = bytearray(ctx.open(wrapped[ENC_SIZE:], aad))
    except Exception as e:  # pyhpke raises its own OpenError/ValueError family
        raise IntegrityError("wrapped key does not open for this enclave") from e
    try:
        doc = _PAYLOAD.check(load_cbor(bytes(plaintext), "wrapped key", max_size=1024), "payload")
        key = bytearray(doc["key"])
        lease = Lease(float(doc["until"]), float(doc["grace"]))
    except FormatError as e:  # authenticated but malformed: refused all the same
        raise FormatError(f"wrapped key has a malformed payload: {e}") from e
    finally:
        plaintext[:] = bytes(len(plaintext))
    return key, lease
