"""The channel between host, platform and enclave: framing, schema checks, and fuzzing of a live
enclave and of the host with malformed and oversized messages.

Three parts: properties of `agent.channel` alone; a real debug enclave, started once for the
module, fed garbage through the host's channel; and an `EnclaveHost` whose enclave is played by
the test over a socketpair, answering with garbage.

Several tests here reproduce defects found while writing this file (a NaN timeout, the invoke
timer firing after return, dunder entry points, untranslated host errors, a desynchronised channel
after a timeout, known CBOR tags); they were fixed and stay as regression tests.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.channel import (
    MAX_FRAME,
    PIECE_SIZE,
    Channel,
    ChannelClosed,
    ChannelError,
    Message,
    check,
    decode,
    encode,
)
from agent.errors import EnclaveCrashedError, EnclaveError, InvokeError
from agent.host import EnclaveHost, HostConfig
from strongroom import artifact
from tests.enclave_env import CODE_MARKER, DeviceEnv, make_env

# Every fuzz test here runs a fixed set of examples (derandomized: the same draws every run, no
# example database) with no per-example deadline, and each example's waits are bounded, so a
# loaded machine makes a run slower but never fails it, and its worst case is known.
PROPERTY = settings(
    max_examples=75, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
LIVE = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
HOST_WAIT_S = 1.0  # the longest the host under test waits for the fake enclave (see below)
ABSURD = 16  # Channel.recv closes the channel for frames above this many times its cap

# Protected code whose running time the test chooses (for the invoke timer).
TIMING_CODE = b"""
import time


