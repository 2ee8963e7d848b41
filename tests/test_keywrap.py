"""Key release wrapping (HPKE to one enclave instance): what the enclave opens, and that an
authenticated but malformed payload is a FormatError, never an allocation or a foreign error."""

from __future__ import annotations

import math
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pyhpke import KEMKey

from strongroom import keywrap
from strongroom.errors import FormatError, IntegrityError

AAD = b"strongroom/key-release/v1|cam-a|" + b"n" * 32


def _recipient() -> tuple[x25519.X25519PrivateKey, bytes]:
    private = x25519.X25519PrivateKey.generate()
    return private, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _sealed(public: bytes, payload: Any) -> bytes:
    """A wrapped key whose HPKE plaintext is `payload` (what only the verifier can make)."""
    pk = KEMKey.from_pyca_cryptography_key(x25519.X25519PublicKey.from_public_bytes(public))
    enc, ctx = keywrap._suite().create_sender_context(pk, keywrap._INFO_DOMAIN + b"k1")
    return bytes(enc) + bytes(ctx.seal(cbor2.dumps(payload), AAD))


def test_a_wrapped_key_opens_for_its_enclave_with_its_lease() -> None:
    private, public = _recipient()
    lease = keywrap.Lease(1_900_000_000.0, 3600.0)
    wrapped = keywrap.wrap_key(public, bytes(range(32)), lease, key_id="k1", aad=AAD)
    key, opened = keywrap.unwrap_key(private, wrapped, key_id="k1", aad=AAD)
    assert bytes(key) == bytes(range(32))
    assert opened == lease
    with pytest.raises(IntegrityError):
        keywrap.unwrap_key(private, wrapped, key_id="k1", aad=AAD + b"x")


@pytest.mark.parametrize(
    "payload",
    [
        {"key": 2**40, "until": 1.0, "grace": 1.0},  # bytes(N) would allocate N bytes
        {"key": b"k" * 32, "until": math.inf, "grace": 1.0},
        {"key": b"k" * 32, "until": 1.0, "grace": math.nan},
        {"key": b"k" * 31, "until": 1.0, "grace": 1.0},
        {"key": b"k" * 32, "until": "soon", "grace": 1.0},
        [b"k" * 32, 1.0, 1.0],
    ],
    ids=["key-int", "until-inf", "grace-nan", "key-short", "until-text", "not-a-map"],
)
def test_an_authenticated_but_malformed_payload_is_a_format_error(payload: Any) -> None:
    private, public = _recipient()
    with pytest.raises(FormatError):
        keywrap.unwrap_key(private, _sealed(public, payload), key_id="k1", aad=AAD)


def test_a_key_cannot_be_wrapped_to_a_low_order_point() -> None:
    lease = keywrap.Lease(1_900_000_000.0, 3600.0)
    with pytest.raises(FormatError, match="not a usable X25519 key"):
        keywrap.wrap_key(bytes(32), bytes(32), lease, key_id="k1", aad=AAD)
