"""Ed25519 through libsodium: domain-separated and raw signatures, and what verification refuses."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519, x25519

from strongroom.errors import FormatError, SignatureError
from strongroom.signing import SigningKey, VerifyKey

DOMAIN = b"strongroom/test/v1"
# small-order points (the identity, and a point of order 8): a signature "verifies" under them
# for many messages in a naive implementation; libsodium refuses the keys outright
SMALL_ORDER = [
    bytes([1]) + bytes(31),
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
]


def test_a_signature_verifies_under_its_key_and_domain_only() -> None:
    key = SigningKey.generate()
    signature = key.sign(DOMAIN, b"message")
    key.verify_key.verify(DOMAIN, b"message", signature)
    with pytest.raises(SignatureError, match="bad strongroom/other/v1 signature"):
        key.verify_key.verify(b"strongroom/other/v1", b"message", signature)
    with pytest.raises(SignatureError):
        SigningKey.generate().verify_key.verify(DOMAIN, b"message", signature)


def test_a_raw_signature_is_a_plain_ed25519_signature() -> None:
    key = SigningKey.generate()
    signature = key.sign_raw(b"sig structure")
    assert len(signature) == 64
    key.verify_key.verify_raw(b"sig structure", signature)
    with pytest.raises(SignatureError):
        key.verify_key.verify_raw(b"sig structure!", signature)


@pytest.mark.parametrize("signature", [b"", bytes(63), bytes(65), bytearray(64)])
def test_a_signature_of_the_wrong_size_or_type_is_refused(signature: bytes) -> None:
    with pytest.raises(SignatureError):
        SigningKey.generate().verify_key.verify_raw(b"m", signature)


@pytest.mark.parametrize("raw", SMALL_ORDER, ids=["identity", "order-8"])
def test_a_small_order_public_key_verifies_nothing(raw: bytes) -> None:
    # with a small-order key, R = identity and S = 0 satisfy the group equation for any message
    forged = bytes([1]) + bytes(31) + bytes(32)
    with pytest.raises(SignatureError):
        VerifyKey(raw).verify_raw(b"any message", forged)


def test_keys_survive_their_pem_files() -> None:
    key = SigningKey.generate()
    again = SigningKey.from_pem(key.to_pem())
    assert again.verify_key == key.verify_key
    assert VerifyKey.from_pem(key.verify_key.to_pem()) == key.verify_key
    key.verify_key.verify_raw(b"m", again.sign_raw(b"m"))


def test_pem_files_are_the_bytes_cryptography_writes() -> None:
    for _ in range(20):
        ours = ed25519.Ed25519PrivateKey.generate()
        seed = ours.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        key = SigningKey(seed)
        assert key.to_pem() == ours.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        assert key.verify_key.to_pem() == ours.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def test_pem_in_another_layout_is_read_as_before() -> None:
    key = SigningKey.generate()
    for pem, read in (
        (key.to_pem(), SigningKey.from_pem),
        (key.verify_key.to_pem(), VerifyKey.from_pem),
    ):
        crlf = pem.replace(b"\n", b"\r\n")
        assert read(crlf).to_pem() == pem
        assert read(b"comment\n" + pem).to_pem() == pem


@pytest.mark.parametrize("kind", ["x25519", "ed448"])
def test_pem_of_another_key_type_is_refused(kind: str) -> None:
    other = (
        x25519.X25519PrivateKey.generate() if kind == "x25519" else ed448.Ed448PrivateKey.generate()
    )
    private = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = other.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(FormatError, match="not an Ed25519 private key"):
        SigningKey.from_pem(private)
    with pytest.raises(FormatError, match="not an Ed25519 public key"):
        VerifyKey.from_pem(public)


@pytest.mark.parametrize(
    "pem",
    [b"", b"-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n", b"not pem"],
)
def test_what_is_not_a_pem_key_is_refused(pem: bytes) -> None:
    with pytest.raises(FormatError):
        SigningKey.from_pem(pem)
    with pytest.raises(FormatError):
        VerifyKey.from_pem(pem.replace(b"PRIVATE", b"PUBLIC"))


def test_reading_strongroom_pem_does_not_import_cryptography() -> None:
    key = SigningKey.generate()
    code = (
        "import sys\n"
        "from strongroom.signing import SigningKey, VerifyKey\n"
        f"k = SigningKey.from_pem({key.to_pem()!r})\n"
        f"assert VerifyKey.from_pem({key.verify_key.to_pem()!r}) == k.verify_key\n"
        "assert k.to_pem() and k.verify_key.to_pem()\n"
        "print(sorted(m for m in sys.modules if m.startswith('cryptography')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