def busy(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
"""


def framed(payload: bytes) -> bytes:
    """A frame with a correct length prefix, whatever the payload (no cap, no CBOR check)."""
    return len(payload).to_bytes(4, "big") + payload


# -- strategies --------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # beyond 64 bits cbor2 writes a bignum (tag 2)
    | st.floats(allow_nan=False)
    | st.text(max_size=16)
    | st.binary(max_size=16)
)
# Values of message fields: anything CBOR carries that compares equal after a round trip.
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.text(max_size=10).filter(lambda k: k != "op")
messages = st.builds(
    lambda op, fields: {**fields, "op": op},
    st.text(max_size=12),
    st.dictionaries(field_names, values, max_size=5),
)
# Any CBOR item, including maps with keys that are not strings.
any_cbor = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=6) | st.integers() | st.binary(max_size=4), inner, max_size=4
        )
    ),
    max_leaves=12,
)


@st.composite
def mangled_cbor(draw: st.DrawFn) -> bytes:
    """A valid encoding of a message or any item, then truncated, bit-flipped, spliced or tagged."""
    data = bytearray(cbor2.dumps(draw(messages | any_cbor)))
    how = draw(st.sampled_from(["as_is", "truncate", "flip", "splice", "tag"]))
    if how == "truncate":
        del data[draw(st.integers(0, max(len(data) - 1, 0))) :]
    elif how == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data[at] ^= 1 << draw(st.integers(0, 7))
    elif how == "splice":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=9))
    elif how == "tag":
        tag = draw(st.integers(0, 2**64 - 1))
        data[:0] = cbor2.dumps(cbor2.CBORTag(tag, None))[:-1]  # the tag head alone
    return bytes(data)


TYPE_VALUES: dict[type, st.SearchStrategy[Any]] = {
    int: st.integers(),
    str: st.text(max_size=8),
    bytes: st.binary(max_size=8),
    float: st.floats(),
    bool: st.booleans(),
    list: st.lists(st.integers(), max_size=3),
    dict: st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
}


@dataclass(frozen=True)
class Schema:
    required: dict[str, type]
    optional: dict[str, type]


@st.composite
def schemas_and_messages(draw: st.DrawFn) -> tuple[Schema, Message]:
    """A schema over distinct field names and a message that satisfies it."""
    names = draw(st.lists(field_names, min_size=1, max_size=7, unique=True))
    kinds = [draw(st.sampled_from(list(TYPE_VALUES))) for _ in names]
    n_required = draw(st.integers(1, len(names)))
    schema = Schema(
        dict(zip(names[:n_required], kinds[:n_required], strict=True)),
        dict(zip(names[n_required:], kinds[n_required:], strict=True)),
    )
    msg: Message = {"op": draw(st.text(max_size=8))}
    for name, kind in schema.required.items():
        msg[name] = draw(TYPE_VALUES[kind])
    for name, kind in schema.optional.items():
        if draw(st.booleans()):
            msg[name] = draw(TYPE_VALUES[kind])
    return schema, msg


# -- encode, decode, check ---------------------------------------------------------------------


@PROPERTY
@given(st.binary(max_size=300) | mangled_cbor())
@example(b"")
@example(b"\xa1\x62op\x01")  # 'op' is not a string
@example(b"\xa2\x62op\x61x\x01\x02")  # a key that is not a string
@example(b"\xd8\x63\xa1\x62op\x61x")  # an unknown tag (99) around a good message
@example(b"\x5b" + b"\xff" * 8)  # a byte string claiming 2**64 - 1 bytes
@example(b"\x81" * 5000)  # nesting far beyond any sane depth
@example(b"\xbf\x62op\x61x")  # an indefinite map that never ends
@example(b"\xc5\x82\x1b" + b"\x7f" * 8 + b"\x01")  # a bigfloat with a huge exponent
@example(b"\xd8\x1e\x82\x01\x00")  # a rational with denominator 0
def test_decode_of_any_bytes_returns_a_message_or_raises_channel_error(data: bytes) -> None:
    try:
        msg = decode(data)
    except ChannelError:
        return
    assert isinstance(msg, dict)
    assert isinstance(msg["op"], str)
    assert all(isinstance(key, str) for key in msg)


@PROPERTY
@given(messages)
def test_encode_then_decode_gives_back_the_message(msg: Message) -> None:
    frame = encode(msg)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert decode(frame[4:]) == msg


@PROPERTY
@given(schemas_and_messages())
def test_check_accepts_a_message_with_exactly_its_schema(case: tuple[Schema, Message]) -> None:
    schema, msg = case
    assert check(msg, schema.required, schema.optional) is msg


@PROPERTY
@given(schemas_and_messages(), field_names, values)
def test_check_rejects_an_unexpected_field(
    case: tuple[Schema, Message], extra: str, value: Any
) -> None:
    schema, msg = case
    if extra in schema.required or extra in schema.optional:
        extra += "-extra"
    with pytest.raises(ChannelError, match="unexpected field"):
        check({**msg, extra: value}, schema.required, schema.optional)


@PROPERTY
@given(schemas_and_messages(), st.data())
def test_check_rejects_a_missing_field(case: tuple[Schema, Message], data: st.DataObject) -> None:
    schema, msg = case
    missing = data.draw(st.sampled_from(sorted(schema.required)))
    del msg[missing]
    with pytest.raises(ChannelError, match="missing field"):
        check(msg, schema.required, schema.optional)


@PROPERTY
@given(schemas_and_messages(), st.data())
def test_check_rejects_a_field_of_another_type(
    case: tuple[Schema, Message], data: st.DataObject
) -> None:
    schema, msg = case
    kinds = {**schema.required, **schema.optional}
    field = data.draw(st.sampled_from(sorted(kinds)))
    # Every other type is wrong, bool for int included (bool subclasses int in Python).
    other = data.draw(st.sampled_from([k for k in TYPE_VALUES if k is not kinds[field]]))
    msg[field] = data.draw(TYPE_VALUES[other])
    with pytest.raises(ChannelError, match="wrong type"):
        check(msg, schema.required, schema.optional)


@pytest.mark.parametrize(
    ("value", "kind"),
    [(True, int), (False, int), (1, float), (b"x", str), ("x", bytes), (1.0, int), (None, str)],
)
def test_check_rejects_near_misses_of_a_type(value: object, kind: type) -> None:
    check({"op": "t", "f": kind()}, {"f": kind})
    with pytest.raises(ChannelError, match="wrong type"):
        check({"op": "t", "f": value}, {"f": kind})


@PROPERTY
@given(size=st.integers(0, 400), cap=st.integers(1, 400))
def test_encode_refuses_a_message_beyond_the_cap(size: int, cap: int) -> None:
    msg = {"op": "piece", "data": bytes(size)}
    payload = cbor2.dumps(msg)
    if len(payload) > cap:
        with pytest.raises(ChannelError, match="exceeds"):
            encode(msg, cap)
    else:
        assert encode(msg, cap) == framed(payload)


def test_encode_refuses_a_message_beyond_the_default_cap_but_takes_a_full_piece() -> None:
    assert len(encode({"op": "piece", "data": bytes(PIECE_SIZE)})) > PIECE_SIZE
    with pytest.raises(ChannelError, match="exceeds"):
        encode({"op": "piece", "data": bytes(MAX_FRAME)})


@pytest.mark.parametrize(
    "item",
    [
        cbor2.CBORTag(55799, {"op": "status"}),  # self-described CBOR around a whole message
        {"op": "x", "when": cbor2.CBORTag(1, 0)},  # epoch date-time -> datetime
        {"op": "x", "set": cbor2.CBORTag(258, [1, 2])},  # set -> frozenset/set
        {"op": "x", "ref": cbor2.CBORTag(28, [cbor2.CBORTag(29, 0)])},  # a self-referencing list
    ],
)
def test_decode_rejects_every_cbor_tag(item: object) -> None:
    with pytest.raises(ChannelError):
        decode(cbor2.dumps(item))


# -- a Channel over a socketpair ---------------------------------------------------------------


@contextlib.contextmanager
def channel_pair(max_frame: int = MAX_FRAME) -> Iterator[tuple[Channel, socket.socket]]:
    """A Channel and the raw socket of its peer, which the test writes to as it likes."""
    ours, peer = socket.socketpair()
    chan = Channel(ours, max_frame)
    try:
        yield chan, peer
    finally:
        chan.close()
        peer.close()


def _send_in_background(sock: socket.socket, data: bytes) -> threading.Thread:
    """Write more than a socket buffer holds while the channel reads it."""

    def send() -> None:
        with contextlib.suppress(OSError):  # the reader may close first
            sock.sendall(data)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@PROPERTY
@given(
    cap=st.integers(16, 256),
    over=st.integers(1, 15 * 256),
    junk=st.binary(min_size=1, max_size=8),
    after=messages.filter(lambda m: len(cbor2.dumps(m)) <= 16),
)
def test_a_moderately_oversized_frame_is_rejected_and_the_channel_stays_usable(
    cap: int, over: int, junk: bytes, after: Message
) -> None:
    declared = cap + min(over, (ABSURD - 1) * cap)
    body = (junk * (declared // len(junk) + 1))[:declared]
    with channel_pair(cap) as (chan, peer):
        peer.sendall(declared.to_bytes(4, "big") + body + encode(after, cap))
        with pytest.raises(ChannelError, match="exceeds") as caught:
            chan.recv(timeout=5)
        assert not isinstance(caught.value, ChannelClosed)
        assert chan.recv(timeout=5) == after


def test_a_frame_just_over_the_default_cap_is_drained_and_the_next_message_arrives() -> None:
    with channel_pair() as (chan, peer):
        writer = _send_in_background(
            peer, (MAX_FRAME + 1).to_bytes(4, "big") + bytes(MAX_FRAME + 1) + encode({"op": "ok"})
        )
        with pytest.raises(ChannelError, match="exceeds"):
            chan.recv(timeout=5)
        assert chan.recv(timeout=5) == {"op": "ok"}
        writer.join(5)


@PROPERTY
@given(cap=st.integers(1, 2**20), excess=st.integers(1, 2**32))
@example(cap=MAX_FRAME, excess=1)
@example(cap=MAX_FRAME, excess=2**32)
def test_an_absurd_declared_length_closes_the_channel(cap: int, excess: int) -> None:
    declared = min(ABSURD * cap + excess, 2**32 - 1)
    with channel_pair(cap) as (chan, peer):
        peer.sendall(declared.to_bytes(4, "big"))
        with pytest.raises(ChannelClosed, match="far over the cap"):
            chan.recv(timeout=5)
        peer.settimeout(5)
        assert peer.recv(1) == b""  # the peer sees the channel closed


def test_a_channel_closed_for_an_absurd_length_keeps_answering_channel_closed() -> None:
    with channel_pair(64) as (chan, peer):
        peer.sendall((ABSURD * 64 + 1).to_bytes(4, "big"))
        with pytest.raises(ChannelClosed):
            chan.recv(timeout=5)
        with pytest.raises(ChannelClosed):
            chan.recv(timeout=5)


@PROPERTY
@given(messages, st.data())
def test_a_peer_that_closes_mid_frame_gives_channel_closed(
    msg: Message, data: st.DataObject
) -> None:
    frame = encode(msg)
    cut = data.draw(st.integers(0, len(frame) - 1))
    with channel_pair() as (chan, peer):
        peer.sendall(frame[:cut])
        peer.shutdown(socket.SHUT_WR)
        with pytest.raises(ChannelClosed, match="closed"):
            chan.recv(timeout=5)


@PROPERTY
@given(st.binary(max_size=200) | mangled_cbor(), messages)
def test_a_malformed_frame_is_rejected_and_the_channel_stays_usable(
    payload: bytes, after: Message
) -> None:
    try:
        decode(payload)
    except ChannelError:
        pass
    else:
        return  # well formed after all: not what this test is about
    with channel_pair() as (chan, peer):
        peer.sendall(framed(payload) + encode(after))
        with pytest.raises(ChannelError) as caught:
            chan.recv(timeout=5)
        assert not isinstance(caught.value, ChannelClosed)
        assert chan.recv(timeout=5) == after


@pytest.mark.parametrize("sent", [b"", b"\x00\x00", b"\x00\x00\x00\x10\xa1"])
def test_recv_with_a_timeout_gives_channel_closed_when_no_whole_frame_arrives(sent: bytes) -> None:
    with channel_pair() as (chan, peer):
        peer.sendall(sent)
        started = time.monotonic()
        with pytest.raises(ChannelClosed, match="in time"):
            chan.recv(timeout=0.1)
        assert time.monotonic() - started < 10  # it gave up (0.1 s asked; slack for a loaded box)


def test_a_timeout_mid_frame_never_lets_the_next_recv_parse_payload_bytes_as_a_frame() -> None:
    smuggled = encode({"op": "injected"})
    frame = encode({"op": "piece", "data": smuggled})
    cut = len(frame) - len(smuggled)  # the header and payload up to the embedded frame
    with channel_pair() as (chan, peer):
        peer.sendall(frame[:cut])
        with pytest.raises(ChannelClosed):
            chan.recv(timeout=0.1)
        with contextlib.suppress(OSError):  # our end closed on the timeout
            peer.sendall(frame[cut:])
            peer.shutdown(socket.SHUT_WR)
        try:
            received = chan.recv(timeout=1)
        except ChannelError:
            return  # closed or refused: acceptable
        assert received == {"op": "piece", "data": smuggled}


# -- a live debug enclave fed garbage ----------------------------------------------------------

ENCLAVE_OPS = {"load", "invoke", "evidence", "status", "shutdown", "wipe", "revoke"}


def _wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


class LiveEnclave:
    """One debug enclave for the module, with `vendor` and `timing` loaded. Each test talks to it
    inside `session()`; a session that did not finish cleanly (a failed assertion, an enclave that
    died) leaves the channel in an unknown state, so the next session starts a fresh enclave (from
    the sealed blobs): each hypothesis example then starts from a healthy enclave."""

    ARTIFACTS = ("vendor@1", "timing@1")

    def __init__(self, env: DeviceEnv) -> None:
        self.env = env
        self.host: EnclaveHost | None = None
        self._sealed = False
        self._clean = False

    def _restart(self) -> EnclaveHost:
        self.stop()
        host = self.env.host("dev-a")
        host.start(self.env.images["debug"])
        for name in self.ARTIFACTS:
            path = self.env.artifacts[name]
            host.load_artifact(path, None if self._sealed else self.env.key_for(host, path))
        self._sealed = True
        self.host = host
        return host

    @contextlib.contextmanager
    def session(self) -> Iterator[EnclaveHost]:
        host = self.host
        if host is None or host._enclave is None or not self._clean:
            host = self._restart()
        self._clean = False
        yield host
        self._clean = host._enclave is not None

    @property
    def channel(self) -> Channel:
        assert self.host is not None and self.host._enclave is not None
        return self.host._enclave

    def send_raw(self, data: bytes) -> None:
        """Write bytes on the host's channel as they are: no cap, no schema, no framing check."""
        self.channel._sock.sendall(data)  # the Channel's own socket, so its timeout state holds

    def request_raw(self, data: bytes) -> Message:
        self.send_raw(data)
        return self.channel.recv(timeout=5)

    def stop(self) -> None:
        """Stop the enclave without asking it anything (its channel may be mid-frame)."""
        if self.host is not None:
            if self.host._enclave is not None:
                self.host._enclave.close()
                self.host._enclave = None
            self.host.stop()
            self.host = None


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveEnclave]:
    env = make_env(tmp_path_factory.mktemp("live"))
    env.seal("timing", TIMING_CODE, kind="code")
    enclave = LiveEnclave(env)
    yield enclave
    enclave.stop()


