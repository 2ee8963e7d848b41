"""COSE_Sign1 with EdDSA (RFC 9052 section 4.2 and 4.4), the envelope of evidence and results.

Strongroom signs and checks its own tokens with this module rather than a general COSE library:
one algorithm, one header layout, about a tenth of the per-token overhead that made the verifier's
appraisal rate a third of what the signature check allows. Interoperability with a general
implementation (the `cwt` library) is proven in the tests, both ways.

Layout: tag 18 [protected = bstr .cbor {1: -8}, unprotected = {4: kid}, payload = bstr .cbor
claims, signature = 64 bytes over Sig_structure ["Signature1", protected, h'', payload]]. A token
may also arrive untagged or inside the CWT tag 61. Anything else (another algorithm, `crit`
headers, trailing bytes, wrong types) is refused. Every part is decoded with the bounds of
`strongroom.fields.load_cbor` (no other tags, bounded nesting and sizes), the signature is exactly
64 bytes, and `exp` and `nbf` are finite times (docs/protocol.md, "Bounds"): a FormatError or a
SignatureError, never another exception. Pure: bytes in, objects out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import cbor2

from strongroom.errors import FormatError, SignatureError
from strongroom.fields import Anything, Bytes, MapOf, Time, Tuple, load_cbor
from strongroom.signing import SIGNATURE_SIZE, SigningKey, VerifyKey

COSE_SIGN1_TAG, CWT_TAG = 18, 61
ALG, CRIT, KID = 1, 2, 4
EDDSA = -8
EXP, NBF = 4, 5
CLOCK_SKEW_S = 60  # allowed between the signer's clock and ours for exp and nbf
_PROTECTED = cbor2.dumps({ALG: EDDSA})
# The fixed parts of the structures below, encoded by hand: a general encoder costs more than the
# signature at the verifier's rates. tests/test_cose.py checks them against cbor2's encoding.
_SIG_STRUCTURE_HEAD = b"\x84\x6aSignature1"  # array(4), text(10) "Signature1"
_EMPTY_BSTR = b"\x40"
_SIGN1_HEAD = b"\xd2\x84"  # tag 18, array(4)
# Bounds: a token, its protected header and its key id (evidence 16 KiB and results 64 KiB are
# capped again by their modules); claims nest at most 16 deep.
MAX_TOKEN = 64 * 1024
MAX_HEADER = 1024
MAX_KID = 256
MAX_DEPTH = 16
_HEADERS = MapOf(Anything(), Anything(), hi=16)
_ENVELOPE = Tuple(
    (Bytes(0, MAX_HEADER), _HEADERS, Bytes(0, MAX_TOKEN), Bytes.exactly(SIGNATURE_SIZE))
)
_TIME_CLAIM = Time()


@dataclass(frozen=True)
class Sign1:
    """A parsed, not yet verified COSE_Sign1."""

    protected: bytes
    kid: bytes
    payload: bytes
    signature: bytes

    def to_be_signed(self) -> bytes:
        return _to_be_signed(self.protected, self.payload)


def bstr(data: bytes) -> bytes:
    """`data` as a CBOR byte string (major type 2, shortest length form)."""
    n = len(data)
    if n < 24:
        head = bytes((0x40 | n,))
    elif n < 0x100:
        head = bytes((0x58, n))
    elif n < 0x10000:
        head = b"\x59" + n.to_bytes(2, "big")
    elif n < 0x100000000:
        head = b"\x5a" + n.to_bytes(4, "big")
    else:
        raise FormatError("byte string too long for a token")
    return head + data


def _to_be_signed(protected: bytes, payload: bytes) -> bytes:
    """Sig_structure ["Signature1", protected, external_aad = h'', payload], encoded."""
    return b"".join((_SIG_STRUCTURE_HEAD, bstr(protected), _EMPTY_BSTR, bstr(payload)))


def sign(claims: dict[int, Any], key: SigningKey, kid: bytes) -> bytes:
    """A COSE_Sign1 over the CBOR encoding of `claims`, signed with `key`."""
    return sign_payload(cbor2.dumps(claims), key, kid)


def sign_payload(payload: bytes, key: SigningKey, kid: bytes) -> bytes:
    """A COSE_Sign1 over `payload` as it is (the fuzzing harnesses sign arbitrary claims bytes)."""
    signature = key.sign_raw(_to_be_signed(_PROTECTED, payload))
    unprotected = b"\xa1\x04" + bstr(kid)  # map(1) {4: kid}
    return b"".join((_SIGN1_HEAD, bstr(_PROTECTED), unprotected, bstr(payload), bstr(signature)))


def parse(token: bytes, what: str) -> Sign1:
    """The structure of a token, checked; FormatError for anything that is not our COSE_Sign1."""
    if len(token) > MAX_TOKEN:
        raise FormatError(f"{what} is larger than {MAX_TOKEN} bytes")
    ours = _parse_ours(token)
    return ours if ours is not None else _parse_any(token, what)


# The start of every token `sign_payload` makes: tag 18, array(4), the protected header as a byte
# string, then the unprotected map(1) and its key 4 (kid).
_OURS = _SIGN1_HEAD + bstr(_PROTECTED) + b"\xa1\x04"
_SIGNATURE_HEAD = bstr(bytes(SIGNATURE_SIZE))[:2]


def _parse_ours(token: bytes) -> Sign1 | None:
    """A token in exactly the layout we sign (`sign_payload`), read directly: the Sign1 that
    `_parse_any` makes of it, in a fifth of the time; None for anything else (which
    `_parse_any` then reads or refuses). tests/test_cose.py holds the two to the same result."""
    if not token.startswith(_OURS):
        return None
    kid, pos = _byte_string(token, len(_OURS))
    payload, pos = _byte_string(token, pos)
    if (
        kid is None
        or payload is None
        or len(kid) > MAX_KID
        or len(token) != pos + 2 + SIGNATURE_SIZE
        or token[pos : pos + 2] != _SIGNATURE_HEAD
    ):
        return None
    return Sign1(_PROTECTED, kid, payload, token[pos + 2 :])


def _byte_string(data: bytes, pos: int) -> tuple[bytes | None, int]:
    """The definite-length byte string at `pos` and the position after it, or None."""
    if pos >= len(data) or data[pos] >> 5 != 2:
        return None, pos
    info = data[pos] & 0x1F
    if info < 24:
        size, start = info, pos + 1
    elif info <= 27:
        width = 1 << (info - 24)
        size, start = int.from_bytes(data[pos + 1 : pos + 1 + width], "big"), pos + 1 + width
    else:
        return None, pos  # an indefinite length, or a reserved one
    if start + size > len(data):
        return None, pos
    return data[start : start + size], start + size


def _parse_any(token: bytes, what: str) -> Sign1:
    """Any token `parse` accepts: bounded CBOR decoding, then the envelope's checks."""
    obj = load_cbor(_untagged(token), what, max_size=MAX_TOKEN, max_depth=MAX_DEPTH)
    if not (type(obj) is list and len(obj) == 4):
        raise FormatError(f"{what} is not a COSE_Sign1")
    protected, unprotected, payload, signature = _ENVELOPE.check(obj, f"{what} (COSE_Sign1)")
    headers = _protected_headers(protected, what)
    if (
        not _is_eddsa(headers.get(ALG))
        or ALG in unprotected
        or CRIT in headers
        or (CRIT in unprotected)
    ):
        raise FormatError(f"{what} is not signed with EdDSA (or asks for unknown headers)")
    kid = headers.get(KID, unprotected.get(KID, b""))
    if isinstance(kid, str):
        kid = kid.encode()
    if not isinstance(kid, bytes) or len(kid) > MAX_KID:
        raise FormatError(f"{what} has a malformed key id (a byte string of at most {MAX_KID})")
    return Sign1(protected, kid, payload, signature)


