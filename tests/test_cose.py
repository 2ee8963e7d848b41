"""strongroom.cose: our COSE_Sign1 against a general implementation (cwt), and its refusals."""

from __future__ import annotations

import time
from typing import Any

import cbor2
import cwt
import pytest
from cwt import COSEKey

from strongroom import cose
from strongroom.errors import FormatError, SignatureError
from strongroom.signing import SigningKey

KEY = SigningKey.generate()
OTHER = SigningKey.generate()
KID = b"cam-001"


def _claims(**extra: Any) -> dict[int, Any]:
    now = int(time.time())
    return {6: now, 4: now + 3600, 5: now, -70000: 7, **extra}


def _cwt_key(key: SigningKey, *, private: bool) -> Any:
    pem = key.to_pem() if private else _public_pem(key)
    return COSEKey.from_pem(pem, alg="EdDSA", kid=KID)


def _public_pem(key: SigningKey) -> bytes:
    return key.verify_key.to_pem()


def _rebuild(token: bytes, **parts: Any) -> bytes:
    """The token with some of its four parts replaced (keeping the tag)."""
    tag = cbor2.loads(token)
    protected, unprotected, payload, signature = tag.value
    fields = {"protected": protected, "unprotected": unprotected, "payload": payload}
    fields["signature"] = signature
    fields.update(parts)
    return bytes(cbor2.dumps(cbor2.CBORTag(18, list(fields.values()))))


@pytest.mark.parametrize("size", [0, 1, 23, 24, 255, 256, 65535, 65536])
def test_hand_encoded_structures_match_a_general_cbor_encoder(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert cose.bstr(data) == cbor2.dumps(data)
    protected = cbor2.dumps({1: -8})
    expected = cbor2.dumps(["Signature1", protected, b"", data])
    assert cose._to_be_signed(protected, data) == expected
    token = cose.sign({1: data}, KEY, b"k" * (size % 300))
    tag = cbor2.loads(token)
    assert token == cbor2.dumps(tag)  # the envelope is cbor2's own encoding of what it holds
    kid = b"k" * (size % 300)
    # list(): cbor2 6 decodes a tag's array as a tuple (and its maps as its frozendict)
    assert tag.tag == 18 and list(tag.value[:3]) == [protected, {4: kid}, cbor2.dumps({1: data})]


def test_tokens_we_sign_verify_with_a_general_cose_library() -> None:
    claims = _claims()
    token = cose.sign(claims, KEY, KID)
    decoded = cwt.decode(token, _cwt_key(KEY, private=False))
    assert decoded[-70000] == 7 and decoded[6] == claims[6]


def test_tokens_a_general_cose_library_signs_verify_with_ours() -> None:
    token = cwt.encode(_claims(), _cwt_key(KEY, private=True))
    assert cose.parse(token, "t").kid == KID
    assert cose.verify(token, KEY.verify_key, "t")[-70000] == 7


def test_wrong_key_is_a_signature_error() -> None:
    token = cose.sign(_claims(), KEY, KID)
    with pytest.raises(SignatureError):
        cose.verify(token, OTHER.verify_key, "t")


@pytest.mark.parametrize("part", ["payload", "protected", "signature"])
def test_any_changed_part_fails(part: str) -> None:
    token = cose.sign(_claims(), KEY, KID)
    original = cbor2.loads(token).value
    index = {"protected": 0, "payload": 2, "signature": 3}[part]
    changed = bytearray(original[index])
    if part == "protected":
        changed = bytearray(cbor2.dumps({1: -8, 3: 0}))  # an extra header changes what is signed
    else:
        changed[-1] ^= 1
    with pytest.raises((SignatureError, FormatError)):
        cose.verify(_rebuild(token, **{part: bytes(changed)}), KEY.verify_key, "t")


def test_the_key_id_is_not_covered_but_only_names_the_key() -> None:
    # kid sits in the unprotected header (as cwt puts it): changing it does not break the
    # signature, which is why the verifier also checks the signed subject against the topic
    token = _rebuild(cose.sign(_claims(), KEY, KID), unprotected={4: b"cam-002"})
    assert cose.parse(token, "t").kid == b"cam-002"
    assert cose.verify(token, KEY.verify_key, "t")[-70000] == 7


@pytest.mark.parametrize(
    "protected",
    [cbor2.dumps({1: -7}), cbor2.dumps({1: -8, 2: [99]}), cbor2.dumps([1]), b"\xff", b""],
    ids=["es256", "crit", "not-a-map", "malformed", "no-alg"],
)
def test_other_algorithms_and_critical_headers_are_refused(protected: bytes) -> None:
    token = _rebuild(cose.sign(_claims(), KEY, KID), protected=protected)
    with pytest.raises(FormatError):
        cose.parse(token, "t")


@pytest.mark.parametrize(
    "token",
    [
        b"",
        b"\xff",
        cbor2.dumps([1, 2, 3]),
        cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b"", b""]))[:-1],
        cbor2.dumps(cbor2.CBORTag(98, [cose._PROTECTED, {}, b"", b""])),
        cbor2.dumps(cbor2.CBORTag(18, [cose._PROTECTED, {4: 7}, b"", b"x" * 64])),
    ],
    ids=["empty", "garbage", "short-array", "truncated", "sign-tag", "int-kid"],
)
def test_malformed_tokens_are_format_errors(token: bytes) -> None:
    with pytest.raises(FormatError):
        cose.verify(token, KEY.verify_key, "t")


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(FormatError, match="after its end"):
        cose.parse(cose.sign(_claims(), KEY, KID) + b"\x00", "t")