def _artifact_parts(path: Path) -> tuple[bytes, int]:
    """The signed header an honest host would send for `path`, and its body size."""
    with path.open("rb") as f:
        artifact.read_manifest(f)
        header_end = f.tell()
    data = path.read_bytes()
    return data[:header_end], len(data) - header_end


@dataclass(frozen=True)
class Raw:
    """A payload sent as it is inside a correct length prefix."""

    payload: bytes


@dataclass(frozen=True)
class Oversized:
    """A frame whose declared length (and content) is above MAX_FRAME but not absurd."""

    declared: int

    def frame(self) -> bytes:
        return self.declared.to_bytes(4, "big") + b"\x5a" * self.declared


Garbage = Message | Raw | Oversized


def garbage_frame(item: Garbage) -> bytes:
    if isinstance(item, Oversized):
        return item.frame()
    if isinstance(item, Raw):
        return framed(item.payload)
    return framed(cbor2.dumps(item))  # no cap and no check: the enclave must do both


def _not_a_known_message(payload: bytes) -> bool:
    try:
        return decode(payload)["op"] not in ENCLAVE_OPS
    except ChannelError:
        return True


def values_except(*kinds: type) -> st.SearchStrategy[Any]:
    def wrong(value: object) -> bool:
        if int in kinds and isinstance(value, bool):
            return True
        return not isinstance(value, kinds)

    return values.filter(wrong)


