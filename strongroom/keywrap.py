"""Wrapping a data key to one enclave instance: HPKE (RFC 9180) base mode.

Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM (pyhpke). The recipient is the
enclave's ephemeral X25519 key, whose public half the enclave bound into its attestation report;
`info` names the key id and `aad` carries the caller's binding (device, request nonce), so a wrapped
key is useless to any other enclave, device or request. Wire form: `enc (32 bytes) || ciphertext`.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import x25519
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKey

from strongroom.errors import FormatError, IntegrityError

_SUITE = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES256_GCM)
_INFO_DOMAIN = b"strongroom/key-release/v1\x00"
ENC_SIZE = 32
PUBLIC_KEY_SIZE = 32


def wrap_key(recipient: bytes, data_key: bytes | bytearray, *, key_id: str, aad: bytes) -> bytes:
    """Encrypt `data_key` to the X25519 public key `recipient` (32 raw bytes)."""
    if len(recipient) != PUBLIC_KEY_SIZE:
        raise FormatError("an enclave public key has 32 bytes")
    pk = KEMKey.from_pyca_cryptography_key(x25519.X25519PublicKey.from_public_bytes(recipient))
    enc, ctx = _SUITE.create_sender_context(pk, _INFO_DOMAIN + key_id.encode())
    return bytes(enc) + bytes(ctx.seal(bytes(data_key), aad))


def unwrap_key(
    private_key: x25519.X25519PrivateKey, wrapped: bytes, *, key_id: str, aad: bytes
) -> bytearray:
    """Decrypt a wrapped key; raise IntegrityError if it was not made for this key and binding."""
    if len(wrapped) <= ENC_SIZE:
        raise FormatError("wrapped key is too short")
    sk = KEMKey.from_pyca_cryptography_key(private_key)
    try:
        ctx = _SUITE.create_recipient_context(
            wrapped[:ENC_SIZE], sk, _INFO_DOMAIN + key_id.encode()
        )
        return bytearray(ctx.open(wrapped[ENC_SIZE:], aad))
    except Exception as e:  # pyhpke raises its own OpenError/ValueError family
        raise IntegrityError("wrapped key does not open for this enclave") from e
