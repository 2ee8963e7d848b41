"""The agent's small parts: the on-disk outbox, retry timing, broker URLs, the protocol's message
payloads and the local API socket."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from agent.errors import InvokeError
from agent.local_api import MAX_REQUEST, LocalApi, call
from agent.outbox import Outbox
from strongroom.errors import FormatError, InputError, StrongroomError
from strongroom.messages import (
    Alert,
    Challenge,
    KeyRequest,
    KeyResponse,
    ReleasedKey,
    Status,
)
from strongroom.mqtt import parse_broker_url
from strongroom.retry import Backoff

# fixed examples (no luck), no per-example deadline and no speed check (a loaded machine)
PROPERTY = settings(
    max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
# Structured fuzzing looks for specific mistakes; a fixed seed makes its verdict reproducible.
STRUCTURED = PROPERTY

# -- outbox ---------------------------------------------------------------------------------


def test_the_outbox_keeps_messages_in_order_across_a_restart(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    box.put("fleet/dev-a/evidence", b"first")
    box.put("fleet/dev-a/status", b"second")
    restarted = Outbox(tmp_path / "outbox")
    restarted.put("fleet/dev-a/evidence", b"third")
    pending = Outbox(tmp_path / "outbox").pending()
    assert [(p.topic, p.payload) for p in pending] == [
        ("fleet/dev-a/evidence", b"first"),
        ("fleet/dev-a/status", b"second"),
        ("fleet/dev-a/evidence", b"third"),
    ]


def test_more_than_ten_messages_stay_in_numeric_order(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox", capacity=10_000)
    for i in range(12):
        box.put("t", str(i).encode())
    assert [p.payload for p in Outbox(tmp_path / "outbox").pending()] == [
        str(i).encode() for i in range(12)
    ]


def test_done_removes_only_the_acknowledged_message(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    box.put("t", b"a")
    box.put("t", b"b")
    first, _ = box.pending()
    box.done(first)
    assert [p.payload for p in Outbox(tmp_path / "outbox").pending()] == [b"b"]
    assert len(box) == 1
    box.done(first)  # acknowledging twice is harmless
    assert len(box) == 1


def test_a_full_outbox_drops_the_oldest_message(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox", capacity=3)
    with capture_logs() as logs:
        for i in range(5):
            box.put("t", bytes([i]))
    assert [p.payload for p in box.pending()] == [b"\x02", b"\x03", b"\x04"]
    dropped = [e for e in logs if e["event"] == "outbox_full_dropped_oldest"]
    assert len(dropped) == 2 and all(e["log_level"] == "warning" for e in dropped)


def test_a_damaged_entry_is_dropped_and_the_rest_delivered(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    box.put("t", b"a")
    box.put("t", b"b")
    box.put("t", b"c")
    damaged = sorted((tmp_path / "outbox").glob("*.msg"))[1]
    damaged.write_bytes(b"\xff\x00 not cbor")
    wrong_shape = tmp_path / "outbox" / "000000000099.msg"
    wrong_shape.write_bytes(cbor2.dumps({"topic": "t", "payload": "text, not bytes"}))
    with capture_logs() as logs:
        pending = Outbox(tmp_path / "outbox").pending()
    assert [p.payload for p in pending] == [b"a", b"c"]
    assert not damaged.exists() and not wrong_shape.exists()
    assert sum(e["event"] == "outbox_entry_unreadable_dropped" for e in logs) == 2


def test_outbox_entries_are_private_to_the_agent(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        box = Outbox(tmp_path / "state" / "outbox")
        box.put("t", b"secret-ish")
    finally:
        os.umask(old)
    entries = list((tmp_path / "state" / "outbox").glob("*.msg"))
    assert len(entries) == 1
    assert stat.S_IMODE(entries[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state" / "outbox").stat().st_mode) == 0o700


# -- retry timing -------------------------------------------------------------------------------


def test_backoff_without_jitter_grows_by_its_factor_up_to_the_cap() -> None:
    b = Backoff(initial_s=0.5, factor=3.0, cap_s=10.0, jitter=0.0)
    assert [b.delay(n) for n in range(6)] == [0.5, 1.5, 4.5, 10.0, 10.0, 10.0]


def test_backoff_stays_capped_for_huge_attempt_numbers() -> None:
    b = Backoff(initial_s=1.0, factor=2.0, cap_s=30.0, jitter=0.0)
    assert b.delay(10_000) == 30.0


@pytest.mark.parametrize("jitter", [0.25, 0.5, 1.0])
def test_jittered_delays_stay_between_the_jitter_floor_and_the_base(jitter: float) -> None:
    b = Backoff(initial_s=1.0, factor=2.0, cap_s=8.0, jitter=jitter)
    rng = random.Random(1234)
    for attempt in range(8):
        base = min(8.0, 2.0**attempt)
        delays = [b.delay(attempt, rng) for _ in range(200)]
        assert all(base * (1 - jitter) <= d <= base for d in delays), attempt
        # the draws use the range, not just one end of it
        assert max(delays) - min(delays) > base * jitter * 0.5


def test_jitter_spreads_devices_that_retry_at_the_same_moment() -> None:
    b = Backoff(jitter=0.5)
    delays = {b.delay(3, random.Random(seed)) for seed in range(20)}
    assert len(delays) == 20
    assert b.delay(3, random.Random(7)) == b.delay(3, random.Random(7))  # reproducible per seed


# -- broker URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtts://broker.example:8883", ("broker.example", 8883)),
        ("broker.example:8883", ("broker.example", 8883)),
        ("mqtts://10.0.0.7:1", ("10.0.0.7", 1)),
        ("[::1]:8883", ("::1", 8883)),
        ("mqtts://[fd00::17]:65535", ("fd00::17", 65535)),
    ],
)
def test_broker_urls_give_host_and_port(url: str, expected: tuple[str, int]) -> None:
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "",
        "broker.example",
        "mqtts://broker.example",
        "broker.example:",
        ":8883",
        "broker.example:0",
        "broker.example:65536",
        "broker.example:-1",
        "broker.example:88a3",
        "mqtt://broker.example:1883",
        "https://broker.example:443",
        "mqtts://broker.example:8883/path",
        "[::1]",
        "broker.example:²",  # a Unicode digit that int() does not accept
    ],
)
def test_a_malformed_broker_url_is_an_input_error_with_a_hint(url: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_broker_url(url)
    assert "mqtts://HOST:PORT" in caught.value.diagnostics()


# -- protocol messages ------------------------------------------------------------------------

MESSAGES = [Challenge, KeyRequest, KeyResponse, Status, Alert]


@pytest.mark.parametrize(
    "message",
    [
        Challenge(nonce=bytes(range(32)), expires=1_800_000_060.5),
        KeyRequest(evidence=b"\xd2\x84 evidence bytes", key_ids=("k1", "model2024")),
        KeyResponse(
            nonce=bytes(32),
            keys=(
                ReleasedKey("k1", b"wrapped-1", b"aad-1", 1_800_003_600.0, 1_800_003_300.0),
                ReleasedKey("k2", b"wrapped-2", b"", 1_800_007_200.0, 1_800_006_900.0),
            ),
            refused=(("k3", "enclave SVN 1 is below the key's minimum 2"),),
        ),
        KeyResponse(nonce=bytes(16), keys=(), refused=()),
        Status(state="online", at=1_800_000_000.25),
        Status(state="revoked", at=1_800_000_000.0, report="forged command on fleet/dev-a/cmd"),
        Alert(severity="critical", device_id="dev-a", reason="firmware below", at=1.5),
    ],
    ids=lambda m: type(m).__name__,
)
def test_each_message_decodes_to_what_was_encoded(message: Any) -> None:
    assert type(message).decode(message.encode()) == message


@pytest.mark.parametrize("message_type", MESSAGES, ids=lambda t: t.__name__)
@PROPERTY
@given(payload=st.binary(max_size=512))
def test_decoding_arbitrary_bytes_raises_only_format_error(
    message_type: Any, payload: bytes
) -> None:
    with contextlib.suppress(FormatError):
        message_type.decode(payload)


@pytest.mark.parametrize("message_type", MESSAGES, ids=lambda t: t.__name__)
def test_an_oversized_payload_is_refused_before_parsing(message_type: Any) -> None:
    with pytest.raises(FormatError, match="larger than"):
        message_type.decode(cbor2.dumps({"padding": b"\x00" * (64 * 1024)}))


# Values of every CBOR kind, including integers too large for a float or an index.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**20), max_value=2**20)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=70)
)
_anything = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
_huge = st.sampled_from([10**400, -(10**400), 2**64])  # CBOR bignums
_times = st.floats(allow_nan=False) | st.integers(min_value=0, max_value=2**40)
_key_ids = st.text("abc123", min_size=1, max_size=8)
# Per message, each field's well-formed values (key lists also get entries of anything).
_FIELDS: dict[Any, dict[str, st.SearchStrategy[Any]]] = {
    Challenge: {"nonce": st.binary(min_size=16, max_size=64), "expires": _times},
    KeyRequest: {"evidence": st.binary(max_size=40), "key_ids": st.lists(_key_ids, min_size=1)},
    KeyResponse: {
        "nonce": st.binary(max_size=32),
        "keys": st.lists(
            st.lists(_key_ids | _huge | _anything, min_size=5, max_size=5)
            | st.tuples(_key_ids, st.binary(), st.binary(), _times, _times).map(list),
            max_size=3,
        ),
        "refused": st.lists(st.tuples(_key_ids, st.text()).map(list), max_size=3),
    },
    Status: {"state": st.sampled_from(["online", "offline", "revoked"]), "at": _times},
    Alert: {
        "severity": st.sampled_from(["info", "warning", "critical"]),
        "device": st.text(max_size=10),
        "reason": st.text(max_size=10),
        "at": _times,
    },
}


@st.composite
def _documents(draw: st.DrawFn, message_type: Any) -> bytes:
    """A map with every field well-formed but one, which is absent or anything at all."""
    fields = _FIELDS[message_type]
    doc = {key: draw(good) for key, good in fields.items()}
    broken = draw(st.sampled_from(sorted(fields)))
    if draw(st.booleans()):
        doc[broken] = draw(_huge | _anything)
    else:
        del doc[broken]
    return cbor2.dumps(doc)


@pytest.mark.parametrize("message_type", MESSAGES, ids=lambda t: t.__name__)
@STRUCTURED
@given(data=st.data())
def test_decoding_a_map_with_the_right_keys_and_wrong_values_raises_only_format_error(
    message_type: Any, data: st.DataObject
) -> None:
    payload = data.draw(_documents(message_type))
    with contextlib.suppress(FormatError):
        message_type.decode(payload)


ALERT = {"severity": "warning", "device": "dev-a", "reason": "replay"}


@pytest.mark.parametrize(
    ("message_type", "doc"),
    [
        pytest.param(Alert, {**ALERT, "at": "yesterday"}, id="alert-time-as-text"),
        pytest.param(Alert, {**ALERT, "at": [1]}, id="alert-time-as-list"),
        pytest.param(Alert, {**ALERT, "at": 10**400}, id="alert-time-too-large"),
        pytest.param(Challenge, {"nonce": bytes(32), "expires": 10**400}, id="challenge-expiry"),
        pytest.param(Status, {"state": "online", "at": 10**400}, id="status-time"),
        pytest.param(
            KeyResponse,
            {"nonce": bytes(32), "keys": [["k1", b"w", b"a", 10**400, 1.0]], "refused": []},
            id="key-lease-end",
        ),
        pytest.param(
            KeyResponse,
            {"nonce": bytes(32), "keys": [["k1", 2**70, b"a", 1.0, 1.0]], "refused": []},
            id="key-wrapped-as-huge-integer",
        ),
    ],
)
def test_a_malformed_field_is_a_format_error(message_type: Any, doc: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        message_type.decode(cbor2.dumps(doc))


def test_a_key_response_with_a_number_for_a_wrapped_key_is_rejected() -> None:
    """bytes(n) of an integer n is n zero bytes: a small payload must not turn into a key (or,
    for a large n, into gigabytes of zeros)."""
    payload = cbor2.dumps({"nonce": bytes(32), "keys": [["k1", 32, 16, 1.0, 1.0]], "refused": []})
    with pytest.raises(FormatError):
        KeyResponse.decode(payload)


def test_a_challenge_nonce_must_have_16_to_64_bytes() -> None:
    for size in (15, 65):
        with pytest.raises(FormatError, match="16 to 64"):
            Challenge.decode(cbor2.dumps({"nonce": bytes(size), "expires": 1.0}))
    assert Challenge.decode(cbor2.dumps({"nonce": bytes(16), "expires": 1})).expires == 1.0


@pytest.mark.parametrize(
    "key_ids",
    [[], ["k"] * 65, ["has space"], ["k-1"], ["é"], [1], ["k" * 65]],
    ids=["none", "too-many", "space", "dash", "non-ascii", "integer", "too-long"],
)
def test_a_key_request_names_1_to_64_plain_key_ids(key_ids: list[Any]) -> None:
    with pytest.raises(FormatError, match="key_ids"):
        KeyRequest.decode(cbor2.dumps({"evidence": b"e", "key_ids": key_ids}))


def test_a_status_has_a_known_state_and_a_short_report() -> None:
    with pytest.raises(FormatError, match="state"):
        Status.decode(cbor2.dumps({"state": "hacked", "at": 1.0}))
    long = Status.decode(Status("online", 1.0, "x" * 1000).encode())
    assert long.report == "x" * 300


# -- local API ----------------------------------------------------------------------------------


class FakeProtectedCode:
    """Our own invoke seam: records calls, answers from memory, raises InvokeError on request."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, entrypoint: str, value: Any) -> Any:
        with self.lock:
            self.calls.append((entrypoint, value))
        if entrypoint == "app:fail":
            raise InvokeError("protected code raised ValueError")
        if entrypoint == "app:slow":
            time.sleep(0.05)
        return {"entrypoint": entrypoint, "doubled": value * 2}


