"""The narrow channel between host, platform and enclave: length-prefixed, schema-checked CBOR.

Frame: `u32 length (big-endian) | CBOR map`. Every message is a map with a string `op` and fields
whose names and types are checked against a schema before anything acts on them; frames above the
size cap, CBOR tags, non-string keys and unexpected fields are rejected. Enclave images travel in
pieces below the cap; artifact ciphertext as a passed file descriptor (`send_fd`/`recv_fd`).
This module runs inside the enclave too: it imports only the standard library and cbor2.
"""

from __future__ import annotations

import io
import os
import socket
import struct
from collections.abc import Mapping
from typing import Any

import cbor2

MAX_FRAME = 4 * 1024 * 1024
PIECE_SIZE = 1024 * 1024
_LEN = struct.Struct(">I")

Message = dict[str, Any]
Schema = Mapping[str, type | tuple[type, ...]]


class ChannelError(Exception):
    """A malformed, oversized or unexpected message. The peer is misbehaving."""


class ChannelClosed(ChannelError):
    """The peer closed the channel or did not answer in time."""


def _no_tags(_decoder: Any, tag: Any) -> Any:
    raise ChannelError(f"CBOR tag {tag.tag} not allowed on the channel")


def encode(msg: Message, max_frame: int = MAX_FRAME) -> bytes:
    payload = cbor2.dumps(msg)
    if len(payload) > max_frame:
        raise ChannelError(f"message of {len(payload)} bytes exceeds the {max_frame}-byte cap")
    return _LEN.pack(len(payload)) + payload


_PLAIN = frozenset({str, bytes, int, float, bool, type(None)})
MAX_DEPTH = 32


def _check_plain(obj: Any, budget: int) -> None:
    """Only plain CBOR data may cross: maps, arrays, text, bytes, numbers, booleans, null.
    cbor2 turns tags it knows (dates, sets, UUIDs, ...) into Python objects; those are refused
    here. A message holds at most one item per byte of its frame, as any honest encoding does:
    shared references (tags 28/29), which cbor2 resolves into plain but shared lists, could
    otherwise make this walk exponential (a 200-byte frame, 2^30 visits) or endless (a cycle)."""
    stack, seen = [obj], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > budget:
            raise ChannelError("message holds more items than its frame (shared references)")
        kind = type(item)
        if kind is dict:
            for key, value in item.items():
                stack.append(key)
                stack.append(value)
        elif kind is list:
            stack.extend(item)
        elif kind not in _PLAIN:
            raise ChannelError(f"{kind.__name__} values (CBOR tags) are not allowed")


def decode(payload: bytes) -> Message:
    """Decode one frame's payload (exactly one CBOR item) into a message with a string `op`."""
    if payload[:3] == b"\xd9\xd9\xf7":  # the self-described-CBOR tag: no tags at all
        raise ChannelError("CBOR tags are not allowed on the channel")
    stream = io.BytesIO(payload)
    try:
        msg = cbor2.CBORDecoder(stream, tag_hook=_no_tags, max_depth=MAX_DEPTH).decode()
    except ChannelError:
        raise
    except Exception as e:  # cbor2 raises several types for malformed input
        raise ChannelError("malformed CBOR on the channel") from e
    if stream.tell() != len(payload):
        raise ChannelError("data after the message in its frame")
    _check_plain(msg, len(payload))
    if not isinstance(msg, dict) or not all(isinstance(k, str) for k in msg):
        raise ChannelError("a channel message must be a map with string keys")
    if not isinstance(msg.get("op"), str):
        raise ChannelError("a channel message needs a string 'op'")
    return msg


def check(msg: Message, schema: Schema, optional: Schema | None = None) -> Message:
    """Return `msg` if its fields are exactly `schema` (+ any of `optional`) with those types."""
    optional = optional or {}
    for key in msg:
        if key != "op" and key not in schema and key not in optional:
            raise ChannelError(f"unexpected field {key!r} in {msg['op']!r}")
    for key in schema:
        if key not in msg:
            raise ChannelError(f"missing field {key!r} in {msg['op']!r}")
    for key, kind in {**schema, **optional}.items():
        if key in msg and not _of_kind(msg[key], kind):
            raise ChannelError(f"field {key!r} in {msg['op']!r} has the wrong type")
    return msg


def _of_kind(value: Any, kind: type | tuple[type, ...]) -> bool:
    """`isinstance`, except that a bool is not an int (ranges are the consumer's to check)."""
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


class Channel:
    """One end of a stream socket carrying framed messages."""

    def __init__(self, sock: socket.socket, max_frame: int = MAX_FRAME) -> None:
        self._sock = sock
        self._max = max_frame

    @classmethod
    def from_fd(cls, fd: int, max_frame: int = MAX_FRAME) -> Channel:
        return cls(socket.socket(fileno=fd), max_frame)

    def fileno(self) -> int:
        return self._sock.fileno()

    def detach(self) -> int:
        """Give up the descriptor without closing it (to hand it to another owner)."""
        return self._sock.detach()

    def send(self, msg: Message) -> None:
        try:
            self._sock.sendall(encode(msg, self._max))
        except OSError as e:
            raise ChannelClosed(f"channel closed while sending: {e.strerror}") from e

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            try:
                k = self._sock.recv_into(view[got:])
            except TimeoutError as e:
                # a frame may be half read: the channel cannot be trusted to stay in step
                self.close()
                raise ChannelClosed("no answer on the channel in time; channel closed") from e
            except OSError as e:
                raise ChannelClosed(f"channel failed: {e.strerror}") from e
            if k == 0:
                raise ChannelClosed("peer closed the channel")
            got += k
        return bytes(buf)

    def recv(self, timeout: float | None = None) -> Message:
        """Receive one message; raise ChannelClosed on EOF or timeout, ChannelError if bad.

        An oversized frame is drained and rejected, so the channel stays usable; a timeout
        closes it (a frame may have been half read).
        """
        try:
            self._sock.settimeout(timeout)
        except OSError as e:
            raise ChannelClosed("the channel is closed") from e
        (length,) = _LEN.unpack(self._recv_exact(_LEN.size))
        if length > self._max:
            if length > 16 * self._max:
                self.close()
                raise ChannelClosed(f"frame of {length} bytes is far over the cap; channel closed")
            remaining = length
            while remaining:
                remaining -= len(self._recv_exact(min(remaining, PIECE_SIZE)))
            raise ChannelError(f"frame of {length} bytes exceeds the {self._max}-byte cap")
        return decode(self._recv_exact(length))

    def send_fd(self, msg: Message, fd: int) -> None:
        """Send a message followed by an open descriptor (SCM_RIGHTS), e.g. a file to read."""
        self.send(msg)
        try:
            socket.send_fds(self._sock, [b"\x00"], [fd])
        except OSError as e:
            raise ChannelClosed(f"channel closed while sending: {e.strerror}") from e

    def recv_fd(self, timeout: float | None = None) -> int:
        """Receive exactly one descriptor sent with `send_fd`."""
        try:
            self._sock.settimeout(timeout)
            data, fds, _flags, _addr = socket.recv_fds(self._sock, 1, 4)
        except TimeoutError as e:
            self.close()
            raise ChannelClosed("no descriptor on the channel in time; channel closed") from e
        except OSError as e:
            raise ChannelClosed(f"channel failed: {e.strerror}") from e
        if data != b"\x00" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            self.close()
            raise ChannelClosed("expected exactly one descriptor; channel closed")
        return fds[0]

    def request(self, msg: Message, timeout: float | None = None) -> Message:
        self.send(msg)
        return self.recv(timeout)

    def close(self) -> None:
        self._sock.close()
