"""The device protocol without sockets (agent/protocol.py): events and the time in, messages and
actions out. Then both of its drivers, the agent daemon and the simulator's virtual device, fed
the same scripted verifier exchange: what they publish and ask of the enclave must be the same."""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import cbor2
import pytest
import structlog
from structlog.testing import capture_logs

from agent.daemon import AgentDaemon
from agent.errors import EnclaveError
from agent.outbox import Outbox
from agent.pending import MemoryOutbox, Pending
from agent.protocol import (
    OUTBOX_RETRY_S,
    Agenda,
    DeviceProtocol,
    EvidenceMade,
    Failed,
    LoadKeys,
    MakeEvidence,
    Output,
    ProtocolConfig,
    Publish,
    Published,
    Revoke,
    Stop,
)
from device_sim.device import DeviceSpec, SimClock, VirtualDevice
from device_sim.kit import Kit
from provisioning.enroll import enroll_device
from provisioning.home import FleetHome
from provisioning.seal import seal_artifact
from strongroom import cose, messages, topics
from strongroom.commands import Command, sign_command, verify_command
from strongroom.evidence import SR_SEQ
from strongroom.fsutil import read_file
from strongroom.mqtt import Inbound, MqttError
from strongroom.retry import Backoff
from strongroom.signing import SigningKey, VerifyKey
from tests.fleet import offline_agent_config

DEVICE = "cam-p"
KEY = "ab" * 16
OTHER_KEY = "cd" * 16
T0 = 1_800_000_000.0
VERIFIER = SigningKey.generate()
Out = TypeVar("Out", Publish, MakeEvidence, LoadKeys, Revoke, Stop)


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


def test_a_failed_send_is_tried_again_only_a_retry_later_whoever_ticks() -> None:
    p = make(())
    online(p)
    evidence = only(p.attest(T0), MakeEvidence)
    send = only(p.evidence_made(evidence, b"token", T0), Publish)
    assert p.publish_failed(send, "no acknowledgement", T0) == []
    assert p.next_tick_at(T0) == T0 + OUTBOX_RETRY_S
    assert p.tick(T0 + 0.2) == [] and p.tick(T0 + OUTBOX_RETRY_S - 0.01) == []
    again = only(p.tick(T0 + OUTBOX_RETRY_S), Publish)
    assert again.payload == b"token"
    assert p.publish_failed(again, "still not", T0 + OUTBOX_RETRY_S) == []
    assert p.tick(T0 + OUTBOX_RETRY_S + 0.2) == []  # the next a retry after this one


def test_next_tick_at_is_exactly_when_tick_has_something_to_do() -> None:
    p = make(interval=300, retry=15)
    p.enclave_started((KEY,), ())  # unsealed: a lease renewed at once
    online(p)
    load = LoadKeys((messages.ReleasedKey(KEY, b"w", b"a", T0 + 9000, T0 + 100),))
    p.keys_loaded(load, {}, T0)  # its renewal at T0 + 100 (fresh evidence asked: not followed)
    for now in (T0 + 1, T0 + 50, T0 + 99.9):
        at = p.next_tick_at(now)
        assert p.tick(now) == [] and at > now
    assert p.next_tick_at(T0 + 99.9) == T0 + 100  # the lease's renewal: ask to be challenged
    assert status_of(only(p.tick(T0 + 100), Publish)).state == "online"


def test_a_clock_set_back_brings_one_of_each_not_a_burst() -> None:
    p = make(interval=300, retry=15)
    p.enclave_started((), (KEY,))
    online(p, T0)
    back = T0 - 3600
    assert p.next_tick_at(back) == back  # due now, not in an hour and a bit
    out = p.tick(back)
    announce, evidence = out  # `online` again, its evidence
    assert isinstance(announce, Publish) and isinstance(evidence, MakeEvidence)
    p.published(announce, back)
    assert p.tick(back + 0.2) == [] and p.tick(back + 10) == []
    assert p.next_tick_at(back + 10) == back + 30  # the retry after the first, backing off


def test_the_enclave_failing_to_make_evidence_stops_the_device() -> None:
    p = make(())
    evidence = only(p.tick(T0), MakeEvidence)
    with capture_logs() as logs:
        stop = only(p.report(evidence, Failed("the platform refused to quote"), T0), Stop)
    assert "could not make evidence: the platform refused to quote" in stop.reason
    assert [e["event"] for e in logs] == ["evidence_not_made"]
    # and the agenda both drivers follow has nothing after it
    agenda = Agenda(p, [stop, MakeEvidence(None)])
    assert agenda.next() == stop and agenda.next() is None and agenda.stopped == stop.reason