def _short_dir() -> Path:
    return Path(tempfile.mkdtemp(dir="/tmp", prefix="sr-"))  # Unix socket paths are short


def _remove(directory: Path) -> None:
    for p in directory.iterdir():
        p.unlink()
    directory.rmdir()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    directory = _short_dir()
    yield directory
    _remove(directory)


@pytest.fixture(scope="module")
def shared_api() -> Iterator[tuple[LocalApi, FakeProtectedCode]]:
    """One server for the module: stopping one waits out its 0.5 s poll interval."""
    directory, code = _short_dir(), FakeProtectedCode()
    server = LocalApi(directory / "agent.sock", code).start()
    yield server, code
    server.stop()
    _remove(directory)


@pytest.fixture
def api(shared_api: tuple[LocalApi, FakeProtectedCode]) -> LocalApi:
    return shared_api[0]


@pytest.fixture
def fake(shared_api: tuple[LocalApi, FakeProtectedCode]) -> FakeProtectedCode:
    code = shared_api[1]
    with code.lock:
        code.calls.clear()
    return code


def raw_request(path: Path, line: bytes) -> bytes:
    """What a client that speaks the socket protocol directly gets back for `line`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(line)
        with sock.makefile("rb") as f:
            return f.readline()


def test_the_socket_is_private_to_the_agents_user(api: LocalApi) -> None:
    mode = api.path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_a_call_returns_what_the_protected_code_returned(
    api: LocalApi, fake: FakeProtectedCode
) -> None:
    assert call(api.path, "app:double", [1, "a"]) == {
        "entrypoint": "app:double",
        "doubled": [1, "a", 1, "a"],
    }
    assert fake.calls == [("app:double", [1, "a"])]


def test_an_invoke_error_reaches_the_client_as_an_invoke_error(api: LocalApi) -> None:
    with pytest.raises(InvokeError, match="protected code raised ValueError"):
        call(api.path, "app:fail", 1)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"this is not json\n", "request is not valid JSON"),
        (b"\n", "request is not valid JSON"),
        (b'{"input": 3}\n', "request needs an 'entrypoint' string"),
        (b'{"entrypoint": 7, "input": 3}\n', "request needs an 'entrypoint' string"),
        (b'["app:double", 3]\n', "request needs an 'entrypoint' string"),
    ],
    ids=["not-json", "empty", "no-entrypoint", "entrypoint-not-text", "not-an-object"],
)
def test_a_malformed_request_gets_a_refusal_and_invokes_nothing(
    api: LocalApi, fake: FakeProtectedCode, line: bytes, error: str
) -> None:
    assert json.loads(raw_request(api.path, line)) == {"ok": False, "error": error}
    assert fake.calls == []


@pytest.mark.parametrize(
    "line",
    [b"\xff\xfe not utf-8 \xff\n", b"[" * 100_000 + b"\n"],
    ids=["invalid-utf-8", "nested-too-deep"],
)
def test_a_request_json_cannot_parse_still_gets_a_refusal(
    api: LocalApi, fake: FakeProtectedCode, line: bytes
) -> None:
    reply = raw_request(api.path, line)
    assert reply, "the agent closed the connection without an answer"
    assert json.loads(reply)["ok"] is False
    assert fake.calls == []


def test_the_agent_refuses_a_request_line_over_one_mib(
    api: LocalApi, fake: FakeProtectedCode
) -> None:
    head = b'{"entrypoint": "app:double", "input": "'
    line = head + b"x" * (MAX_REQUEST + 1 - len(head))  # no end in sight after 1 MiB
    assert json.loads(raw_request(api.path, line)) == {
        "ok": False,
        "error": "request larger than 1 MiB",
    }
    assert fake.calls == []
    assert call(api.path, "app:double", 2)["doubled"] == 4  # the agent still serves


@pytest.mark.parametrize("size", [MAX_REQUEST, 8 * MAX_REQUEST], ids=["just-over", "far-over"])
def test_a_call_over_one_mib_fails_with_our_own_error_and_invokes_nothing(
    api: LocalApi, fake: FakeProtectedCode, size: int
) -> None:
    with pytest.raises(StrongroomError, match="larger than 1 MiB"):
        call(api.path, "app:double", "x" * size)
    assert fake.calls == []


def test_a_burst_of_clients_each_get_their_own_answer(api: LocalApi) -> None:
    """Applications on the device may call at the same moment; none may be told the agent is
    unreachable because others got there first."""
    count = 32
    answers: dict[int, Any] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def client(i: int) -> None:
        start.wait(timeout=10)
        try:
            answers[i] = call(api.path, "app:slow", i, timeout=10)["doubled"]
        except StrongroomError as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert [str(e) for e in errors] == []
    assert answers == {i: 2 * i for i in range(count)}


def test_calling_an_agent_that_is_not_running_says_what_to_do(socket_dir: Path) -> None:
    with pytest.raises(InputError) as caught:
        call(socket_dir / "missing.sock", "app:double", 1, timeout=2)
    assert "cannot reach the agent" in str(caught.value)
    assert "strongroom agent run" in caught.value.diagnostics()


def test_stopping_the_api_removes_its_socket(socket_dir: Path, fake: FakeProtectedCode) -> None:
    server = LocalApi(socket_dir / "agent.sock", fake).start()
    server.stop()
    assert not (socket_dir / "agent.sock").exists()
    with pytest.raises(InputError):
        call(socket_dir / "agent.sock", "app:double", 1, timeout=2)


def test_a_socket_path_too_long_for_the_os_is_refused_up_front(
    socket_dir: Path, fake: FakeProtectedCode
) -> None:
    with pytest.raises(InputError, match="too long"):
        LocalApi(socket_dir / ("s" * 120), fake)