REQUEST_FIELDS = {
    *("entrypoint", "timeout", "input"),
    *("header", "body_size", "wrapped_key", "key_aad", "sealed"),
    *("nonce", "command"),
}
extra_names = field_names.filter(lambda k: k not in REQUEST_FIELDS)
unloaded_entrypoints = st.sampled_from(
    [
        "",
        "vendor",
        "vendor:",
        "vendor:nope",
        "vendor:_SECRET",
        "vendor.nope:echo",
        "timing",
        ":echo",
        "os:getcwd",
        "agent.enclave_app.runtime:main",
        "strongroom_enclave:model_bytes",
    ]
) | st.text(max_size=20).filter(
    lambda e: e.partition(":")[0].partition(".")[0] not in ("vendor", "timing")
)


@st.composite
def bad_invokes(draw: st.DrawFn) -> Message:
    msg: Message = {"op": "invoke", "entrypoint": "vendor:echo", "timeout": 1.0}
    if draw(st.booleans()):
        msg["input"] = draw(values)
    how = draw(st.sampled_from(["missing", "extra", "wrong_type", "not_loaded"]))
    if how == "missing":
        del msg[draw(st.sampled_from(["entrypoint", "timeout"]))]
    elif how == "extra":
        msg[draw(extra_names)] = draw(values)
    elif how == "wrong_type":
        field = draw(st.sampled_from(["entrypoint", "timeout"]))
        msg[field] = draw(values_except(str) if field == "entrypoint" else values_except(float))
    else:
        msg["entrypoint"] = draw(unloaded_entrypoints)
    return msg


