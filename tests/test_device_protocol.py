"""The device protocol without sockets (agent/protocol.py): events and the time in, messages and
actions out. Then both of its drivers, the agent daemon and the simulator's virtual device, fed
the same scripted verifier exchange: what they publish and ask of the enclave must be the same."""

from __future__ import annotations

import asyncio
import logging
import random
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog
from structlog.testing import capture_logs

from agent.daemon import AgentConfig, AgentDaemon
from agent.pending import MemoryOutbox, Pending
from agent.protocol import (
    DeviceProtocol,
    LoadKeys,
    MakeEvidence,
    Output,
    ProtocolConfig,
    Publish,
    Revoke,
)
from device_sim.device import DeviceSpec, VirtualDevice
from device_sim.kit import Kit
from provisioning.enroll import enroll_device
from provisioning.home import FleetHome
from provisioning.seal import seal_artifact
from strongroom import cose, messages, topics
from strongroom.commands import Command, sign_command, verify_command
from strongroom.evidence import SR_SEQ
from strongroom.fsutil import read_file
from strongroom.mqtt import Inbound
from strongroom.retry import Backoff
from strongroom.signing import SigningKey, VerifyKey

DEVICE = "cam-p"
KEY = "ab" * 16
OTHER_KEY = "cd" * 16
T0 = 1_800_000_000.0
VERIFIER = SigningKey.generate()
Out = TypeVar("Out", Publish, MakeEvidence, LoadKeys, Revoke)


@pytest.fixture(autouse=True)
def _every_log_level() -> Iterator[None]:
    """Info events too, whatever level an earlier test's entry point configured."""
    before = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET))
    yield
    structlog.configure(**before)


def only(outputs: Sequence[Output], kind: type[Out]) -> Out:
    """The one output of a call, of the kind expected."""
    (out,) = outputs
    assert isinstance(out, kind), out
    return out


def topic(leaf: str, device: str = DEVICE) -> str:
    return topics.device_topic(device, leaf)


def make(
    keys: tuple[str, ...] = (KEY,), *, interval: float = 300.0, retry: float = 15.0
) -> DeviceProtocol:
    config = ProtocolConfig(
        DEVICE,
        VERIFIER.verify_key,
        {k: f"{k[:4]}.sra" for k in keys},
        attest_interval_s=interval,
        key_retry=Backoff(initial_s=retry, factor=2.0, cap_s=120.0, jitter=0.0),
    )
    return DeviceProtocol(config, MemoryOutbox())


def pending(p: DeviceProtocol) -> list[Pending]:
    assert isinstance(p.outbox, MemoryOutbox)
    return p.outbox.pending()


def challenge(nonce: bytes) -> bytes:
    return messages.Challenge(nonce, T0 + 60).encode()


def released(nonce: bytes, *key_ids: str, renew_at: float = T0 + 3000) -> bytes:
    keys = tuple(messages.ReleasedKey(k, b"w" * 40, b"aad", T0 + 3600, renew_at) for k in key_ids)
    return messages.KeyResponse(nonce, keys, ()).encode()


def revoke_command(device: str = DEVICE, key: SigningKey = VERIFIER) -> bytes:
    return sign_command(Command.revoke(device, "stolen", T0), key)


def status_of(out: Output) -> messages.Status:
    assert isinstance(out, Publish) and out.leaf == topics.STATUS and out.retain
    assert out.topic == topic(topics.STATUS)
    return messages.Status.decode(out.payload)


def online(p: DeviceProtocol, now: float = T0) -> None:
    """Connected, with its `online` announcement acknowledged."""
    announce = only(p.connected(now), Publish)
    assert status_of(announce).state == "online"
    assert p.published(announce, now) == []


def keyed(now: float = T0) -> DeviceProtocol:
    """Online, and the key of its one artifact released and loaded."""
    p = make()
    p.enclave_started((), (KEY,))
    online(p, now)
    make_evidence = only(
        p.received(topic(topics.CHALLENGE), challenge(b"n" * 32), now), MakeEvidence
    )
    request = only(p.evidence_made(make_evidence, b"token", now), Publish)
    p.published(request, now)
    load = only(p.received(topic(topics.KEYS_RESPONSE), released(b"n" * 32, KEY), now), LoadKeys)
    assert isinstance(load, LoadKeys)
    fresh = only(p.keys_loaded(load, {}, now), MakeEvidence)
    send = only(p.evidence_made(fresh, b"after-keys", now), Publish)
    p.published(send, now)
    return p


