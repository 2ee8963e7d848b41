"""The verifier against a hostile device: absurd but validly signed tokens, retained copies of
what must not be retained, floods of status messages, confirmations of revocations never sent,
and faults of its own store and broker. The MQTT adapter is the in-memory recorder (our own seam);
tokens, signatures and the SQLite store are real."""

from __future__ import annotations

import math
import sqlite3
from typing import Any

import cbor2
import pytest

from strongroom import messages, topics
from strongroom.commands import verify_command
from strongroom.mqtt import Inbound
from tests.tokens import resigned
from tests.verifier_rig import Rig
from verifier.audit import AuditLog
from verifier.operator import audit_path


def _resigned(rig: Rig, device_id: str, **changes: Any) -> bytes:
    return resigned(rig.bundle(device_id), device_id, rig.evidence(device_id).payload, **changes)


def _evidence(device_id: str, token: bytes, *, retain: bool = False) -> Inbound:
    return Inbound(topics.device_topic(device_id, topics.EVIDENCE), token, retain)


def _status(device_id: str, status: messages.Status, *, retain: bool = False) -> Inbound:
    return Inbound(topics.device_topic(device_id, topics.STATUS), status.encode(), retain)


def _alerts(rig: Rig) -> list[messages.Alert]:
    return [messages.Alert.decode(p) for p, _r in rig.mqtt.on(topics.ALERTS)]


def _audit_events(rig: Rig, event: str) -> list[dict[str, Any]]:
    return [e for e in AuditLog(audit_path(rig.home)).entries() if e["event"] == event]


@pytest.mark.parametrize(
    "changes",
    [{"iat": math.inf}, {"seq": 2**64 + 7}, {"seq": -1}, {"iat": math.nan}, {"seq": "7"}],
    ids=["iat-inf", "seq-2^64+7", "seq-negative", "iat-nan", "seq-text"],
)
def test_a_validly_signed_absurd_token_is_rejected_and_the_verifier_goes_on(
    rig: Rig, changes: dict[str, Any]
) -> None:
    poison = _evidence("cam-a", _resigned(rig, "cam-a", **changes))
    good = rig.evidence("cam-b")
    rig.verifier.handle_batch([poison, good])
    assert rig.mqtt.results(rig.home) == [("cam-b", 1)]  # the good one in the same batch
    assert rig.verifier.counts["rejected"] == 1
    assert [a.device_id for a in _alerts(rig)] == ["cam-a"]
    assert rig.store.last_seq("cam-a") == 0  # nothing recorded for the poison
    rig.verifier.handle_batch([rig.evidence("cam-a")])  # and the device's next evidence counts
    assert rig.mqtt.results(rig.home)[-1][0] == "cam-a"