def test_results_map_to_their_events_and_a_result_that_does_not_fit_raises() -> None:
    p = make(())
    online(p)
    evidence = only(p.attest(T0), MakeEvidence)
    send = only(p.report(evidence, EvidenceMade(b"token"), T0), Publish)
    assert p.report(send, Published(), T0) == [] and p.sent == 1
    with pytest.raises(TypeError, match="Published is no result of MakeEvidence"):
        p.report(evidence, Published(), T0)


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
    """The enclave host as the daemon sees it: started, artifacts needing keys, stopped."""

    def __init__(self, enclave: Enclave, by_path: dict[Path, str]) -> None:
        self.enclave, self.by_path = enclave, by_path

    def start(self, image: Path) -> None:
        pass

    def stop(self) -> None:
        pass

    def evidence(self, nonce: bytes) -> bytes:
        return self.enclave.evidence(nonce)

    def load_artifact(self, path: Path, key: Any = None) -> None:
        if key is None:
            raise EnclaveError("no sealed key")  # a fresh state: it needs the fleet's
        self.enclave.load(self.by_path[path])

    def revoke(self, command: bytes) -> str:
        return self.enclave.revoke(command)


# ("msg", topic, payload) | ("time", t) | ("fail_publish",) | ("drop",), then while away
# ("time", t) only right before a ("refuse",), and ("back",)
Step = tuple[Any, ...]


