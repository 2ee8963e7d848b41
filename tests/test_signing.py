"""Ed25519 through libsodium: domain-separated and raw signatures, and what verification refuses."""

from __future__ import annotations

import pytest

from strongroom.errors import SignatureError
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