def test_cwt_tag_and_untagged_forms_are_accepted() -> None:
    token = cose.sign(_claims(), KEY, KID)
    inner = cbor2.loads(token)
    for form in (cbor2.dumps(cbor2.CBORTag(61, inner)), cbor2.dumps(inner.value)):
        assert cose.verify(form, KEY.verify_key, "t")[-70000] == 7


def test_tags_in_a_longer_length_form_are_accepted() -> None:
    untagged = cose.sign(_claims(), KEY, KID)[1:]  # without the one-byte head of tag 18
    for head in (b"\xd8\x12", b"\xd9\x00\x12", b"\xda\x00\x00\x00\x12", b"\xd8\x3d\xd2"):
        assert cose.verify(head + untagged, KEY.verify_key, "t")[-70000] == 7


@pytest.mark.parametrize(
    "head", [b"\xd2\xd2", b"\xd2\xd8\x3d", b"\xd8\x3d\xd8\x3d"], ids=["18-18", "18-61", "61-61"]
)
def test_tags_in_another_order_or_twice_are_refused(head: bytes) -> None:
    untagged = cose.sign(_claims(), KEY, KID)[1:]
    with pytest.raises(FormatError, match="CBOR tag"):
        cose.parse(head + untagged, "t")


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({4: 1000}, "expired"),
        ({5: 1_000_000_000_000}, "not yet valid"),
        ({4: "soon"}, "malformed time"),
    ],
)
def test_validity_period_is_checked_with_skew(claims: dict[int, Any], message: str) -> None:
    token = cose.sign(claims, KEY, KID)
    with pytest.raises(FormatError, match=message):
        cose.verify(token, KEY.verify_key, "t")


def test_skew_allows_a_minute_either_side() -> None:
    now = 1_800_000_000
    token = cose.sign({4: now - 30, 5: now + 30}, KEY, KID)
    assert cose.verify(token, KEY.verify_key, "t", now=now) == {4: now - 30, 5: now + 30}


def test_claims_must_be_a_map() -> None:
    protected = cose._PROTECTED
    payload = cbor2.dumps([1, 2])
    signature = KEY.sign_raw(cose._to_be_signed(protected, payload))
    token = cbor2.dumps(cbor2.CBORTag(18, [protected, {4: KID}, payload, signature]))
    with pytest.raises(FormatError, match="not a map"):
        cose.verify(token, KEY.verify_key, "t")


def _parsed(token: bytes) -> cose.Sign1 | str:
    try:
        return cose._parse_any(token, "t")
    except FormatError as e:
        return f"refused: {e}"


@pytest.mark.parametrize("payload_size", [0, 23, 24, 255, 256, 65535 - 400])
@pytest.mark.parametrize("kid", [b"", b"cam-001", b"k" * 256, b"k" * 257])
def test_our_own_layout_read_directly_is_what_the_general_path_reads(
    payload_size: int, kid: bytes
) -> None:
    """`parse` reads the layout we sign directly; whatever it accepts so, the general path (CBOR
    decoding and the envelope's checks) accepts with the same result, and anything it does not
    recognise goes to the general path. Checked on our tokens and on every single-byte change,
    cut and extension of their heads."""
    token = cose.sign_payload(bytes(payload_size), KEY, kid)
    fast = cose._parse_ours(token)
    assert fast == (_parsed(token) if len(kid) <= cose.MAX_KID else None)
    variants = [token[:n] for n in range(len(token) - 80, len(token))] + [token + b"\0"]
    for i in range(min(len(token), 16 + len(kid))):  # the heads, the key id, the payload's head
        for byte in (0x00, 0x18, 0x40, 0x41, 0x58, 0x5B, 0x5F, 0xA2, token[i] ^ 1):
            variants.append(token[:i] + bytes((byte,)) + token[i + 1 :])
    for v in variants:
        got = cose._parse_ours(v)
        assert got is None or got == _parsed(v), v[:24].hex()