# -- connecting and the outbox -----------------------------------------------------------------


def test_on_connect_the_outbox_is_delivered_in_order_before_online() -> None:
    p = make(())
    p.outbox.put(topic(topics.EVIDENCE), b"first")
    p.outbox.put(topic(topics.EVIDENCE), b"second")
    one = only(p.connected(T0), Publish)
    assert isinstance(one, Publish) and (one.payload, one.leaf, one.qos) == (
        b"first",
        "evidence",
        1,
    )
    assert not one.retain and len(p.outbox) == 2  # removed only once acknowledged
    two = only(p.published(one, T0), Publish)
    assert isinstance(two, Publish) and two.payload == b"second"
    announce = only(p.published(two, T0), Publish)
    assert status_of(announce).state == "online"
    assert len(p.outbox) == 0 and p.sent == 2


def test_a_failed_send_keeps_it_and_the_rest_for_later_and_online_goes_all_the_same() -> None:
    p = make(())
    assert p.tick(T0 - 1) == [MakeEvidence(None)]  # its evidence at start (not followed here)
    p.outbox.put(topic(topics.EVIDENCE), b"first")
    p.outbox.put(topic(topics.EVIDENCE), b"second")
    one = only(p.connected(T0), Publish)
    with capture_logs() as logs:
        announce = only(p.publish_failed(one, "no acknowledgement", T0), Publish)
    assert status_of(announce).state == "online"
    assert [e["event"] for e in logs] == ["outbox_waits"]
    assert [i.payload for i in pending(p)] == [b"first", b"second"] and p.sent == 0
    again = only(p.tick(T0 + 1), Publish)  # still connected: tried again
    assert isinstance(again, Publish) and again.payload == b"first"


def test_evidence_made_while_disconnected_waits_in_the_outbox_until_the_next_connect() -> None:
    p = make(())
    evidence = only(p.attest(T0), MakeEvidence)
    assert evidence == MakeEvidence(None)  # the enclave's own nonce
    assert p.evidence_made(evidence, b"token", T0) == []
    assert len(p.outbox) == 1
    send = only(p.connected(T0 + 5), Publish)
    assert isinstance(send, Publish) and send.payload == b"token" and send.entry is not None


def test_one_outbox_entry_is_in_flight_at_a_time_and_the_next_follows_its_acknowledgement() -> None:
    p = make(())
    online(p)
    first = only(p.attest(T0), MakeEvidence)
    send = only(p.evidence_made(first, b"a", T0), Publish)
    second = only(p.attest(T0), MakeEvidence)
    assert p.evidence_made(second, b"b", T0) == []  # queued behind the one in flight
    assert p.tick(T0 + 2) == []  # not sent twice
    next_one = only(p.published(send, T0), Publish)
    assert isinstance(next_one, Publish) and next_one.payload == b"b"


# -- challenges, keys and leases -----------------------------------------------------------------


def test_a_challenge_while_a_key_is_missing_is_answered_with_a_key_request() -> None:
    p = make()
    p.enclave_started((), (KEY,))
    online(p)
    ask = only(p.received(topic(topics.CHALLENGE), challenge(b"c" * 32), T0), MakeEvidence)
    assert ask == MakeEvidence(b"c" * 32, (KEY,))
    with capture_logs() as logs:
        request = only(p.evidence_made(ask, b"token", T0), Publish)
    assert isinstance(request, Publish) and request.topic == topic(topics.KEYS_REQUEST)
    assert messages.KeyRequest.decode(request.payload) == messages.KeyRequest(b"token", (KEY,))
    assert not request.retain and request.entry is None  # not through the outbox
    assert [e["event"] for e in logs] == ["keys_requested"]


def test_a_key_request_waits_for_the_outbox_so_evidence_stays_in_sequence() -> None:
    p = make()
    p.enclave_started((), (KEY,))
    online(p)
    p.outbox.put(topic(topics.EVIDENCE), b"older")
    send = only(p.received(topic(topics.CHALLENGE), challenge(b"c" * 32), T0), Publish)
    assert isinstance(send, Publish) and send.payload == b"older"
    assert p.published(send, T0) == [MakeEvidence(b"c" * 32, (KEY,))]


