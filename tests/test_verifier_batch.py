"""The verifier takes what has already arrived as one batch: evidence runs are appraised with one
freshness transaction and one result transaction, in arrival order, with the same verdicts as one
at a time. The MQTT adapter is replaced by an in-memory recorder (our own seam); evidence, the
store and the crypto are real."""

from __future__ import annotations

from strongroom import messages, topics
from strongroom.ear import verify_result
from strongroom.mqtt import Inbound
from tests.verifier_rig import Rig
from verifier.store import Candidate, Freshness


def test_a_batch_appraises_each_evidence_and_publishes_each_result(rig: Rig) -> None:
    batch = [rig.evidence("cam-a"), rig.evidence("cam-b"), rig.evidence("cam-a")]
    rig.verifier.handle_batch(batch)
    assert rig.mqtt.results(rig.home) == [("cam-a", 1), ("cam-b", 1), ("cam-a", 2)]
    assert rig.verifier.counts["appraised_affirming"] == 3
    stored = rig.store.result("cam-a")
    assert stored is not None
    assert verify_result(stored.token, rig.home.result_verify_key()).details["seq"] == 2


def test_late_evidence_in_a_batch_does_not_replace_the_newer_result(rig: Rig) -> None:
    first, second = rig.evidence("cam-a"), rig.evidence("cam-a")
    rig.verifier.handle_batch([second, first])  # arrived out of order
    assert rig.mqtt.results(rig.home) == [("cam-a", 2)]
    assert rig.verifier.counts["appraised_affirming"] == 2  # both appraised, once each
    stored = rig.store.result("cam-a")
    assert stored is not None
    assert verify_result(stored.token, rig.home.result_verify_key()).details["seq"] == 2


def test_bad_messages_in_a_batch_are_rejected_alone(rig: Rig) -> None:
    good = rig.evidence("cam-b")
    garbage = Inbound(topics.device_topic("cam-a", topics.EVIDENCE), b"\xffnot cose", False)
    wrong_topic = Inbound(topics.device_topic("cam-a", topics.EVIDENCE), good.payload, False)
    rig.verifier.handle_batch([garbage, wrong_topic, good, good])  # and a redelivery
    assert rig.mqtt.results(rig.home) == [("cam-b", 1)]
    assert rig.verifier.counts["rejected"] == 2
    assert rig.verifier.counts["duplicates"] == 1
    alerts = [t for t, _p, _r in rig.mqtt.published if t == topics.ALERTS]
    assert len(alerts) == 2


def test_messages_after_evidence_see_its_effect(rig: Rig) -> None:
    # a status in the middle of a batch is handled after the evidence before it, in order
    ev = rig.evidence("cam-a")
    status = Inbound(
        topics.device_topic("cam-a", topics.STATUS), messages.Status("online", 1.0).encode(), True
    )
    rig.verifier.handle_batch([ev, status])
    leaves = [t.rsplit("/", 1)[1] for t, _p, _r in rig.mqtt.published]
    assert leaves == ["result", "challenge"]


def test_store_batch_gives_the_same_verdicts_as_one_at_a_time(rig: Rig) -> None:
    h = [bytes([i]) * 32 for i in range(4)]
    items = [
        Candidate("cam-a", b"n1", 5, h[0]),
        Candidate("cam-a", b"n2", 5, h[1]),  # another token with a used seq: replay
        Candidate("cam-b", b"n3", 1, h[2]),
        Candidate("cam-a", b"n4", 4, h[3]),  # out of order, within the window
        Candidate("cam-a", b"n1", 5, h[0]),  # redelivery of the first
    ]
    verdicts = rig.store.accept_batch(items, 1000.0)
    assert [(v.freshness, v.newest) for v in verdicts] == [
        (Freshness.PERIODIC, True),
        (Freshness.REPLAY, False),
        (Freshness.PERIODIC, True),
        (Freshness.PERIODIC, False),
        (Freshness.DUPLICATE, False),  # still the highest's token, whatever came late
    ]
    assert rig.store.last_seq("cam-a") == 5