def test_a_defect_met_by_one_message_rejects_that_message_alone(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import verifier.pipeline  # noqa: PLC0415 - the module whose pure appraisal is replaced

    real = verifier.pipeline.appraise

    def appraise(ev: Any, policy: Any, record: Any) -> Any:
        if ev.device_id == "cam-a":
            raise ZeroDivisionError("a defect in appraisal")
        return real(ev, policy, record)

    monkeypatch.setattr(verifier.pipeline, "appraise", appraise)
    batch = [rig.evidence("cam-a"), rig.evidence("cam-b"), rig.evidence("cam-b")]
    rig.verifier.handle_batch(batch)
    assert rig.mqtt.results(rig.home) == [("cam-b", 1), ("cam-b", 2)]
    assert rig.verifier.counts["internal_errors"] == 1
    (alert,) = _alerts(rig)
    assert alert.device_id == "cam-a"
    assert "internal error (ZeroDivisionError)" in alert.reason


def test_retained_evidence_is_ignored_and_cleared(rig: Rig) -> None:
    topic = topics.device_topic("cam-a", topics.EVIDENCE)
    rig.verifier.handle_batch([_evidence("cam-a", rig.evidence("cam-a").payload, retain=True)])
    assert rig.mqtt.results(rig.home) == []
    assert rig.store.last_seq("cam-a") == 0
    assert (topic, b"", True) in rig.mqtt.published  # cleared from the broker's store
    assert rig.verifier.counts["retained_cleared"] == 1
    rig.verifier.handle_batch([_evidence("cam-a", b"", retain=True)])  # the cleared copy
    assert rig.verifier.counts["retained_cleared"] == 1
    request = messages.KeyRequest(rig.evidence("cam-a").payload, ("k1",)).encode()
    retained_request = Inbound(topics.device_topic("cam-a", topics.KEYS_REQUEST), request, True)
    rig.verifier.handle_batch([retained_request])
    assert rig.mqtt.on(topics.KEYS_RESPONSE) == []
    assert rig.verifier.counts["retained_cleared"] == 2


def test_a_burst_of_online_status_issues_a_bounded_number_of_challenges(rig: Rig) -> None:
    online = _status("cam-a", messages.Status("online", 1.0))
    rig.verifier.handle_batch([online] * 500)
    limit = rig.verifier.config.limits.status.burst
    challenges = rig.mqtt.on(topics.CHALLENGE)
    assert 1 <= len(challenges) <= limit
    with sqlite3.connect(rig.root / "state.sqlite") as db:
        (nonces,) = db.execute("SELECT count(*) FROM nonces WHERE device_id = 'cam-a'").fetchone()
    assert nonces == len(challenges)
    flooding = [a for a in _alerts(rig) if "flooding" in a.reason]
    assert len(flooding) == 1
    assert rig.verifier.counts["status_suppressed"] == 500 - len(challenges)


def test_a_device_cannot_confirm_a_revocation_it_was_never_sent(rig: Rig) -> None:
    forged = messages.Status("revoked", 1.0, command=b"n" * 16)
    rig.verifier.handle_batch([_status("cam-a", forged)] * 100)
    assert _audit_events(rig, "revocation_confirmed") == []
    assert rig.verifier.devices["cam-a"].status == "active"
    assert len(_alerts(rig)) <= rig.verifier.config.limits.alerts.burst + 1


def test_a_revocation_is_confirmed_once_with_the_nonce_of_its_command(rig: Rig) -> None:
    rig.verifier.revoke("cam-a", "test")
    ((signed, retained),) = rig.mqtt.on(topics.COMMAND)
    assert retained
    command = verify_command(signed, rig.home.result_verify_key())
    wrong = messages.Status("revoked", 2.0, command=b"x" * 16)
    rig.verifier.handle_batch([_status("cam-a", wrong)])
    assert _audit_events(rig, "revocation_confirmed") == []
    confirm = messages.Status("revoked", 2.0, command=command.nonce)
    rig.verifier.handle_batch([_status("cam-a", confirm)])
    (entry,) = _audit_events(rig, "revocation_confirmed")
    assert entry["device"] == "cam-a"
    rejected = rig.verifier.counts["rejected"]
    rig.verifier.handle_batch([_status("cam-a", confirm)])  # again, live: rejected
    assert rig.verifier.counts["rejected"] == rejected + 1
    rig.verifier.handle_batch([_status("cam-a", confirm, retain=True)])  # the broker's copy
    assert rig.verifier.counts["rejected"] == rejected + 1
    assert len(_audit_events(rig, "revocation_confirmed")) == 1


def test_evidence_of_a_revoked_device_does_not_resend_its_command(rig: Rig) -> None:
    rig.verifier.revoke("cam-a", "test")
    rig.verifier.handle_batch([rig.evidence("cam-a") for _ in range(5)])
    assert len(rig.mqtt.on(topics.COMMAND)) == 1  # the retained command stands


def _challenged(rig: Rig, device_id: str) -> bytes:
    rig.verifier.handle_batch([_status(device_id, messages.Status("online", 1.0))])
    (challenge_payload, _r) = rig.mqtt.on(topics.CHALLENGE)[-1]
    return messages.Challenge.decode(challenge_payload).nonce


def test_a_failed_key_response_publish_is_not_held_against_the_device(rig: Rig) -> None:
    """The broker went away as the response was sent: nothing the device did was wrong. The
    decision (the challenge answered, the refusal audited) is committed, so the request is
    acknowledged, not retried; a redelivery of it is a duplicate and is not rejected either."""
    nonce = _challenged(rig, "cam-a")
    request = messages.KeyRequest(rig.evidence("cam-a", nonce).payload, ("nosuchkey",)).encode()
    msg = Inbound(topics.device_topic("cam-a", topics.KEYS_REQUEST), request, False)
    rig.mqtt.fail_on = topics.KEYS_RESPONSE
    assert rig.verifier.commit([msg])
    assert rig.mqtt.acked == [msg]
    assert rig.verifier.counts.get("rejected", 0) == 0
    assert rig.verifier.counts.get("internal_errors", 0) == 0
    assert rig.verifier.counts["replies_not_published"] == 1
    from prometheus_client import generate_latest  # noqa: PLC0415 - a fleet extra

    text = generate_latest(rig.verifier.metrics.registry).decode()
    assert "strongroom_replies_not_published_total 1.0" in text
    assert _alerts(rig) == []
    assert [e["detail"]["key_id"] for e in _audit_events(rig, "key_refused")] == ["nosuchkey"]
    rig.mqtt.fail_on = ""
    assert rig.verifier.commit([msg])  # the broker's redelivery: answered already, no blame
    assert rig.verifier.counts.get("rejected", 0) == 0
    assert _alerts(rig) == []


def _releasable_key(rig: Rig, device_id: str) -> str:
    from provisioning.keystore import KeyEntry, ReleasePolicy  # noqa: PLC0415

    signer = rig.verifier.pipeline.verified(device_id, rig.evidence(device_id).payload)
    release = ReleasePolicy((signer.enclave.mrsigner,))
    rig.verifier.keystore.put(KeyEntry("k1", "model", 1, "model", "00" * 32, release), bytes(32))
    return "k1"


def test_a_released_key_whose_response_could_not_be_published_is_audited_as_such(
    rig: Rig,
) -> None:
    """The audit says `key_released` when the key was wrapped for the enclave, and then that
    its response never left: an auditor does not take it for a key the device holds."""
    key_id = _releasable_key(rig, "cam-a")
    nonce = _challenged(rig, "cam-a")
    request = messages.KeyRequest(rig.evidence("cam-a", nonce).payload, (key_id,)).encode()
    rig.mqtt.fail_on = topics.KEYS_RESPONSE
    assert rig.verifier.commit(
        [Inbound(topics.device_topic("cam-a", topics.KEYS_REQUEST), request, False)]
    )
    assert [e["detail"]["key_id"] for e in _audit_events(rig, "key_released")] == [key_id]
    (entry,) = _audit_events(rig, "key_response_not_published")
    assert entry["device"] == "cam-a" and entry["detail"]["key_ids"] == [key_id]
    assert rig.verifier.counts["replies_not_published"] == 1


def test_a_key_response_does_not_hold_the_loop_until_the_broker_acknowledges_it(
    rig: Rig,
) -> None:
    """The driven loop does the network too: a wait for each PUBACK is a wait of every message
    behind it (up to 10 s on a slow broker). paho keeps the response in flight instead."""
    key_id = _releasable_key(rig, "cam-a")
    nonce = _challenged(rig, "cam-a")
    request = messages.KeyRequest(rig.evidence("cam-a", nonce).payload, (key_id,)).encode()
    rig.verifier.handle_key_request("cam-a", request)
    (response, _retain) = rig.mqtt.on(topics.KEYS_RESPONSE)[0]
    assert [k.key_id for k in messages.KeyResponse.decode(response).keys] == [key_id]
    assert rig.mqtt.waited.count(topics.device_topic("cam-a", topics.KEYS_RESPONSE)) == 0


def test_a_challenge_that_cannot_be_sent_is_not_held_against_the_device(rig: Rig) -> None:
    rig.mqtt.fail_on = topics.CHALLENGE
    msg = _status("cam-a", messages.Status("online", 1.0))
    assert rig.verifier.commit([msg])
    assert rig.mqtt.acked == [msg]
    assert rig.verifier.counts.get("rejected", 0) == 0
    assert rig.verifier.counts["replies_not_published"] == 1
    assert _alerts(rig) == []


def test_a_failed_publish_inside_an_evidence_batch_is_not_held_against_its_devices(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish that fails after the commit, for one device's result, is the transport's fault
    and that device's alone: the others of the batch are still counted, logged and acted on (a
    contraindicated one revoked, a garbage one rejected and alerted). The batch is acknowledged,
    so nothing would come again to make up for what was skipped."""
    import dataclasses  # noqa: PLC0415

    from strongroom.mqtt import MqttError  # noqa: PLC0415

    real = rig.verifier.pipeline._appraised

    def appraised(ev: Any, result: Any) -> None:
        if ev.device_id == "cam-a":
            raise MqttError("not connected")
        real(ev, result)

    monkeypatch.setattr(rig.verifier.pipeline, "_appraised", appraised)
    rig.verifier.policy = dataclasses.replace(rig.verifier.policy, min_firmware="99.0.0")
    garbage = _evidence("cam-a", b"\xffjunk")
    batch = [rig.evidence("cam-a"), rig.evidence("cam-b"), garbage]
    assert rig.verifier.commit(batch)
    assert rig.mqtt.acked == batch
    assert rig.verifier.counts["replies_not_published"] == 1
    assert rig.verifier.counts.get("internal_errors", 0) == 0
    assert rig.verifier.counts["appraised_contraindicated"] == 1  # cam-b's
    assert rig.verifier.devices["cam-b"].status == "revoked"
    assert rig.verifier.counts["rejected"] == 1  # the garbage alone
    alerts = [(a.severity, a.device_id) for a in _alerts(rig)]
    assert alerts == [("critical", "cam-b"), ("warning", "cam-a")]
    assert rig.store.last_seq("cam-a") == 1  # committed: a redelivery is a duplicate


def test_a_result_that_could_not_be_published_goes_out_at_the_next_connect(rig: Rig) -> None:
    """The retained result failed to go out after its commit (the broker gone): counted, and
    published from the store when the loop sees the connection back, whatever the device's
    challenge rate (the device did nothing to spend it); once, not at every connect."""
    rig.mqtt.connected.clear()
    assert rig.verifier.commit([rig.evidence("cam-a"), rig.evidence("cam-b")])
    assert rig.mqtt.results(rig.home) == []
    assert rig.verifier.counts["replies_not_published"] == 2
    rig.mqtt.connected.set()
    assert rig.verifier.commit([rig.evidence("cam-b")])  # cam-b's next result went out
    rig.mqtt.connected.clear()
    for _ in range(int(rig.verifier.config.limits.challenges.burst)):
        rig.verifier.challenges.within_rate("cam-a")  # its challenge rate spent
    turns: list[bool] = []

    def stop() -> bool:  # the connection comes back at the second turn, drops, comes back
        turns.append(True)
        if len(turns) in (2, 4):
            rig.mqtt.connected.set()
        elif len(turns) == 3:
            rig.mqtt.connected.clear()
        return len(turns) > 4

    rig.verifier.run(stop)
    assert rig.mqtt.results(rig.home) == [("cam-b", 2), ("cam-a", 1)]


def test_revocations_stale_results_and_alerts_do_not_hold_the_loop_for_acknowledgements(
    rig: Rig,
) -> None:
    """The driven loop does the network too: each wait for a PUBACK (up to 10 s on a slow
    broker, per device when many go silent) held every message behind it. paho keeps them in
    flight and sends them again after a reconnect."""
    from verifier.operator import ACTIVE, REVOKED, set_status  # noqa: PLC0415

    rig.verifier.reload()
    rig.verifier.handle_batch([rig.evidence("cam-b")])
    rig.verifier.mark_stale(rig.verifier.clock() + 1)  # cam-b: a stale result and an alert
    set_status(rig.home, "cam-a", REVOKED, reason="lost", by="operator")
    rig.verifier.reload()  # a revoke command and a critical alert
    set_status(rig.home, "cam-a", ACTIVE, reason="found", by="operator")
    rig.verifier.reload()  # the command cleared, a challenge
    leaves = [t.split("/", 2)[-1] for t, _p, _r in rig.mqtt.published]
    assert {"result", "alerts", "command", "challenge"} <= set(leaves)
    assert rig.mqtt.waited == []


class _FailingStore:
    """The real store, whose batch commits fail `failures` times first (a locked database)."""

    def __init__(self, store: Any, failures: int) -> None:
        self._store, self.failures = store, failures
        self.transient_errors = store.transient_errors

    def accept_batch(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database is locked")
        return self._store.accept_batch(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_batch_the_store_cannot_commit_is_not_acknowledged_and_is_tried_again(rig: Rig) -> None:
    rig.verifier.store = _FailingStore(rig.store, failures=1)  # type: ignore[assignment]
    batch = [rig.evidence("cam-a"), rig.evidence("cam-b")]
    assert not rig.verifier.commit(batch)
    assert rig.mqtt.acked == []
    assert rig.mqtt.results(rig.home) == []
    assert rig.verifier.commit(batch)
    assert rig.mqtt.acked == batch
    assert rig.mqtt.results(rig.home) == [("cam-a", 1), ("cam-b", 1)]


def test_a_redelivered_last_evidence_publishes_its_stored_result_again(rig: Rig) -> None:
    ev = rig.evidence("cam-a")
    rig.verifier.handle_batch([ev])
    rig.mqtt.published.clear()  # as if the result never left before a crash
    rig.verifier.handle_batch([ev])
    assert rig.mqtt.results(rig.home) == [("cam-a", 1)]
    assert rig.verifier.counts["duplicates"] == 1
    assert rig.verifier.counts["appraised_affirming"] == 1


def test_a_retained_poison_cannot_be_handed_to_the_verifier_at_every_start(rig: Rig) -> None:
    poison = _resigned(rig, "cam-a", iat=math.inf)
    for _start in range(3):  # each start, the broker hands its retained copy over
        rig.verifier.handle_batch([_evidence("cam-a", poison, retain=True)])
    assert rig.verifier.counts.get("rejected", 0) == 0
    cleared = [p for p, r in rig.mqtt.on(topics.EVIDENCE) if r]
    assert cleared == [b"", b"", b""]
    assert cbor2.loads(rig.mqtt.on(topics.ALERTS)[0][0])["device"] == "cam-a"


def test_the_metrics_count_what_a_flooding_device_had_dropped(rig: Rig) -> None:
    from prometheus_client import generate_latest  # noqa: PLC0415 - a fleet extra

    online = _status("cam-a", messages.Status("online", 1.0))
    rig.verifier.handle_batch([online] * 30)
    rig.verifier.handle_batch([_evidence("cam-b", rig.evidence("cam-b").payload, retain=True)])
    text = generate_latest(rig.verifier.metrics.registry).decode()
    limit = int(rig.verifier.config.limits.status.burst)
    assert f'strongroom_rate_limited_total{{kind="status"}} {30 - limit}.0' in text
    assert "strongroom_retained_cleared_total 1.0" in text


def test_a_device_the_verifier_revokes_has_its_certificate_put_on_hold(rig: Rig) -> None:
    from provisioning import ca, crl  # noqa: PLC0415 - the fleet CA's side

    serial = ca.cert_info((rig.bundle("cam-a") / "tls" / "client.pem").read_bytes()).serial
    assert crl.read_crl(rig.home)[1].reason(serial) is None
    rig.verifier.revoke("cam-a", "contraindicated")
    assert crl.read_crl(rig.home)[1].reason(serial) == ca.HOLD


def test_periodic_challenges_follow_the_policy_whatever_the_device_rate_limit(rig: Rig) -> None:
    limits = rig.verifier.config.limits.challenges
    for _ in range(int(limits.burst) * 3):  # the verifier's own challenges, at any pace
        rig.verifier.challenge("cam-a")
    assert len(rig.mqtt.on(topics.CHALLENGE)) == int(limits.burst) * 3
    assert rig.verifier.counts.get("challenges_suppressed", 0) == 0


def test_a_devices_flood_cannot_silence_its_revocation_alert(rig: Rig) -> None:
    junk = _evidence("cam-a", b"\xffjunk")
    rig.verifier.handle_batch([junk] * 40)  # its warning alerts run out
    assert rig.verifier.counts["alerts_suppressed"] > 0
    rig.verifier.revoke("cam-a", "x" * 10_000)  # and a reason longer than an alert may carry
    critical = [a for a in _alerts(rig) if a.severity == "critical"]
    assert [a.device_id for a in critical] == ["cam-a"]
    assert len(critical[0].reason) <= 1000


def test_a_contraindicated_result_delivered_again_makes_sure_of_the_revocation(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses  # noqa: PLC0415

    rig.verifier.policy = dataclasses.replace(rig.verifier.policy, min_firmware="99.0.0")
    ev = rig.evidence("cam-a")
    with monkeypatch.context() as m:  # committed, then a crash before the revocation was made
        m.setattr(rig.verifier.pipeline, "_appraised", lambda *_a: None)
        rig.verifier.handle_batch([ev])
    assert rig.verifier.devices["cam-a"].status == "active"
    assert rig.mqtt.on(topics.COMMAND) == []
    rig.verifier.handle_batch([ev])  # the broker delivers it again
    assert rig.verifier.devices["cam-a"].status == "revoked"
    assert len(rig.mqtt.on(topics.COMMAND)) == 1


def test_only_evidence_and_key_requests_are_subscribed_with_retain_as_published(
    rig: Rig,
) -> None:
    rig.verifier.run(stop=lambda: True)
    assert rig.mqtt.subscribed == {
        "fleet/+/evidence": True,
        "fleet/+/keys/request": True,
        "fleet/+/status": False,  # live status is retained by design: seen as live
    }