def test_a_key_request_that_cannot_wait_for_the_outbox_becomes_evidence_behind_it() -> None:
    p = make()
    p.enclave_started((), (KEY,))
    online(p)
    p.outbox.put(topic(topics.EVIDENCE), b"older")
    send = only(p.received(topic(topics.CHALLENGE), challenge(b"c" * 32), T0), Publish)
    assert p.publish_failed(send, "broker gone", T0) == [MakeEvidence(b"c" * 32)]
    # and when the connection goes while it waits, the same
    p2 = make()
    p2.enclave_started((), (KEY,))
    online(p2)
    p2.outbox.put(topic(topics.EVIDENCE), b"older")
    p2.received(topic(topics.CHALLENGE), challenge(b"d" * 32), T0)
    assert p2.disconnected(T0) == [MakeEvidence(b"d" * 32)]


def test_with_every_key_a_challenge_is_answered_with_evidence_through_the_outbox() -> None:
    p = keyed()
    evidence = only(
        p.received(topic(topics.CHALLENGE), challenge(b"e" * 32), T0 + 10), MakeEvidence
    )
    assert evidence == MakeEvidence(b"e" * 32)
    send = only(p.evidence_made(evidence, b"token", T0 + 10), Publish)
    assert isinstance(send, Publish) and send.topic == topic(topics.EVIDENCE)
    assert send.entry is not None


def test_released_keys_are_loaded_their_lease_kept_and_fresh_evidence_follows() -> None:
    p = keyed()
    assert p.missing == {} and p.renew_at == {KEY: T0 + 3000}
    assert p.needed_keys(T0 + 2999) == [] and p.needed_keys(T0 + 3000) == [KEY]


def test_a_due_lease_is_renewed_at_the_next_challenge() -> None:
    p = keyed()
    ask = only(p.received(topic(topics.CHALLENGE), challenge(b"r" * 32), T0 + 3001), MakeEvidence)
    assert ask == MakeEvidence(b"r" * 32, (KEY,))


def test_unsealed_artifacts_renew_at_the_first_chance() -> None:
    p = make()
    p.enclave_started((KEY,), ())
    online(p)
    ask = only(p.received(topic(topics.CHALLENGE), challenge(b"u" * 32), T0), MakeEvidence)
    assert ask == MakeEvidence(b"u" * 32, (KEY,))


def test_a_key_response_to_no_request_of_ours_is_ignored() -> None:
    p = make()
    p.enclave_started((), (KEY,))
    online(p)
    with capture_logs() as logs:
        assert p.received(topic(topics.KEYS_RESPONSE), released(b"x" * 32, KEY), T0) == []
    assert [e["event"] for e in logs] == ["key_response_ignored"]
    ask = only(p.received(topic(topics.CHALLENGE), challenge(b"n" * 32), T0), MakeEvidence)
    p.evidence_made(ask, b"token", T0)
    assert p.received(topic(topics.KEYS_RESPONSE), released(b"x" * 32, KEY), T0) == []
    load = only(p.received(topic(topics.KEYS_RESPONSE), released(b"n" * 32, KEY), T0), LoadKeys)
    assert isinstance(load, LoadKeys) and [k.key_id for k in load.keys] == [KEY]
    # answered once: the same response again is no longer an answer
    assert p.received(topic(topics.KEYS_RESPONSE), released(b"n" * 32, KEY), T0) == []


def test_a_key_the_enclave_refuses_stays_missing_and_unknown_keys_are_not_loaded() -> None:
    p = make()
    p.enclave_started((), (KEY,))
    online(p)
    ask = only(p.received(topic(topics.CHALLENGE), challenge(b"n" * 32), T0), MakeEvidence)
    p.evidence_made(ask, b"token", T0)
    load = only(
        p.received(topic(topics.KEYS_RESPONSE), released(b"n" * 32, KEY, OTHER_KEY), T0), LoadKeys
    )
    assert isinstance(load, LoadKeys) and [k.key_id for k in load.keys] == [KEY]
    with capture_logs() as logs:
        p.keys_loaded(load, {KEY: "manifest signature"}, T0)
    assert [e["event"] for e in logs] == ["released_key_refused_by_enclave"]
    assert list(p.missing) == [KEY] and p.renew_at == {}