@st.composite
def bad_loads(draw: st.DrawFn, header: bytes, body_size: int) -> Message:
    """Loads that must be refused before the enclave asks for the body."""
    msg: Message = {"op": "load", "header": header, "body_size": body_size}
    how = draw(
        st.sampled_from(
            [
                "missing",
                "extra",
                "wrong_type",
                "garbage_header",
                "mangled_header",
                "wrong_size",
                "no_key",
                "garbage_wrapped_key",
                "garbage_sealed",
            ]
        )
    )
    if how == "missing":
        del msg[draw(st.sampled_from(["header", "body_size"]))]
    elif how == "extra":
        msg[draw(extra_names)] = draw(values)
    elif how == "wrong_type":
        field = draw(st.sampled_from(["header", "body_size", "wrapped_key", "key_aad", "sealed"]))
        msg[field] = draw(values_except(int) if field == "body_size" else values_except(bytes))
    elif how == "garbage_header":
        msg["header"] = draw(st.binary(max_size=600))
    elif how == "mangled_header":  # the real header, one byte changed or cut short
        at = draw(st.integers(0, len(header) - 1))
        if draw(st.booleans()):
            msg["header"] = header[:at]
        else:
            flipped = header[at] ^ (1 << draw(st.integers(0, 7)))
            msg["header"] = header[:at] + bytes([flipped]) + header[at + 1 :]
    elif how == "wrong_size":
        msg["body_size"] = draw(st.integers().filter(lambda n: n != body_size))
    elif how == "garbage_wrapped_key":
        msg.update(wrapped_key=draw(st.binary(max_size=120)), key_aad=draw(st.binary(max_size=40)))
    elif how == "garbage_sealed":
        blob = st.binary(max_size=300) | st.builds(
            cbor2.dumps,
            st.fixed_dictionaries(
                {
                    "header": st.binary(max_size=80) | values.map(cbor2.dumps),
                    "nonce": values,
                    "ct": values,
                }
            ),
        )
        msg["sealed"] = draw(blob)
    return msg


@st.composite
def bad_evidence(draw: st.DrawFn) -> Message:
    msg: Message = {"op": "evidence"}
    how = draw(st.sampled_from(["missing", "extra", "wrong_type", "short", "long"]))
    if how == "extra":
        msg.update({"nonce": bytes(32), draw(extra_names): draw(values)})
    elif how == "wrong_type":
        msg["nonce"] = draw(values_except(bytes))
    elif how == "short":
        msg["nonce"] = draw(st.binary(max_size=15))
    elif how == "long":
        msg["nonce"] = draw(st.binary(min_size=65, max_size=200))
    return msg


@st.composite
def bad_fieldless(draw: st.DrawFn) -> Message:
    """status, wipe or shutdown with fields they do not take: refused, so nothing is wiped."""
    fields = draw(st.dictionaries(field_names, values, min_size=1, max_size=3))
    return {**fields, "op": draw(st.sampled_from(["status", "wipe", "shutdown"]))}


@st.composite
def bad_revokes(draw: st.DrawFn) -> Message:
    """Revoke commands that are missing, mistyped or not signed by the fleet verifier."""
    msg: Message = {"op": "revoke"}
    how = draw(st.sampled_from(["missing", "extra", "wrong_type", "forged"]))
    if how == "extra":
        msg.update({"command": draw(st.binary(max_size=64)), draw(extra_names): draw(values)})
    elif how == "wrong_type":
        msg["command"] = draw(values_except(bytes))
    elif how == "forged":
        msg["command"] = draw(st.binary(max_size=300) | messages.map(cbor2.dumps))
    return msg


