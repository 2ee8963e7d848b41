"""Validation of identifiers and typed fields that appear in commands and documents."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2

from strongroom.errors import FormatError, InputError

DEVICE_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
ARTIFACT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
HEX_RE = re.compile(r"[0-9a-f]*")
FIRMWARE_RE = re.compile(r"[0-9]{1,6}\.[0-9]{1,6}\.[0-9]{1,6}", re.ASCII)
MAX_VERSION = 2**31 - 1


def check_device_id(value: str) -> str:
    """Return `value` if it is a valid device id, else raise InputError.

    Device ids are 1-64 lowercase letters, digits and dashes, starting with a letter or digit, so
    that they are safe as file names, MQTT topic levels and certificate common names.
    """
    if not DEVICE_ID_RE.fullmatch(value):
        raise InputError(
            f"invalid device id {value!r}",
            hint="use 1-64 lowercase letters, digits and dashes, starting with a letter or digit",
        )
    return value


def check_artifact_name(value: str) -> str:
    if not ARTIFACT_NAME_RE.fullmatch(value):
        raise InputError(
            f"invalid artifact name {value!r}",
            hint="use 1-64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit",
        )
    return value


def check_version(value: int, what: str = "version") -> int:
    if not 1 <= value <= MAX_VERSION:
        raise InputError(f"{what} must be between 1 and {MAX_VERSION}, got {value}")
    return value


def parse_firmware(value: str) -> tuple[int, int, int]:
    """Parse a firmware version 'X.Y.Z' into a comparable tuple."""
    if not FIRMWARE_RE.fullmatch(value):
        raise InputError(
            f"invalid firmware version {value!r}", hint="use the form X.Y.Z, e.g. 1.4.2"
        )
    major, minor, patch = (int(p) for p in value.split("."))
    return major, minor, patch


# Typed getters for documents parsed from untrusted bytes: each raises FormatError naming the field.


def get_str(doc: dict[str, Any], key: str, what: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise FormatError(f"{what}: field {key!r} must be a string")
    return value


def get_int(doc: dict[str, Any], key: str, what: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise FormatError(f"{what}: field {key!r} must be an integer in [{lo}, {hi}]")
    return value


def get_bool(doc: dict[str, Any], key: str, what: str) -> bool:
    value = doc.get(key)
    if not isinstance(value, bool):
        raise FormatError(f"{what}: field {key!r} must be true or false")
    return value


def get_hex(doc: dict[str, Any], key: str, what: str, size: int) -> bytes:
    """A lowercase hex string encoding exactly `size` bytes."""
    value = doc.get(key)
    if not isinstance(value, str) or len(value) != 2 * size or not HEX_RE.fullmatch(value):
        raise FormatError(f"{what}: field {key!r} must be {size} bytes of lowercase hex")
    return bytes.fromhex(value)


# Bounds shared by every wire format (docs/protocol.md, "Bounds").
INT64_MAX = 2**63 - 1  # the state store keeps integers such as `seq` as signed 64-bit
TIME_MAX = 2**40  # POSIX seconds (the year 36,812): every time is finite and below this
MAX_EVIDENCE = 16 * 1024  # an EAT, on its own or inside a key request
KEY_ID_RE = re.compile(r"[A-Za-z0-9]{1,64}", re.ASCII)


# -- bounded CBOR decoding ------------------------------------------------------------------------


def load_cbor(data: bytes, what: str, *, max_size: int, max_depth: int = 16, tags: Any = ()) -> Any:
    """Exactly one CBOR data item from `data`, as a tree of plain values, or FormatError.

    Plain means maps, arrays, text, bytes, integers, floats, booleans and null, all of definite
    length. The bytes are scanned before cbor2 sees them (`_scan`): tags are refused (except
    bignums, tags 2 and 3 around a byte string, so that a schema can say the integer is out of
    its range, and the outer tags listed in `tags`, which stay `cbor2.CBORTag`s), so are
    undefined, other simple values, indefinite lengths and nesting deeper than `max_depth`. So
    cbor2 never builds what a tag asks for: a decimal fraction or a regular expression of 60 KiB
    costs it about a second of CPU, shared references (tags 28 and 29) make a few hundred bytes a
    tree of millions of items. Trailing bytes are refused. Only FormatError leaves this function,
    whatever cbor2 raises.
    """
    if len(data) > max_size:
        raise FormatError(f"{what} is larger than {max_size} bytes")
    _scan(data, what, max_depth, tags)
    try:
        return cbor2.loads(data)
    except Exception as e:  # cbor2 raises many types for malformed input (invalid UTF-8, ...)
        raise FormatError(f"{what} is not well-formed CBOR") from e


_SCALAR, _STRING, _ARRAY, _MAP, _TAG, _REFUSED = range(6)
_BIGNUMS = (2, 3)  # integers beyond 64 bits: cheap to build, and refused by every field's range


def _head_table() -> list[tuple[int, int, int]]:
    """For each initial byte: what it starts, how many argument bytes follow, its argument."""
    table = []
    for head in range(256):
        major, info = head >> 5, head & 0x1F
        size = 1 << (info - 24) if 24 <= info <= 27 else 0
        kind = (_SCALAR, _SCALAR, _STRING, _STRING, _ARRAY, _MAP, _TAG, _SCALAR)[major]
        if info > 27 or (major == 7 and info not in (20, 21, 22, 25, 26, 27)):
            kind = _REFUSED  # indefinite lengths, reserved codes, undefined and simple values
        table.append((kind, size, info if info < 24 else 0))
    return table


def _skip_table(heads: list[tuple[int, int, int]]) -> bytes:
    """For each initial byte, the whole item's length in bytes when the head alone gives it (a
    scalar, or a string whose length is in the head), else 0 (see `_HEADS`)."""
    return bytes(
        1 + size if kind == _SCALAR else 1 + arg if kind == _STRING and not size else 0
        for kind, size, arg in heads
    )


_HEADS = _head_table()
_SKIP = _skip_table(_HEADS)  # the scan's fast path: most items of our formats are these


def _scan(data: bytes, what: str, max_depth: int, outer_tags: Any) -> None:
    """Walk the item heads of `data`, skipping string contents: exactly one item, of the plain
    types `load_cbor` accepts, nothing after it. Linear in the number of items, at most the
    number of bytes (each item takes one at least). One loop with the items a head sizes on
    its own (`_SKIP`) first: it runs for every item of every message the verifier reads."""
    end, pos, heads, skip = len(data), 0, _HEADS, _SKIP
    while pos < end and heads[data[pos]][0] == _TAG:  # outer tags: the listed ones, or bignums
        pos = _tag(data, pos, what, outer_tags)
    left = 1  # items still to read at the open level (a map counts keys and values)
    enclosing: list[int] = []  # the same for each enclosing level
    try:
        while True:
            if not left:
                if not enclosing:
                    break
                left = enclosing.pop()
                continue
            left -= 1
            step = skip[data[pos]]  # IndexError: truncated
            if step:
                pos += step
                continue
            kind, size, arg = heads[data[pos]]
            pos += 1 + size
            arg = int.from_bytes(data[pos - size : pos], "big") if size else arg
            if kind == _STRING:
                pos += arg
            elif kind == _TAG:
                pos = _tag(data, pos - 1 - size, what, ())
                left += 1  # the tagged item follows
            elif kind == _REFUSED:
                raise FormatError(f"{what} holds an indefinite length or a CBOR simple value")
            else:  # an array or a map
                if len(enclosing) >= max_depth:
                    raise FormatError(f"{what} nests deeper than {max_depth} levels")
                enclosing.append(left)
                left = arg if kind == _ARRAY else 2 * arg
    except IndexError:
        raise FormatError(f"{what} is truncated (not well-formed CBOR)") from None
    if pos != end:
        message = "is truncated (not well-formed CBOR)" if pos > end else "has data after its end"
        raise FormatError(f"{what} {message}")


def _tag(data: bytes, pos: int, what: str, allowed: Any) -> int:
    """The position after the tag head at `pos` if the tag is allowed here (a bignum around a
    byte string, or one of `allowed`), else FormatError."""
    _kind, size, number = _HEADS[data[pos]]
    pos += 1
    if size:
        number = int.from_bytes(data[pos : pos + size], "big")
        pos += size
    bignum = number in _BIGNUMS and pos < len(data) and data[pos] >> 5 == 2  # around a bstr
    if not (bignum or number in allowed):
        raise FormatError(f"{what} holds a CBOR tag, which is not allowed")
    return pos


# -- declarative schemas --------------------------------------------------------------------------
# One schema per message: each wire format states the type and bounds of every field it reads, and
# `check` returns the fields or raises FormatError naming the first one that is out of bounds. The
# message never names the offending value (it may be huge or hostile), only the field and its
# bounds. Types are exact: a bool is not an integer, an integer is not bytes, 6.0 is not 6.


class Spec:
    """The type and bounds of one value."""

    def check(self, value: Any, where: str) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Spec):
    """An integer (not a bool) in [lo, hi]; by default what a signed 64-bit column holds."""

    lo: int = 0
    hi: int = INT64_MAX

    def check(self, value: Any, where: str) -> int:
        if type(value) is not int or not self.lo <= value <= self.hi:
            raise FormatError(f"{where} must be an integer in [{self.lo}, {self.hi}]")
        return value


@dataclass(frozen=True)
class Time(Spec):
    """POSIX seconds: a finite number in [0, 2^40), or with `integer` an integer in that range."""

    integer: bool = False

    def check(self, value: Any, where: str) -> Any:
        kind = type(value)
        if not (kind is int or (kind is float and not self.integer)) or not 0 <= value < TIME_MAX:
            number = "an integer" if self.integer else "a finite number"
            raise FormatError(f"{where} must be a time: {number} of seconds in [0, 2^40)")
        return value if self.integer else float(value)


@dataclass(frozen=True)
class Number(Spec):
    """A finite number (int or float, not bool) in [lo, hi], returned as a float."""

    lo: float
    hi: float

    def check(self, value: Any, where: str) -> float:
        kind = type(value)
        if not (kind is int or kind is float) or not self.lo <= value <= self.hi:
            raise FormatError(f"{where} must be a finite number in [{self.lo}, {self.hi}]")
        number = float(value)  # in range, so no OverflowError
        if not math.isfinite(number):
            raise FormatError(f"{where} must be a finite number in [{self.lo}, {self.hi}]")
        return number


@dataclass(frozen=True)
class Bytes(Spec):
    """A byte string of `lo` to `hi` bytes (`Bytes.exactly(n)` for a fixed size)."""

    lo: int = 0
    hi: int = 64 * 1024

    @classmethod
    def exactly(cls, size: int) -> Bytes:
        return cls(size, size)

    def check(self, value: Any, where: str) -> bytes:
        if type(value) is not bytes or not self.lo <= len(value) <= self.hi:
            size = f"{self.lo}" if self.lo == self.hi else f"{self.lo} to {self.hi}"
            raise FormatError(f"{where} must be a byte string of {size} bytes")
        return value


@dataclass(frozen=True)
class Text(Spec):
    """Text of at most `hi` characters, matching `pattern` or one of `choices` if given."""

    hi: int
    lo: int = 0
    pattern: re.Pattern[str] | None = None
    choices: tuple[str, ...] = ()

    def check(self, value: Any, where: str) -> str:
        if self.choices:
            if type(value) is not str or value not in self.choices:
                raise FormatError(f"{where} must be one of {', '.join(self.choices)}")
            return value
        if (
            type(value) is not str
            or not self.lo <= len(value) <= self.hi
            or (self.pattern is not None and not self.pattern.fullmatch(value))
        ):
            form = "" if self.pattern is None else " of the form " + self.pattern.pattern
            raise FormatError(f"{where} must be text of {self.lo} to {self.hi} characters{form}")
        return value


@dataclass(frozen=True)
class Bool(Spec):
    def check(self, value: Any, where: str) -> bool:
        if type(value) is not bool:
            raise FormatError(f"{where} must be true or false")
        return value


@dataclass(frozen=True)
class Const(Spec):
    """Exactly this value (of exactly its type)."""

    value: str | int

    def check(self, value: Any, where: str) -> Any:
        if type(value) is not type(self.value) or value != self.value:
            raise FormatError(f"{where} must be {self.value!r}")
        return value


@dataclass(frozen=True)
class Anything(Spec):
    """Any plain value (what `load_cbor` returns): for values a format carries but never reads."""

    def check(self, value: Any, where: str) -> Any:
        return value


@dataclass(frozen=True)
class Nullable(Spec):
    """Null, or a value of `spec`."""

    spec: Spec

    def check(self, value: Any, where: str) -> Any:
        return None if value is None else self.spec.check(value, where)


@dataclass(frozen=True)
class Array(Spec):
    """An array of `lo` to `hi` items, each of `item`."""

    item: Spec
    hi: int
    lo: int = 0

    def check(self, value: Any, where: str) -> list[Any]:
        if type(value) is not list or not self.lo <= len(value) <= self.hi:
            raise FormatError(f"{where} must be an array of {self.lo} to {self.hi} items")
        out: list[Any] = []
        try:
            for v in value:
                out.append(self.item.check(v, ""))
        except FormatError as e:  # the path is only spelled out for a failure: checks are hot
            raise FormatError(f"{where}[{len(out)}]{e}") from e
        return out


@dataclass(frozen=True)
class Tuple(Spec):
    """An array of exactly these items, in this order."""

    items: tuple[Spec, ...]

    def check(self, value: Any, where: str) -> list[Any]:
        if type(value) is not list or len(value) != len(self.items):
            raise FormatError(f"{where} must be an array of {len(self.items)} items")
        out: list[Any] = []
        try:
            for spec, v in zip(self.items, value, strict=True):
                out.append(spec.check(v, ""))
        except FormatError as e:
            raise FormatError(f"{where}[{len(out)}]{e}") from e
        return out


@dataclass(frozen=True)
class MapOf(Spec):
    """A map of at most `hi` entries, keys of `key` and values of `value`."""

    key: Spec
    value: Spec
    hi: int

    def check(self, value: Any, where: str) -> dict[Any, Any]:
        if type(value) is not dict or len(value) > self.hi:
            raise FormatError(f"{where} must be a map of at most {self.hi} entries")
        out = {}
        for k, v in value.items():
            try:
                out[self.key.check(k, " key")] = self.value.check(v, " value")
            except FormatError as e:
                raise FormatError(f"{where}: an entry's{e}") from e
        return out


# What `Map.check` tests inline for a field of one of these specs (a call per field cost more than
# the test); a value that fails it goes to the spec's own check, which names the bound it breaks.
_CALL, _INT, _BYTES, _TEXT, _BOOL = range(5)


def _inline(spec: Spec) -> tuple[int, Any, Any, Any]:
    """How `Map.check` tests a value of `spec` itself: the kind of test, its bounds, a pattern."""
    if type(spec) is Int:
        return _INT, spec.lo, spec.hi, None
    if type(spec) is Bytes:
        return _BYTES, spec.lo, spec.hi, None
    if type(spec) is Text and not spec.choices:
        return _TEXT, spec.lo, spec.hi, spec.pattern
    if type(spec) is Bool:
        return _BOOL, None, None, None
    if type(spec) is Time and spec.integer:  # an integer in [0, 2^40)
        return _INT, 0, TIME_MAX - 1, None
    return _CALL, None, None, None


@dataclass(frozen=True)
class Map(Spec):
    """A map with these `required` and `optional` fields (key: spec). Unknown keys are refused,
    or with `extra` ignored (and left out of the result), up to `hi` entries in all. `names`
    gives the fields' names for messages where the keys are numbers (claims)."""

    required: Mapping[Any, Spec]
    optional: Mapping[Any, Spec] = field(default_factory=dict)
    extra: bool = False
    hi: int = 32
    names: Mapping[Any, str] = field(default_factory=dict)
    _index: dict[Any, tuple[Any, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fields = {**self.optional, **self.required}
        index = {
            k: (type(k), s, "." + self.names.get(k, str(k)), *_inline(s)) for k, s in fields.items()
        }
        object.__setattr__(self, "_index", index)

    def check(self, value: Any, where: str) -> dict[Any, Any]:
        if type(value) is not dict or len(value) > self.hi:
            raise FormatError(f"{where} must be a map of at most {self.hi} entries")
        out: dict[Any, Any] = {}
        index = self._index
        for key, item in value.items():
            known = index.get(key)
            if known is None or known[0] is not type(key):  # 6.0 and True are not 6 and 1
                if self.extra:
                    continue
                raise FormatError(f"{where} has a field the format does not define")
            _key_type, spec, name, test, lo, hi, pattern = known
            kind = type(item)
            if (
                (test == _INT and kind is int and lo <= item <= hi)
                or (test == _BYTES and kind is bytes and lo <= len(item) <= hi)
                or (
                    test == _TEXT
                    and kind is str
                    and lo <= len(item) <= hi
                    and (pattern is None or pattern.fullmatch(item))
                )
                or (test == _BOOL and kind is bool)
            ):
                out[key] = item
                continue
            try:  # the spec's own check: it passes what the inline test cannot, or says why not
                out[key] = spec.check(item, name)
            except FormatError as e:  # the path is only spelled out for a failure: checks are hot
                raise FormatError(f"{where}{e}") from e
        for key in self.required:
            if key not in out:
                raise FormatError(f"{where} lacks its field {index[key][2][1:]}")
        return out


def decode(
    data: bytes, schema: Spec, what: str, *, max_size: int, max_depth: int = 16
) -> dict[Any, Any]:
    """Bounded CBOR decoding (`load_cbor`) and `schema`'s checks: one message's fields."""
    checked: dict[Any, Any] = schema.check(
        load_cbor(data, what, max_size=max_size, max_depth=max_depth), what
    )
    return checked