def test_keys_the_broker_refused_are_passed_on_for_the_record() -> None:
    p = make()
    p.enclave_started((), (KEY,))
    online(p)
    ask = only(p.received(topic(topics.CHALLENGE), challenge(b"n" * 32), T0), MakeEvidence)
    p.evidence_made(ask, b"token", T0)
    refusal = messages.KeyResponse(b"n" * 32, (), ((KEY, "below the floor"),)).encode()
    load = only(p.received(topic(topics.KEYS_RESPONSE), refusal, T0), LoadKeys)
    assert load == LoadKeys((), ((KEY, "below the floor"),))
    assert p.keys_loaded(load, {}, T0) == []  # nothing loaded, nothing to tell
    assert list(p.missing) == [KEY]


# -- timing ------------------------------------------------------------------------------------


def test_it_attests_at_start_and_then_every_interval() -> None:
    p = make((), interval=300)
    assert p.tick(T0) == [MakeEvidence(None)]
    assert p.tick(T0 + 299) == []
    assert p.next_tick_at(T0 + 10) == T0 + 300
    assert p.tick(T0 + 300) == [MakeEvidence(None)]
    assert p.tick(T0 - 50) == [MakeEvidence(None)]  # a clock set back counts as due


def test_a_connect_is_answered_by_a_challenge_so_its_own_evidence_waits_an_interval() -> None:
    p = make((), interval=300)
    online(p, T0)
    assert p.tick(T0 + 1) == []
    assert p.next_tick_at(T0 + 1) == T0 + 300
    assert p.tick(T0 + 300) == [MakeEvidence(None)]


def test_while_keys_are_missing_it_announces_again_to_be_challenged_backing_off() -> None:
    p = make(retry=15, interval=10_000)
    p.enclave_started((), (KEY,))
    p.tick(T0)  # its first evidence
    online(p, T0)
    assert p.tick(T0 + 14) == []
    assert p.next_tick_at(T0 + 14) == T0 + 15
    announce = only(p.tick(T0 + 15), Publish)
    assert status_of(announce).state == "online"
    p.published(announce, T0 + 15)
    # nothing came: the next after twice as long, and so on up to the cap
    assert p.tick(T0 + 44) == [] and p.next_tick_at(T0 + 44) == T0 + 45
    assert status_of(only(p.tick(T0 + 45), Publish)).state == "online"
    assert p.next_tick_at(T0 + 46) == T0 + 45 + 60
    p.disconnected(T0 + 50)
    assert p.tick(T0 + 200) == []  # not while away
    online(p, T0 + 300)  # a new connection starts again from the first delay
    assert p.next_tick_at(T0 + 301) == T0 + 315


def test_a_key_request_restarts_the_wait_before_announcing_again() -> None:
    p = make(retry=15)
    p.enclave_started((), (KEY,))
    p.tick(T0)
    online(p, T0)
    ask = only(p.received(topic(topics.CHALLENGE), challenge(b"k" * 32), T0 + 10), MakeEvidence)
    p.evidence_made(ask, b"token", T0 + 10)
    assert p.tick(T0 + 15) == []  # its request is 5 s old: the answer may be on its way
    assert p.next_tick_at(T0 + 15) == T0 + 25


def test_a_late_answer_to_an_earlier_request_of_ours_is_believed() -> None:
    p = make()
    p.enclave_started((), (KEY,))
    online(p)
    for nonce in (b"1" * 32, b"2" * 32):
        ask = only(p.received(topic(topics.CHALLENGE), challenge(nonce), T0), MakeEvidence)
        p.evidence_made(ask, b"token", T0)
    load = only(p.received(topic(topics.KEYS_RESPONSE), released(b"1" * 32, KEY), T0), LoadKeys)
    assert [k.key_id for k in load.keys] == [KEY]
    # the other request's answer brings nothing new: no longer believed
    assert p.received(topic(topics.KEYS_RESPONSE), released(b"2" * 32, KEY), T0) == []


def test_only_the_newest_outstanding_requests_are_remembered() -> None:
    p = make()
    p.enclave_started((), (KEY,))
    online(p)
    nonces = [bytes([65 + i]) * 32 for i in range(6)]
    for nonce in nonces:
        ask = only(p.received(topic(topics.CHALLENGE), challenge(nonce), T0), MakeEvidence)
        p.evidence_made(ask, b"token", T0)
    assert p.received(topic(topics.KEYS_RESPONSE), released(nonces[1], KEY), T0) == []
    only(p.received(topic(topics.KEYS_RESPONSE), released(nonces[2], KEY), T0), LoadKeys)