def live_garbage(header: bytes, body_size: int) -> st.SearchStrategy[Garbage]:
    return st.one_of(
        st.binary(max_size=300).filter(_not_a_known_message).map(Raw),
        mangled_cbor().filter(_not_a_known_message).map(Raw),
        any_cbor.filter(lambda v: not isinstance(v, dict)).map(cbor2.dumps).map(Raw),
        st.dictionaries(st.integers() | st.binary(max_size=4), values, min_size=1, max_size=3),
        st.dictionaries(field_names, values, max_size=3),  # no op
        st.builds(
            lambda op, f: {**f, "op": op},
            values_except(str),
            st.dictionaries(field_names, values, max_size=2),
        ),
        st.builds(
            lambda op, f: {**f, "op": op},
            st.text(max_size=12).filter(lambda op: op not in ENCLAVE_OPS),
            st.dictionaries(field_names, values, max_size=3),
        ),
        bad_invokes(),
        bad_loads(header, body_size),
        bad_evidence(),
        bad_fieldless(),
        bad_revokes(),
        st.integers(MAX_FRAME + 1, MAX_FRAME + 64 * 1024).map(Oversized),
    )


@LIVE
@given(data=st.data())
def test_the_enclave_answers_garbage_with_an_error_and_keeps_serving(
    live: LiveEnclave, data: st.DataObject
) -> None:
    header, body_size = _artifact_parts(live.env.artifacts["vendor@1"])
    garbage = data.draw(live_garbage(header, body_size), label="garbage")
    token = data.draw(st.integers(0, 2**31), label="echo token")
    with live.session() as host:
        reply = live.request_raw(garbage_frame(garbage))
        assert reply["op"] == "error", reply
        assert set(reply) == {"op", "reason"} and isinstance(reply["reason"], str)
        assert host.invoke("vendor:echo", token) == {"echo": token}


def _invoke_frame(timeout: float, value: Any) -> bytes:
    msg = {"op": "invoke", "entrypoint": "vendor:echo", "timeout": timeout, "input": value}
    return framed(cbor2.dumps(msg))


@LIVE
@given(
    timeout=st.floats(allow_nan=False),  # NaN: see test_a_nan_invoke_timeout_is_refused_...
    value=values | any_cbor | st.just(math.nan),
    token=st.integers(0, 2**31),
)
def test_well_formed_invokes_with_any_timeout_and_input_get_an_answer(
    live: LiveEnclave, timeout: float, value: Any, token: int
) -> None:
    with live.session() as host:
        reply = live.request_raw(_invoke_frame(timeout, value))
        assert reply["op"] in ("result", "error"), reply
        assert host.invoke("vendor:echo", token) == {"echo": token}


def test_the_enclave_closes_its_channel_and_exits_on_an_absurd_frame_length(
    live: LiveEnclave,
) -> None:
    with live.session() as host:
        assert host.enclave is not None
        pid = host.enclave.pid
        live.send_raw((ABSURD * MAX_FRAME + 1).to_bytes(4, "big"))
        with pytest.raises(EnclaveCrashedError):
            host.invoke("vendor:echo", 1)
        assert _wait_gone(pid)
    with live.session() as host:  # a fresh enclave serves again
        assert host.invoke("vendor:echo", 2) == {"echo": 2}


def test_a_nan_invoke_timeout_is_refused_and_the_enclave_keeps_serving(live: LiveEnclave) -> None:
    with live.session() as host:
        reply = live.request_raw(_invoke_frame(math.nan, None))
        assert reply["op"] == "error"
        assert host.invoke("vendor:echo", 1) == {"echo": 1}


def test_protected_code_finishing_just_before_its_deadline_never_crashes_the_enclave(
    live: LiveEnclave,
) -> None:
    rng = random.Random(1)
    run_for = 0.001
    with live.session() as host:
        for _ in range(1000):  # about 5% of these hit the window today: one does, surely
            # Timing out inside protected code is a normal outcome for some of them.
            with contextlib.suppress(InvokeError):
                host.invoke("timing:busy", run_for, timeout=run_for + rng.uniform(0, 30e-6))


def test_invoke_cannot_read_protected_module_globals_through_dunder_methods(
    live: LiveEnclave,
) -> None:
    with live.session() as host:
        try:
            leaked = host.invoke("vendor:__getattribute__", "_SECRET")
        except InvokeError:
            return
        assert CODE_MARKER not in json.dumps(leaked)


@pytest.mark.parametrize("op", ["status", "wipe", "shutdown"])
def test_requests_without_fields_refuse_unexpected_fields(live: LiveEnclave, op: str) -> None:
    with live.session() as host:
        reply = live.request_raw(framed(cbor2.dumps({"op": op, "extra": 1})))
        assert reply["op"] == "error", reply
        assert host.invoke("vendor:echo", 1) == {"echo": 1}  # neither wiped nor stopped


# -- the host answered by a fake enclave -------------------------------------------------------