class Script:
    """One verifier exchange, shared by the fakes of both drivers' connections: the steps in
    order, and what each fake published (topic, qos, retain, what it was)."""

    def __init__(self, steps: list[Step], clock_at: float) -> None:
        self.steps, self.at = list(steps), 0
        self.t = clock_at
        self.fail_next, self.away = False, False
        self.published: list[tuple[str, int, bool, Any]] = []

    def record(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """A publish: recorded, or failed once after a `fail_publish` step."""
        if self.fail_next:
            self.fail_next = False
            self.published.append((topic, qos, retain, "failed"))
            raise ConnectionError("the broker did not acknowledge it (scripted)")
        self.published.append((topic, qos, retain, _kind(topic, payload)))


def _kind(t: str, payload: bytes) -> Any:
    """What a publish was, the time stamps of statuses left out."""
    leaf = topics.parse(t)[1]
    if leaf == topics.STATUS:
        s = messages.Status.decode(payload)
        return (s.state, s.report, s.command)
    if leaf == topics.KEYS_REQUEST:
        r = messages.KeyRequest.decode(payload)
        return ("request", cose_seq(r.evidence), r.key_ids)
    return ("evidence", cose_seq(payload))


def cose_seq(token: bytes) -> int:
    return int(cbor2.loads(cose.parse(token, "evidence").payload)[SR_SEQ])


class DaemonMqtt:
    """The paho adapter's seam (`strongroom.mqtt.MqttClient`) as the daemon uses it, fed from
    the script: each `receive` takes the next step (a message, the time passing, a publish
    that will fail, the connection dropped and back), and the end of the script stops the
    agent."""

    def __init__(self, script: Script, stop: threading.Event) -> None:
        self.script, self._stop_agent = script, stop
        self.connected = threading.Event()
        self._dropped = False

    def subscribe(self, topic: str) -> None:
        pass

    def start(self) -> DaemonMqtt:
        self.connected.set()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        pass

    def publish(self, topic: str, payload: bytes, **options: Any) -> None:
        if not self.connected.is_set():  # the adapter refuses; recorded, as no driver should
            self.script.published.append((topic, 0, False, "while disconnected"))
            raise MqttError("not connected")
        try:
            self.script.record(topic, payload, options.get("qos", 1), bool(options.get("retain")))
        except ConnectionError as e:
            raise MqttError(str(e)) from e

    def receive(self, timeout: float) -> Inbound | None:
        s = self.script
        while s.at < len(s.steps):
            step = s.steps[s.at]
            s.at += 1
            if step[0] == "msg":
                return Inbound(step[1], step[2], False)
            if step[0] == "time":
                s.t = step[1]
                return None
            if step[0] == "fail_publish":
                s.fail_next = True
            elif step[0] == "drop":
                self.connected.clear()
                return None
            elif step[0] == "back":
                self.connected.set()
                return None
            # "refuse": a connection attempt the paho adapter makes and keeps to itself
        self._stop_agent.set()
        return None


class SimAttester:
    def __init__(self, enclave: Enclave) -> None:
        self.enclave = enclave

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def evidence(self, nonce: bytes | None = None) -> bytes:
        return self.enclave.evidence(nonce)

    async def open_artifact(self, path: Path, key_id: str, wrapped: bytes, aad: bytes) -> None:
        self.enclave.load(key_id)

    async def revoke(self, command: bytes) -> str:
        return self.enclave.revoke(command)


class ScriptClock(SimClock):
    """The simulator's clock seam, on the script's time. The script moves on only once the
    device's loop is waiting again having seen the time of the last step (a `settled` loop),
    so both drivers see each step alone and in the same order."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self._gen, self._seen, self._waiting, self._spins = 0, -1, False, 0
        self._watchers: list[asyncio.Future[None]] = []

    def now(self) -> float:
        return self.script.t

    def _change(self) -> asyncio.Future[None]:
        """A future resolved at the next change (registered at once: no change is missed)."""
        future = asyncio.get_running_loop().create_future()
        self._watchers.append(future)
        return future

    def _changed(self) -> None:
        watchers, self._watchers = self._watchers, []
        for future in watchers:
            if not future.done():
                future.set_result(None)

    async def wait(self, message: asyncio.Future[Any], until: float) -> bool:
        if until <= self.now() and not message.done():  # due already: the loop's tick is next
            self._spins += 1
            assert self._spins < 100, "the loop spins: what is due is never done (no tick?)"
            await asyncio.sleep(0)  # a turn for the rest of the loop, as a real wait gives
            return message.done()
        self._spins = 0
        try:
            while not message.done() and self.now() < until:
                changed = self._change()
                self._waiting, self._seen = True, self._gen
                self._changed_but(changed)
                await asyncio.wait([message, changed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiting = False
        return message.done()

    def _changed_but(self, mine: asyncio.Future[None]) -> None:
        watchers, self._watchers = self._watchers, [mine]
        for future in watchers:
            if future is not mine and not future.done():
                future.set_result(None)

    async def settled(self) -> None:
        while not (self._waiting and self._seen == self._gen):
            await self._change()

    async def advance(self, t: float) -> None:
        await self.settled()
        self.script.t, self._gen = t, self._gen + 1
        self._changed()
        await self.settled()


class SimMessage:
    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic, self.payload = topic, payload


class SimClient:
    """aiomqtt's client as a virtual device uses it, fed from the script: its `messages` yield
    the script's messages (the time passing through the clock), a `drop` ends this connection
    as a broker fault does, and the end of the script stops the device."""

    def __init__(self, script: Script, clock: ScriptClock, stop: asyncio.Event) -> None:
        self.script, self.clock, self.stop = script, clock, stop

    async def __aenter__(self) -> SimClient:
        """Connecting: after a `drop`, the steps up to `back` are the time away (a `time`, told
        the protocol before the next attempt) and the attempts refused (`refuse`)."""
        s = self.script
        while s.away and s.at < len(s.steps):
            step = s.steps[s.at]
            s.at += 1
            if step[0] == "time":
                s.t = step[1]
            elif step[0] == "refuse":
                raise aiomqtt.MqttError("Connection refused (scripted)")
            elif step[0] == "back":
                s.away = False
            else:
                raise AssertionError(f"{step[0]} while away")
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def subscribe(self, topic: str, qos: int = 0) -> None:
        pass

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        try:
            self.script.record(topic, payload, qos, retain)
        except ConnectionError as e:
            raise aiomqtt.MqttError(str(e)) from e

    @property
    def messages(self) -> AsyncIterator[SimMessage]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[SimMessage]:
        s = self.script
        while s.at < len(s.steps):
            step = s.steps[s.at]
            await self.clock.settled()
            s.at += 1
            if step[0] == "msg":
                yield SimMessage(step[1], step[2])
            elif step[0] == "time":
                await self.clock.advance(step[1])
            elif step[0] == "fail_publish":
                s.fail_next = True
            elif step[0] == "drop":
                s.away = True
                raise aiomqtt.MqttError("Disconnected during message iteration (scripted)")
        await self.clock.settled()
        self.stop.set()
        await asyncio.Event().wait()  # until cancelled


def _steps(device: str, key_id: str, result_signer: SigningKey, t0: float) -> list[Step]:
    """A verifier's side of an exchange, with the connection's faults and the time passing: a
    challenge, a revoke while its key request is out and that request's late answer, a
    reinstatement, the keys' load, a publish that fails and its retry, the interval passing,
    a drop and the reconnect, a stale response, the revoke's retained copy, a forged command,
    garbage, a second revoke, the key retry's announcements, and the end."""
    n = [bytes([48 + i]) * 32 for i in range(8)]
    keys = (messages.ReleasedKey(key_id, b"w" * 40, b"aad", t0 + 3600, t0 + 3000),)
    command = sign_command(Command.revoke(device, "stolen", t0), result_signer)
    again = sign_command(Command.revoke(device, "again", t0), result_signer)
    forged = sign_command(Command.revoke(device, "forged", t0), SigningKey.generate())

    def msg(leaf: str, payload: bytes) -> Step:
        return ("msg", topics.device_topic(device, leaf), payload)

    def challenge(nonce: bytes) -> Step:
        return msg(topics.CHALLENGE, messages.Challenge(nonce, t0 + 60).encode())

    def response(nonce: bytes) -> Step:
        return msg(topics.KEYS_RESPONSE, messages.KeyResponse(nonce, keys, ()).encode())

    return [
        challenge(n[1]),
        ("time", t0 + 14),  # not yet the key retry's
        ("time", t0 + 15),  # nothing came: `online` again
        msg(topics.COMMAND, command),
        response(n[1]),  # answers a request from before the revoke: ignored
        ("time", t0 + 20),
        challenge(n[2]),
        ("fail_publish",),  # the fresh evidence after the keys load
        response(n[2]),  # reinstated
        ("time", t0 + 20.5),  # before the outbox's retry
        ("time", t0 + 21.5),  # its retry
        ("time", t0 + 55),  # the interval: its own evidence
        challenge(n[3]),
        ("drop",),
        ("refuse",),
        ("time", t0 + 90),  # the interval while away: its own evidence waits in the outbox
        ("refuse",),
        ("back",),  # the outbox first, then `online`
        response(n[2]),  # stale
        msg(topics.COMMAND, command),  # the retained copy, after the reconnect
        msg(topics.COMMAND, forged),
        msg(topics.CHALLENGE, b"\xff garbage"),
        msg(topics.COMMAND, again),
        ("time", t0 + 104),
        ("time", t0 + 106),  # revoked: no key retry
        challenge(n[4]),  # revoked: a key request all the same (the fleet may reinstate)
        ("time", t0 + 200),  # the interval again
    ]


# what the protocol logs (the drivers log events of their own besides)
PROTOCOL_EVENTS = {
    "outbox_waits",
    "reply_not_sent",
    "status_not_published",
    "keys_requested",
    "key_response_ignored",
    "key_refused",
    "artifact_loaded_with_released_key",
    "released_key_refused_by_enclave",
    "revoked",
    "command_ignored",
    "message_rejected",
    "message_failed",
    "evidence_not_made",
}


def _publish_shape(published: list[tuple[str, int, bool, Any]]) -> list[tuple[str, Any]]:
    return [(topics.parse(t)[1], kind) for t, _q, _r, kind in published]


@dataclass
class BothRuns:
    key_id: str
    daemon: AgentDaemon
    device: VirtualDevice
    daemon_script: Script
    sim_script: Script
    daemon_enclave: Enclave
    sim_enclave: Enclave
    daemon_events: list[str]
    sim_events: list[str]
    daemon_error: Exception | None


def _run_both(
    tmp_path: Path,
    fleet_home: FleetHome,
    steps_of: Callable[[str, SigningKey], list[Step]],
    enclave_class: type[Enclave] = Enclave,
) -> BothRuns:
    """The daemon's `run()` over fakes of the paho adapter and the enclave host, and a virtual
    device's `run()` over fakes of its aiomqtt connection and its attester, each on the
    script's clock, fed the same steps."""
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
    nonces = {bytes([48 + i]) * 32 for i in range(8)}
    interval = 30.0

    short = Path(tempfile.mkdtemp(prefix="sr-", dir="/tmp"))  # a socket path's length limit
    config = offline_agent_config(
        tmp_path,
        bundle,
        artifacts=(kit.model,),
        socket=short / "agent.sock",
        attest_interval_s=interval,
    )
    daemon_script = Script([], T0)
    daemon = AgentDaemon(config, clock=lambda: daemon_script.t)
    (key_id,) = daemon.by_key
    steps = steps_of(key_id, result_signer)
    daemon_script.steps = list(steps)
    daemon_enclave = enclave_class(fleet_home.result_verify_key(), nonces)
    daemon.host = DaemonHost(daemon_enclave, {kit.model: key_id})  # type: ignore[assignment]
    stop = threading.Event()
    daemon.mqtt = DaemonMqtt(daemon_script, stop)  # type: ignore[assignment]
    daemon_error: Exception | None = None
    try:
        with capture_logs() as logs:
            daemon.run(stop)
    except EnclaveError as e:
        daemon_error = e
    finally:
        shutil.rmtree(short, ignore_errors=True)
    daemon_events = [e["event"] for e in logs if e["event"] in PROTOCOL_EVENTS]

    sim_script = Script(list(steps), T0)
    spec = DeviceSpec(DEVICE, "healthy", "inline", "localhost", 1, 30.0, 5.0, DEVICE, interval)
    sim_enclave = enclave_class(fleet_home.result_verify_key(), nonces)

    async def simulated() -> VirtualDevice:
        stopped = asyncio.Event()
        clock = ScriptClock(sim_script)
        device = VirtualDevice(kit, spec, stopped, clock)
        device.attester = SimAttester(sim_enclave)

        def connect(will: bool = True) -> SimClient:
            return SimClient(sim_script, clock, stopped)

        device._client = connect  # type: ignore[assignment,method-assign]
        await asyncio.wait_for(device.run(), 60)
        return device

    with capture_logs() as logs:
        device = asyncio.run(simulated())
    sim_events = [e["event"] for e in logs if e["event"] in PROTOCOL_EVENTS]
    assert device.key_id == key_id
    return BothRuns(
        key_id,
        daemon,
        device,
        daemon_script,
        sim_script,
        daemon_enclave,
        sim_enclave,
        daemon_events,
        sim_events,
        daemon_error,
    )


def test_the_daemon_and_the_simulators_devices_run_the_same_protocol(
    tmp_path: Path, fleet_home: FleetHome
) -> None:
    """Both real loops (the daemon's `run`, the device's `run` with its session, reconnects and
    goodbye), each over an in-memory fake of its own connection seam and the script's clock,
    fed the same exchange: the same publishes (topic, QoS, retain, what) and enclave calls."""
    runs = _run_both(tmp_path, fleet_home, lambda k, signer: _steps(DEVICE, k, signer, T0))
    key_id, daemon, device = runs.key_id, runs.daemon, runs.device
    daemon_script, sim_script = runs.daemon_script, runs.sim_script
    daemon_enclave, sim_enclave = runs.daemon_enclave, runs.sim_enclave
    daemon_events, sim_events = runs.daemon_events, runs.sim_events
    assert runs.daemon_error is None
    published = daemon_script.published
    assert published == sim_script.published
    assert daemon_enclave.calls == sim_enclave.calls
    assert daemon_events == sim_events
    assert daemon.sent == device.protocol.sent == 5
    assert not daemon.protocol.connected_now and not device.protocol.connected_now
    # and what that was
    ask = ("request", (key_id,))
    assert [
        (
            leaf,
            what if isinstance(what, str) else (what[0], what[2 if leaf == "keys/request" else 1]),
        )
        for leaf, what in _publish_shape(daemon_script.published)
    ] == [
        ("status", ("online", "")),
        ("keys/request", ask),  # the key missing
        ("status", ("online", "")),  # the key retry: challenge me again
        ("status", ("revoked", "stolen")),  # the late answer to the request before ignored
        ("keys/request", ask),  # revoked: the key missing
        ("evidence", "failed"),  # reinstated: evidence after loading it, not acknowledged
        ("evidence", ("evidence", 3)),  # the outbox's retry
        ("evidence", ("evidence", 4)),  # the interval
        ("evidence", ("evidence", 5)),  # the third challenge
        ("evidence", ("evidence", 6)),  # made while away, delivered before `online`
        ("status", ("online", "")),  # back (the stale answer and the retained copy ignored)
        ("status", ("online", "ignored a command: bad strongroom/command/v1 signature")),
        ("status", ("revoked", "again")),
        ("keys/request", ask),  # the fourth challenge: the key missing again
        ("evidence", ("evidence", 8)),  # the interval
        ("status", ("offline", "")),  # the goodbye
    ]
    assert all(q == 1 and r == (topics.parse(t)[1] == "status") for t, q, r, _ in published)


def test_a_command_obeyed_before_a_restart_is_not_obeyed_again_after_it(
    tmp_path: Path, fleet_home: FleetHome
) -> None:
    bundle = tmp_path / DEVICE
    enroll_device(fleet_home, DEVICE, bundle)
    config = offline_agent_config(tmp_path, bundle)
    signer_pem = read_file(fleet_home.root / "verifier" / "result-signing.key", "result key")
    command = sign_command(Command.revoke(DEVICE, "stolen", T0), SigningKey.from_pem(signer_pem))
    retained = Inbound(topics.device_topic(DEVICE, topics.COMMAND), command, True)
    calls = []
    for _start in range(2):
        daemon = AgentDaemon(config)
        enclave = Enclave(fleet_home.result_verify_key(), set())
        daemon.host = DaemonHost(enclave, {})  # type: ignore[assignment]
        daemon.mqtt = DaemonMqtt(Script([], T0), threading.Event())  # type: ignore[assignment]
        daemon.mqtt.connected.set()
        daemon.handle(retained)
        calls.append([c for c, _ in enclave.calls])
    assert calls == [["revoke"], []]  # the second start ignores the retained copy
    kept = tmp_path / "state" / "last-command"
    assert kept.read_bytes() == verify_command(command, fleet_home.result_verify_key()).nonce
    assert kept.stat().st_mode & 0o777 == 0o600


def test_the_agents_outbox_drains_without_listing_its_directory_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = Outbox(tmp_path / "outbox")
    for i in range(5):
        before.put(topic(topics.EVIDENCE), b"e%d" % i)
    outbox = Outbox(tmp_path / "outbox")  # a restart: the index read from the directory once
    assert len(outbox) == 5

    def listed(*args: object) -> None:
        raise AssertionError("the outbox listed its directory")

    monkeypatch.setattr(Path, "glob", listed)
    p = DeviceProtocol(make().config, outbox)
    out = p.connected(T0)
    drained = []
    while out and isinstance(out[0], Publish) and out[0].leaf == topics.EVIDENCE:
        drained.append(out[0].payload)
        out = p.published(out[0], T0)
    assert drained == [b"e%d" % i for i in range(5)] and len(outbox) == 0
    assert list((tmp_path / "outbox").iterdir()) == []
    outbox.put(topic(topics.EVIDENCE), b"e5")  # numbered after the last, never reused
    assert [i.entry for i in outbox.pending()] == [5]


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


class BrokenEnclave(Enclave):
    """An enclave that cannot make evidence (its platform refuses to quote, say)."""

    def evidence(self, nonce: bytes | None) -> bytes:
        self.calls.append(("evidence", nonce if nonce in self.known else "own"))
        raise EnclaveError("the platform refused to quote")


def test_both_drivers_stop_when_the_enclave_cannot_make_evidence(
    tmp_path: Path, fleet_home: FleetHome
) -> None:
    def steps(key_id: str, signer: SigningKey) -> list[Step]:
        challenge = messages.Challenge(b"1" * 32, T0 + 60).encode()
        later = messages.Challenge(b"2" * 32, T0 + 60).encode()
        return [
            ("msg", topic(topics.CHALLENGE), challenge),
            ("msg", topic(topics.CHALLENGE), later),  # never read: stopped
            ("time", T0 + 1000),
        ]

    runs = _run_both(tmp_path, fleet_home, steps, BrokenEnclave)
    assert isinstance(runs.daemon_error, EnclaveError)
    assert "could not make evidence" in str(runs.daemon_error)
    assert any(e.startswith("stopped: ") for e in runs.device.report.errors)
    assert runs.daemon_script.published == runs.sim_script.published
    assert _publish_shape(runs.daemon_script.published) == [
        ("status", ("online", "", b"")),
        ("status", ("offline", "", b"")),  # the goodbye
    ]
    assert runs.daemon_enclave.calls == runs.sim_enclave.calls == [("evidence", b"1" * 32)]
    assert runs.daemon_events == runs.sim_events == ["evidence_not_made"]