def test_a_revoked_device_does_not_ask_to_be_challenged() -> None:
    p = keyed()
    revoke = only(p.received(topic(topics.COMMAND), revoke_command(), T0), Revoke)
    assert isinstance(revoke, Revoke)
    p.revoke_done(revoke, "stolen", T0)
    assert p.needed_keys(T0) == [KEY] and p.revoked
    assert p.tick(T0 + 100) == []


# -- revocation ------------------------------------------------------------------------------


def test_a_verifier_signed_revoke_is_obeyed_once_and_confirmed_with_its_nonce() -> None:
    p = keyed()
    payload = revoke_command()
    nonce = verify_command(payload, VERIFIER.verify_key).nonce
    revoke = only(p.received(topic(topics.COMMAND), payload, T0), Revoke)
    assert revoke == Revoke(payload, nonce)
    confirm = only(p.revoke_done(revoke, "stolen", T0), Publish)
    status = status_of(confirm)
    assert (status.state, status.report, status.command) == ("revoked", "stolen", nonce)
    assert list(p.missing) == [KEY] and p.renew_at == {}
    assert p.received(topic(topics.COMMAND), payload, T0 + 1) == []  # its retained copy
    assert p.received(topic(topics.COMMAND), b"", T0 + 1) == []  # a cleared retained command


def test_keys_released_again_after_a_reinstatement_end_the_revoked_state() -> None:
    p = keyed()
    revoke = only(p.received(topic(topics.COMMAND), revoke_command(), T0), Revoke)
    p.revoke_done(revoke, "stolen", T0)
    ask = only(p.received(topic(topics.CHALLENGE), challenge(b"m" * 32), T0), MakeEvidence)
    assert ask == MakeEvidence(b"m" * 32, (KEY,))
    p.evidence_made(ask, b"token", T0)
    load = only(p.received(topic(topics.KEYS_RESPONSE), released(b"m" * 32, KEY), T0), LoadKeys)
    assert only(p.keys_loaded(load, {}, T0), MakeEvidence) == MakeEvidence(None)
    assert not p.revoked


def test_an_answer_to_a_key_request_made_before_a_revocation_is_not_believed_after_it() -> None:
    p = make()
    p.enclave_started((), (KEY,))
    online(p)
    ask = only(p.received(topic(topics.CHALLENGE), challenge(b"a" * 32), T0), MakeEvidence)
    p.published(only(p.evidence_made(ask, b"token", T0), Publish), T0)
    revoke = only(p.received(topic(topics.COMMAND), revoke_command(), T0 + 1), Revoke)
    p.revoke_done(revoke, "stolen", T0 + 1)
    with capture_logs() as logs:
        assert p.received(topic(topics.KEYS_RESPONSE), released(b"a" * 32, KEY), T0 + 2) == []
    assert [e["event"] for e in logs] == ["key_response_ignored"]
    assert p.revoked and list(p.missing) == [KEY]


def test_a_new_enclave_forgets_the_requests_of_the_one_before() -> None:
    p = make()
    p.enclave_started((), (KEY,))
    online(p)
    ask = only(p.received(topic(topics.CHALLENGE), challenge(b"a" * 32), T0), MakeEvidence)
    p.evidence_made(ask, b"token", T0)
    p.enclave_started((), (KEY,))
    assert p.received(topic(topics.KEYS_RESPONSE), released(b"a" * 32, KEY), T0) == []