@dataclass(frozen=True)
class Truncated:
    """A frame of `msg`, cut after `keep` bytes (then the fake enclave closes its side)."""

    msg: Message
    keep: int

    def frame(self) -> bytes:
        whole = encode(self.msg)
        return whole[: self.keep % len(whole)]


@dataclass(frozen=True)
class Absurd:
    declared: int

    def frame(self) -> bytes:
        return self.declared.to_bytes(4, "big")


Reply = Message | Raw | Oversized | Truncated | Absurd


def reply_bytes(item: Reply) -> bytes:
    if isinstance(item, Truncated | Absurd):
        return item.frame()
    return garbage_frame(item)


def _read_frame(sock: socket.socket) -> bool:
    """Read one frame the host sent; False once the host has closed its end."""

    def exact(n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            piece = sock.recv(n - len(buf))
            if not piece:
                return None
            buf += piece
        return buf

    head = exact(4)
    return head is not None and exact(int.from_bytes(head, "big")) is not None


class FakeEnclave:
    """Plays the enclave on a socketpair: after each request the host sends, it answers with the
    next scripted reply; after the last one it shuts its side for writing and reads until the host
    closes. With `hang_up`, it closes its socket entirely right after the last reply; with
    `stall`, it keeps its side open and says nothing more (a hung enclave)."""

    def __init__(self, replies: list[bytes], *, hang_up: bool = False, stall: bool = False) -> None:
        self.host_end, self._ours = socket.socketpair()
        self._replies, self._hang_up, self._stall = replies, hang_up, stall
        self._thread = threading.Thread(target=self._play, daemon=True)
        self._thread.start()

    def _play(self) -> None:
        sock = self._ours
        try:
            for reply in self._replies:
                if not _read_frame(sock):
                    return
                sock.sendall(reply)
            if self._hang_up:
                return
            if not self._stall:
                sock.shutdown(socket.SHUT_WR)
            while sock.recv(1 << 16):
                pass
        except OSError:
            pass  # the host closed its end first (absurd frame, crash handling)
        finally:
            sock.close()

    def join(self) -> None:
        self._thread.join(10)
        assert not self._thread.is_alive(), "the fake enclave is still waiting for the host"


@pytest.fixture(scope="module")
def fake_env(tmp_path_factory: pytest.TempPathFactory) -> DeviceEnv:
    env = make_env(tmp_path_factory.mktemp("fake"))
    env.seal("big-model", os.urandom(2 * PIECE_SIZE), kind="model")
    return env


class BoundedChannel(Channel):
    """The host's channel to the fake enclave, whose every wait is at most HOST_WAIT_S: the host's
    own timeouts (10 s for status, 30 s for evidence, invoke's plus a grace) would make each
    example that waits cost that long. What the host does when a wait runs out is the same."""

    def recv(self, timeout: float | None = None) -> Message:
        return super().recv(timeout=HOST_WAIT_S if timeout is None else min(timeout, HOST_WAIT_S))


def host_with_fake_enclave(env: DeviceEnv, fake: FakeEnclave) -> EnclaveHost:
    host = EnclaveHost(
        HostConfig(
            bundle=env.bundles["dev-a"],
            state_dir=env.root / "state-fake",
            production=False,
            start_timeout_s=HOST_WAIT_S,
            invoke_timeout_s=HOST_WAIT_S,
        )
    )
    host._enclave = BoundedChannel(fake.host_end)
    return host


HostCall = Callable[[EnclaveHost, DeviceEnv], object]
HOST_CALLS: dict[str, HostCall] = {
    "status": lambda host, _env: host.status(),
    "invoke": lambda host, _env: host.invoke("vendor:echo", [1, "two"]),
    "evidence": lambda host, _env: host.evidence(bytes(32)),
    "load": lambda host, env: host.load_artifact(env.artifacts["vendor@1"]),
}


def run_against_fake(env: DeviceEnv, call: str, replies: list[Reply], **kw: bool) -> EnclaveHost:
    """Run `call` against a fake enclave scripted with `replies`. A truncated reply is the fake's
    last: it closes its side after it (a hung enclave is `stall`, tested on its own)."""
    cut = next((i for i, r in enumerate(replies) if isinstance(r, Truncated)), len(replies))
    fake = FakeEnclave([reply_bytes(r) for r in replies[: cut + 1]], **kw)
    host = host_with_fake_enclave(env, fake)
    try:
        HOST_CALLS[call](host, env)
    finally:
        if host._enclave is not None:
            host._enclave.close()
            host._enclave = None
        fake.join()
    return host


host_replies: st.SearchStrategy[Reply] = st.one_of(
    st.binary(max_size=200).map(Raw),
    mangled_cbor().map(Raw),
    any_cbor.map(cbor2.dumps).map(Raw),
    st.builds(
        lambda op, fields: {**fields, "op": op},
        st.sampled_from(["error", "result", "send_body", "loaded", "status", "evidence"])
        | st.text(max_size=8),
        st.dictionaries(
            st.sampled_from(["reason", "json", "token", "sealed", "version", "name"]) | field_names,
            values | st.just("{not json") | st.just('{"echo": 1}'),
            max_size=3,
        ),
    ),
    st.integers(MAX_FRAME + 1, MAX_FRAME + 4096).map(Oversized),
    st.integers(ABSURD * MAX_FRAME + 1, 2**32 - 1).map(Absurd),
    st.builds(Truncated, messages, st.integers(0, 2**16)),
)


@settings(PROPERTY, max_examples=40)
@given(
    call=st.sampled_from(sorted(HOST_CALLS)), replies=st.lists(host_replies, min_size=1, max_size=2)
)
@example(call="status", replies=[Raw(b"\xff")])
@example(call="invoke", replies=[Truncated({"op": "result", "json": "1"}, 9), Raw(b"\xff")])
def test_the_host_raises_only_enclave_errors_whatever_the_enclave_answers(
    fake_env: DeviceEnv, call: str, replies: list[Reply]
) -> None:
    """At most one wait of HOST_WAIT_S per example (the host gives up on the first), and only
    when a reply leaves the host waiting: 40 examples cannot approach the test's limit."""
    with contextlib.suppress(EnclaveError):
        run_against_fake(fake_env, call, replies)


@pytest.mark.parametrize("call", sorted(HOST_CALLS))
@pytest.mark.parametrize(
    "replies",
    [
        pytest.param([], id="silent"),
        pytest.param([Truncated({"op": "status", "loaded": []}, 7)], id="half-a-frame"),
    ],
)
def test_a_hung_enclave_gives_enclave_crashed_when_the_host_stops_waiting(
    fake_env: DeviceEnv, call: str, replies: list[Reply]
) -> None:
    started = time.monotonic()
    with pytest.raises(EnclaveCrashedError, match="in time"):
        run_against_fake(
            fake_env,
            call,
            [{"op": "send_body"}, *replies] if call == "load" else replies,
            stall=True,
        )
    assert time.monotonic() - started >= HOST_WAIT_S / 2  # it waited: no reply ended the call


LEAK = "BUG: EnclaveHost lets a non-Strongroom exception escape"


@pytest.mark.parametrize(
    ("call", "replies"),
    [
        pytest.param("status", [{"op": "error", "reason": "no"}], id="error-reply"),
        pytest.param("invoke", [{"op": "error", "reason": b"\xff"}], id="error-bytes-reason"),
        pytest.param("status", [Truncated({"op": "status", "loaded": []}, 7)], id="truncated"),
        pytest.param("invoke", [Absurd(ABSURD * MAX_FRAME + 1)], id="absurd-length"),
        pytest.param("load", [{"op": "send_body"}, Truncated({"op": "loaded"}, 3)], id="load-eof"),
        pytest.param(
            "status",
            [Raw(b"\xff\x00")],
            id="malformed-frame",
        ),
        pytest.param(
            "invoke",
            [Oversized(MAX_FRAME + 1)],
            id="oversized-frame",
        ),
        pytest.param(
            "invoke",
            [{"op": "result"}],
            id="result-without-json",
        ),
        pytest.param(
            "invoke",
            [{"op": "result", "json": "{not json"}],
            id="result-not-json",
        ),
        pytest.param(
            "evidence",
            [{"op": "evidence"}],
            id="evidence-without-token",
        ),
        pytest.param(
            "load",
            [{"op": "send_body"}, Raw(b"\x00")],
            id="load-malformed-final-reply",
        ),
    ],
)
def test_the_host_turns_a_bad_answer_into_an_enclave_error(
    fake_env: DeviceEnv, call: str, replies: list[Reply]
) -> None:
    with pytest.raises(EnclaveError):
        run_against_fake(fake_env, call, replies)


def test_an_enclave_that_disappears_gives_enclave_crashed_and_releases_the_channel(
    fake_env: DeviceEnv,
) -> None:
    fake = FakeEnclave([Truncated({"op": "result", "json": "1"}, 5).frame()])
    host = host_with_fake_enclave(fake_env, fake)
    with pytest.raises(EnclaveCrashedError):
        host.invoke("vendor:echo", 1)
    assert host._enclave is None
    fake.join()
    with pytest.raises(EnclaveError, match="not running"):
        host.status()


def test_an_enclave_dying_while_the_body_streams_gives_enclave_crashed(
    fake_env: DeviceEnv,
) -> None:
    fake = FakeEnclave([encode({"op": "send_body"})], hang_up=True)
    host = host_with_fake_enclave(fake_env, fake)
    try:
        with pytest.raises(EnclaveCrashedError):
            host.load_artifact(
                fake_env.artifacts["big-model@1"]
            )  # 2 MiB: more than a socket buffer
        assert host._enclave is None
    finally:
        if host._enclave is not None:
            host._enclave.close()
        fake.join()
