"""Ed25519 signatures with domain separation, and the PEM files that hold the keys.

Every signature Strongroom makes covers `DOMAIN || 0x00 || message`, where the domain names the
kind of object ("strongroom/artifact-manifest/v1", ...), so a signature over one kind of object
can never be replayed as another. Keys are stored as PKCS#8 / SubjectPublicKeyInfo PEM so that
standard tools can read them; signing and verifying use libsodium (PyNaCl), the fastest Ed25519
available here.

The PEM files Strongroom writes have one form per kind of key (the one below, which cryptography
writes too), read and written here without cryptography, whose serialization module is a large part
of every device process's start (the platform reads its attestation key at start; the enclave never
reads PEM). Any other PEM is handed to cryptography, imported then.
"""

from __future__ import annotations

import binascii
import hashlib
from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions
import nacl.signing

from strongroom.errors import FormatError, SignatureError

SIGNATURE_SIZE = 64
# DER of the Ed25519 key structures up to the raw 32 bytes (RFC 8410): PKCS#8 v1 without
# attributes or public key (OneAsymmetricKey, private key as an OCTET STRING in an OCTET STRING),
# and SubjectPublicKeyInfo.
_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PRIVATE_LABEL, _PUBLIC_LABEL = b"PRIVATE KEY", b"PUBLIC KEY"


@dataclass(frozen=True)
class VerifyKey:
    """An Ed25519 public key."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise FormatError("an Ed25519 public key has 32 bytes")

    @property
    def fingerprint(self) -> str:
        """Hex SHA-256 of the raw public key: how Strongroom names a signer (like MRSIGNER)."""
        return hashlib.sha256(self.raw).hexdigest()

    def verify(self, domain: bytes, message: bytes, signature: bytes) -> None:
        """Raise SignatureError unless `signature` is this key's over `domain` and `message`."""
        try:
            self.verify_raw(_framed(domain, message), signature)
        except SignatureError as e:
            raise SignatureError(f"bad {domain.decode()} signature") from e

    def verify_raw(self, message: bytes, signature: bytes) -> None:
        """Raise SignatureError unless `signature` is a plain Ed25519 signature of this key over
        `message` (for formats that carry their own domain separation, as COSE's Sig_structure
        does). libsodium refuses small-order public keys and R points, and non-canonical S."""
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
            raise SignatureError(f"an Ed25519 signature has {SIGNATURE_SIZE} bytes")
        try:  # detached verification, as libsodium's crypto_sign_open does it, with no wrapper
            nacl.bindings.crypto_sign_open(signature + message, self.raw)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError) as e:
            raise SignatureError("bad Ed25519 signature") from e

    def to_pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM (the bytes cryptography writes for this key)."""
        return _pem(_PUBLIC_LABEL, _SPKI_PREFIX + self.raw)

    @classmethod
    def from_pem(cls, pem: bytes) -> VerifyKey:
        raw = _raw_from_pem(pem, _PUBLIC_LABEL, _SPKI_PREFIX)
        if raw is not None:
            return cls(raw)
        # imported here: see the module's docstring
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: PLC0415

        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError as e:
            raise FormatError("not a PEM public key") from e
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise FormatError("not an Ed25519 public key")
        return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


class SigningKey:
    """An Ed25519 private key. Never printed, logged or compared by value."""

    __slots__ = ("_key", "_secret")

    def __init__(self, seed: bytes) -> None:
        self._key = nacl.signing.SigningKey(seed)
        # seed || public key, the form libsodium's crypto_sign takes (PyNaCl's own `sign` adds
        # a SignedMessage object and copies per signature, at the verifier's result rate)
        _public, self._secret = nacl.bindings.crypto_sign_seed_keypair(bytes(self._key))

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @property
    def verify_key(self) -> VerifyKey:
        return VerifyKey(bytes(self._key.verify_key))

    def sign(self, domain: bytes, message: bytes) -> bytes:
        return self.sign_raw(_framed(domain, message))

    def sign_raw(self, message: bytes) -> bytes:
        """A plain Ed25519 signature, for formats that carry their own domain separation
        (COSE's Sig_structure); everything else uses `sign` with a domain."""
        return nacl.bindings.crypto_sign(message, self._secret)[:SIGNATURE_SIZE]

    def to_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM (the bytes cryptography writes for this key)."""
        return _pem(_PRIVATE_LABEL, _PKCS8_PREFIX + bytes(self._key))

    @classmethod
    def from_pem(cls, pem: bytes) -> SigningKey:
        seed = _raw_from_pem(pem, _PRIVATE_LABEL, _PKCS8_PREFIX)
        if seed is not None:
            return cls(seed)
        # imported here: see the module's docstring
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: PLC0415

        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as e:
            raise FormatError("not an unencrypted PEM private key") from e
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise FormatError("not an Ed25519 private key")
        return cls(
            key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        )

    def __repr__(self) -> str:
        return f"SigningKey(public={self.verify_key.fingerprint[:16]}…)"


def _framed(domain: bytes, message: bytes) -> bytes:
    return domain + b"\x00" + message


def _pem(label: bytes, der: bytes) -> bytes:
    """PEM of a DER structure of at most 48 bytes (one line of base64, as OpenSSL writes it)."""
    body = binascii.b2a_base64(der, newline=False)
    return b"-----BEGIN " + label + b"-----\n" + body + b"\n-----END " + label + b"-----\n"


def _raw_from_pem(pem: bytes, label: bytes, prefix: bytes) -> bytes | None:
    """The 32 key bytes of `pem` if it is exactly the PEM `_pem` writes for `prefix` + 32 bytes;
    None for anything else (another layout, other whitespace, another key type), which the
    caller hands to cryptography."""
    head = b"-----BEGIN " + label + b"-----\n"
    tail = b"\n-----END " + label + b"-----\n"
    if not (pem.startswith(head) and pem.endswith(tail)):
        return None
    body = pem[len(head) : len(pem) - len(tail)]
    try:
        der = binascii.a2b_base64(body, strict_mode=True)
    except binascii.Error:
        return None
    if len(der) != len(prefix) + 32 or not der.startswith(prefix):
        return None
    if binascii.b2a_base64(der, newline=False) != body:  # the one canonical encoding only
        return None
    return der[len(prefix) :]