def test_a_revoked_device_stays_revoked_until_a_released_key_actually_loads() -> None:
    p = keyed()
    revoke = only(p.received(topic(topics.COMMAND), revoke_command(), T0), Revoke)
    p.revoke_done(revoke, "stolen", T0)
    ask = only(p.received(topic(topics.CHALLENGE), challenge(b"b" * 32), T0), MakeEvidence)
    p.published(only(p.evidence_made(ask, b"token", T0), Publish), T0)
    load = only(p.received(topic(topics.KEYS_RESPONSE), released(b"b" * 32, KEY), T0), LoadKeys)
    assert p.revoked  # not before the enclave took a key
    assert p.keys_loaded(load, {KEY: "refused"}, T0) == []
    assert p.revoked and list(p.missing) == [KEY]


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        pytest.param(revoke_command(key=SigningKey.generate()), "signature", id="forged"),
        pytest.param(revoke_command(device="cam-q"), "addressed to cam-q", id="not-ours"),
        pytest.param(b"\xa0", "command", id="malformed"),
    ],
)
def test_a_command_that_does_not_hold_is_reported_not_obeyed(payload: bytes, why: str) -> None:
    p = keyed()
    with capture_logs() as logs:
        report = only(p.received(topic(topics.COMMAND), payload, T0), Publish)
    status = status_of(report)
    assert status.state == "online" and status.report.startswith("ignored a command: ")
    assert why in status.report.lower() or why in status.report
    assert [e["event"] for e in logs] == ["command_ignored"]
    assert not p.revoked and p.missing == {}


def test_a_revoke_the_enclave_refuses_is_reported() -> None:
    p = keyed()
    revoke = only(p.received(topic(topics.COMMAND), revoke_command(), T0), Revoke)
    assert isinstance(revoke, Revoke)
    report = only(p.revoke_failed(revoke, "command refused: bad", T0), Publish)
    assert status_of(report).report == "ignored a command: command refused: bad"
    assert not p.revoked


# -- bad input ---------------------------------------------------------------------------------


def test_bad_input_is_logged_and_answered_with_nothing() -> None:
    p = keyed()
    with capture_logs() as logs:
        assert p.received(topic(topics.CHALLENGE), b"\xff", T0) == []
        assert p.received(topic(topics.KEYS_RESPONSE), b"not cbor", T0) == []
        assert p.received("elsewhere/entirely", b"x", T0) == []
        assert p.received(topic(topics.CHALLENGE, "cam-q"), challenge(b"q" * 32), T0) == []
        assert p.received(topic(topics.RESULT), b"x", T0) == []  # not the protocol's to read
    events = [e["event"] for e in logs]
    assert events == ["message_rejected", "message_rejected", "message_rejected"]


def test_a_defect_met_by_one_message_is_logged_and_the_device_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = keyed()

    def broken(payload: bytes, now: float) -> list[Output]:
        raise KeyError("a defect")

    monkeypatch.setattr(p, "_on_challenge", broken)
    with capture_logs() as logs:
        assert p.received(topic(topics.CHALLENGE), challenge(b"z" * 32), T0) == []
    assert [(e["event"], e["error"]) for e in logs] == [("message_failed", "KeyError")]


def test_its_subscriptions_and_will() -> None:
    p = make()
    assert p.subscriptions() == (
        topic(topics.CHALLENGE),
        topic(topics.KEYS_RESPONSE),
        topic(topics.COMMAND),
    )
    will_topic, will_payload = p.will()
    assert will_topic == topic(topics.STATUS)
    assert messages.Status.decode(will_payload).state == "offline"
    bye = only(p.goodbye(T0), Publish)
    assert status_of(bye).state == "offline"


# -- both drivers, one protocol ------------------------------------------------------------------


class Enclave:
    """A scripted enclave both drivers share the shape of: evidence numbered in the order made
    (signed with one fixed key, so both drivers' tokens are the same bytes), key loads and
    revocations recorded."""

    def __init__(self, result_key: VerifyKey, known_nonces: set[bytes]) -> None:
        self.result_key, self.known = result_key, known_nonces
        self.key = SigningKey(b"\x07" * 32)
        self.calls: list[tuple[str, Any]] = []

    def evidence(self, nonce: bytes | None) -> bytes:
        # the daemon picks a nonce of its own where the simulator lets the enclave pick one
        self.calls.append(("evidence", nonce if nonce in self.known else "own"))
        seq = sum(call == "evidence" for call, _ in self.calls)
        return cose.sign({SR_SEQ: seq}, self.key, DEVICE.encode())

    def load(self, key_id: str) -> None:
        self.calls.append(("load", key_id))

    def revoke(self, command: bytes) -> str:
        self.calls.append(("revoke", command))
        return verify_command(command, self.result_key).reason