def _untagged(token: bytes) -> bytes:
    """`token` without its optional outer tags (CWT, then COSE_Sign1), in any length form.

    The envelope is then decoded as plain CBOR, the same under every cbor2: cbor2 6 decodes what a
    tag holds as immutable values (tuples and its frozendict), cbor2 5 as lists and dicts. Any
    other tag, or these in another place, is left for `load_cbor` to refuse."""
    rest = token
    for tag in (CWT_TAG, COSE_SIGN1_TAG):
        if not rest or rest[0] >> 5 != 6:  # major type 6: a tag
            break
        info = rest[0] & 0x1F
        size = 1 << (info - 24) if 24 <= info <= 27 else 0
        if info > 27 or len(rest) < 1 + size:
            break
        number = int.from_bytes(rest[1 : 1 + size], "big") if size else info
        if number == tag:
            rest = rest[1 + size :]
    return rest


def _is_eddsa(alg: Any) -> bool:
    return type(alg) is int and alg == EDDSA


def _protected_headers(protected: bytes, what: str) -> dict[Any, Any]:
    if protected == _PROTECTED:  # ours: no need to decode it
        return {ALG: EDDSA}
    if not protected:
        return {}
    where = f"{what} protected header"
    headers: dict[Any, Any] = _HEADERS.check(
        load_cbor(protected, where, max_size=MAX_HEADER, max_depth=4), where
    )
    return headers


def verify(
    token: bytes | Sign1, key: VerifyKey, what: str, *, now: float | None = None
) -> dict[Any, Any]:
    """The claims of a token signed by `key` and valid at `now` (exp and nbf, with skew).
    SignatureError for a bad signature, FormatError for anything malformed or out of date."""
    parsed = token if isinstance(token, Sign1) else parse(token, what)
    try:  # libsodium, through strongroom.signing: about twice cryptography's rate here
        key.verify_raw(parsed.to_be_signed(), parsed.signature)
    except SignatureError as e:
        raise SignatureError(f"{what} signature does not verify") from e
    claims = load_cbor(parsed.payload, f"{what} payload", max_size=MAX_TOKEN, max_depth=MAX_DEPTH)
    if not isinstance(claims, dict):
        raise FormatError(f"{what} claims are not a map")
    _check_validity(claims, time.time() if now is None else now, what)
    return claims


def _check_validity(claims: dict[Any, Any], now: float, what: str) -> None:
    """`exp` and `nbf`, where present, are finite times (NaN would compare false both ways)."""
    if EXP in claims:
        exp = _TIME_CLAIM.check(claims[EXP], f"{what} has a malformed time claim: exp")
        if now > exp + CLOCK_SKEW_S:
            raise FormatError(f"{what} is outside its validity period: expired")
    if NBF in claims:
        nbf = _TIME_CLAIM.check(claims[NBF], f"{what} has a malformed time claim: nbf")
        if now < nbf - CLOCK_SKEW_S:
            raise FormatError(f"{what} is outside its validity period: not yet valid")