class DaemonHost:
    def __init__(self, enclave: Enclave, by_path: dict[Path, str]) -> None:
        self.enclave, self.by_path = enclave, by_path

    def evidence(self, nonce: bytes) -> bytes:
        return self.enclave.evidence(nonce)

    def load_artifact(self, path: Path, key: Any = None) -> None:
        self.enclave.load(self.by_path[path])

    def revoke(self, command: bytes) -> str:
        return self.enclave.revoke(command)


class DaemonMqtt:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, bool]] = []

    def publish(self, topic: str, payload: bytes, **options: Any) -> None:
        self.published.append((topic, payload, bool(options.get("retain"))))


class SimAttester:
    def __init__(self, enclave: Enclave) -> None:
        self.enclave = enclave

    async def evidence(self, nonce: bytes | None = None) -> bytes:
        return self.enclave.evidence(nonce)

    async def open_artifact(self, path: Path, key_id: str, wrapped: bytes, aad: bytes) -> None:
        self.enclave.load(key_id)

    async def revoke(self, command: bytes) -> str:
        return self.enclave.revoke(command)


class SimClient:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, bool]] = []

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.published.append((topic, payload, retain))


def _script(device: str, key_id: str, result_signer: SigningKey) -> list[tuple[str, bytes]]:
    """A verifier's side of an exchange: a challenge, a revoke while its key request is out and
    that request's late answer, a reinstatement's challenge and keys, a stale response, the
    revoke's retained copy, a forged command, garbage, a second revoke and a challenge then."""
    n1, n2, n3, n4 = b"1" * 32, b"2" * 32, b"3" * 32, b"4" * 32
    keys = (
        messages.ReleasedKey(key_id, b"w" * 40, b"aad", time.time() + 3600, time.time() + 3000),
    )
    command = sign_command(Command.revoke(device, "stolen", time.time()), result_signer)
    again = sign_command(Command.revoke(device, "again", time.time()), result_signer)
    forged = sign_command(Command.revoke(device, "forged", time.time()), SigningKey.generate())

    def t(leaf: str) -> str:
        return topics.device_topic(device, leaf)

    return [
        (t(topics.CHALLENGE), messages.Challenge(n1, time.time() + 60).encode()),
        (t(topics.COMMAND), command),
        (t(topics.KEYS_RESPONSE), messages.KeyResponse(n1, keys, ()).encode()),  # pre-revoke
        (t(topics.CHALLENGE), messages.Challenge(n2, time.time() + 60).encode()),
        (t(topics.KEYS_RESPONSE), messages.KeyResponse(n2, keys, ()).encode()),  # reinstated
        (t(topics.CHALLENGE), messages.Challenge(n3, time.time() + 60).encode()),
        (t(topics.KEYS_RESPONSE), messages.KeyResponse(n2, keys, ()).encode()),  # stale
        (t(topics.COMMAND), command),  # the retained copy, after a reconnect say
        (t(topics.COMMAND), forged),
        (t(topics.CHALLENGE), b"\xff garbage"),
        (t(topics.COMMAND), again),
        (t(topics.CHALLENGE), messages.Challenge(n4, time.time() + 60).encode()),
    ]


def _normalised(published: list[tuple[str, bytes, bool]]) -> list[tuple[str, bool, Any]]:
    """What was published, the time stamps of statuses left out."""
    out: list[tuple[str, bool, Any]] = []
    for t, payload, retain in published:
        leaf = topics.parse(t)[1]
        if leaf == topics.STATUS:
            s = messages.Status.decode(payload)
            out.append((t, retain, (s.state, s.report, s.command)))
        elif leaf == topics.KEYS_REQUEST:
            r = messages.KeyRequest.decode(payload)
            out.append((t, retain, (r.evidence, r.key_ids)))
        else:
            out.append((t, retain, payload))
    return out


def test_the_daemon_and_the_simulators_devices_run_the_same_protocol(
    tmp_path: Path, fleet_home: FleetHome
) -> None:
    kit = Kit(fleet_home, tmp_path / "sim")
    bundle = kit.bundle(DEVICE)
    bundle.parent.mkdir(parents=True)
    enroll_device(fleet_home, DEVICE, bundle)
    source = tmp_path / "model.bin"
    source.write_bytes(b"weights" * 100)
    kit.model.parent.mkdir(parents=True)
    seal_artifact(fleet_home, source, kit.model, name="sim-model", version=2, kind="model")
    signer_pem = read_file(fleet_home.root / "verifier" / "result-signing.key", "result key")
    result_signer = SigningKey.from_pem(signer_pem)

    # the daemon, over a recording stand-in for the paho adapter and the enclave host
    config = AgentConfig(
        bundle=bundle,
        broker_host="127.0.0.1",
        broker_port=1,
        image=tmp_path / "enclave.img",
        artifacts=(kit.model,),
        state_dir=tmp_path / "state",
        socket=tmp_path / "agent.sock",
    )
    daemon = AgentDaemon(config)
    (key_id,) = daemon.by_key
    script = _script(DEVICE, key_id, result_signer)
    nonces = {b"1" * 32, b"2" * 32, b"3" * 32, b"4" * 32}
    daemon_enclave = Enclave(fleet_home.result_verify_key(), nonces)
    daemon.host = DaemonHost(daemon_enclave, {kit.model: key_id})  # type: ignore[assignment]
    daemon_mqtt = DaemonMqtt()
    daemon.mqtt = daemon_mqtt  # type: ignore[assignment]
    daemon.protocol.enclave_started((), (key_id,))
    daemon._drive(daemon.protocol.connected(time.time()))
    for t, payload in script:
        daemon.handle(Inbound(t, payload, False))

    # a virtual device, over a recording stand-in for its aiomqtt connection and its enclave
    spec = DeviceSpec(DEVICE, "healthy", "inline", "localhost", 1, 30.0, 5.0, DEVICE)

    async def simulated() -> tuple[VirtualDevice, Enclave, SimClient]:
        device = VirtualDevice(kit, spec, asyncio.Event())
        enclave = Enclave(fleet_home.result_verify_key(), nonces)
        client = SimClient()
        device.attester, device.client = SimAttester(enclave), client  # type: ignore[assignment]
        device.protocol.enclave_started((), (device.key_id,))
        await device._drive(device.protocol.connected(time.time()))
        for t, payload in script:
            await device._on_message(t, payload)
        return device, enclave, client

    device, sim_enclave, sim_client = asyncio.run(simulated())

    assert type(device.protocol) is type(daemon.protocol) is DeviceProtocol
    assert device.key_id == key_id
    published = _normalised(daemon_mqtt.published)
    assert published == _normalised(sim_client.published)
    assert daemon_enclave.calls == sim_enclave.calls
    # and what that was, in short
    leaves = [
        (topics.parse(t)[1], what if topics.parse(t)[1] == "status" else None)
        for t, _r, what in published
    ]
    assert [leaf for leaf, _ in leaves] == [
        "status",  # online
        "keys/request",  # the key missing
        "status",  # revoked (the late answer to the request before it ignored)
        "keys/request",  # revoked: the key missing
        "evidence",  # reinstated: after loading it
        "evidence",  # the third challenge (the stale answer and the retained copy ignored)
        "status",  # the forged command reported
        "status",  # revoked again
        "keys/request",  # the key missing again
    ]
    states = [what[0] for leaf, what in leaves if leaf == "status" and what is not None]
    assert states == ["online", "revoked", "online", "revoked"]
    assert [c for c, _ in daemon_enclave.calls] == [
        "evidence",
        "revoke",
        "evidence",
        "load",
        "evidence",
        "evidence",
        "revoke",
        "evidence",
    ]
    assert daemon.sent == device.protocol.sent == 2


# -- purity ------------------------------------------------------------------------------------


def test_the_key_retry_delay_draws_no_random_number() -> None:
    before = random.getstate()
    p = make()
    p.enclave_started((), (KEY,))
    online(p)
    for n in range(5):
        p.tick(T0 + 200 * (n + 1))
    assert p.next_tick_at(T0 + 1000) > T0 + 1000
    assert random.getstate() == before


def test_a_key_retry_with_jitter_is_refused() -> None:
    with pytest.raises(ValueError, match="jitter"):
        ProtocolConfig(DEVICE, VERIFIER.verify_key, {}, key_retry=Backoff(jitter=0.5))


def test_the_protocol_and_its_outbox_types_import_no_io() -> None:
    code = (
        "import sys; import agent.protocol, agent.pending; "
        "bad = {'paho', 'aiomqtt', 'sqlite3', 'agent.outbox', 'agent.host', 'strongroom.mqtt'}"
        " & set(sys.modules); print(sorted(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
