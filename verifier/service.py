"""The fleet verifier and key broker: the MQTT loop around appraisal, release and the state store.

One message at a time from the adapter's inbox. Evidence is size-checked, matched to the topic's
device, verified with that device's registered key, checked for freshness in the store (one
transaction), appraised (pure), and answered with a signed EAR retained on `fleet/<id>/result`.
Key requests carry evidence that must answer an outstanding challenge; only an affirming result
releases keys, each wrapped (HPKE) to the enclave key bound in that evidence. Anything malformed,
unsigned, wrongly signed, replayed or from an unknown device is logged with its reason, raises an
alert on `fleet/alerts`, and changes no state.

Nothing stops the loop: an exception while handling one message is that message's rejection (logged
with its topic, alerted), and a message is acknowledged to the broker only once what was decided
about it is committed, so a crash redelivers what was not (the freshness checks make a redelivery
harmless). What a device can make the verifier do (challenges, status handling, alerts) is rate
limited per device. Retained messages on the topics devices publish evidence and key requests on
are ignored and cleared, so nothing replays at every start.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog

from provisioning import crl
from provisioning.home import FleetHome
from provisioning.keystore import Keystore
from provisioning.registry import DeviceRecord, Registry
from strongroom import keywrap, messages, topics
from strongroom.commands import Command, sign_command
from strongroom.ear import AttestationResult, sign_result
from strongroom.errors import IntegrityError, StrongroomError
from strongroom.evidence import Evidence, evidence_kid, parse_evidence, verify_evidence
from strongroom.mqtt import Inbound, MqttClient, MqttError
from strongroom.policy import FleetPolicy
from strongroom.signing import SigningKey
from verifier.appraisal import appraise
from verifier.audit import AuditLog
from verifier.metrics import VerifierMetrics
from verifier.operator import audit_path, claim_requests, requests_dir
from verifier.ratelimit import DeviceLimiter, FloodNotices, RateLimits
from verifier.release import refusal
from verifier.store import Acceptance, Candidate, Freshness, StateStore, StoredResult

log = structlog.get_logger()
NONCE_SIZE = 32
TICK_S = 0.2
BATCH_MAX = 64  # messages taken from the inbox at once (only what has already arrived)
REGISTRY_RELOAD_S = 60.0  # a full re-read at least this often; changes are seen at once
KEY_AAD_DOMAIN = b"strongroom/key-release/v1|"
MAX_ALERT_REASON = 1000  # characters: within the Alert format's 4096 bytes, whatever the text
RETRY_S = 1.0  # after the store could not commit a batch, this long until it is tried again
SUBSCRIBED = (topics.EVIDENCE, topics.KEYS_REQUEST, topics.STATUS)  # every device's
NOT_RETAINED = (topics.EVIDENCE, topics.KEYS_REQUEST)  # retained copies ignored and cleared


class Rejected(IntegrityError):
    """Evidence or a request that is not accepted; the reason goes to the log and the alerts."""


# What became of one evidence: appraised, a duplicate delivery (None), or rejected.
Outcome = tuple[Evidence, AttestationResult] | StrongroomError | None


@dataclass(frozen=True)
class VerifierConfig:
    home: FleetHome
    shared: bool = False  # join the `$share/verifiers` group (several verifier processes)
    challenge_interval_s: float | None = None  # default: the policy's attestation interval
    limits: RateLimits = field(default_factory=RateLimits)


def key_aad(device_id: str, nonce: bytes) -> bytes:
    """The binding a released key is wrapped with: this device, this request."""
    return KEY_AAD_DOMAIN + device_id.encode() + b"|" + nonce


class Verifier:
    def __init__(
        self,
        config: VerifierConfig,
        store: StateStore,
        mqtt: MqttClient,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config, self.store, self.mqtt, self.clock = config, store, mqtt, clock
        home = config.home
        self.registry = Registry(home.registry_dir)
        self.keystore = Keystore(home.keystore_dir)
        self._result_key = SigningKey.from_pem(
            (home.root / "verifier" / "result-signing.key").read_bytes()
        )
        self.audit = AuditLog(audit_path(home), self._result_key)
        self.policy: FleetPolicy = home.load_policy()
        self.devices: dict[str, DeviceRecord] = {}
        self._registry_stamps: dict[str, tuple[int, int, int]] = {}
        self._last_reload = 0.0
        self._last_stale_check = 0.0
        self.counts: dict[str, int] = {}
        limits = config.limits
        self._status_limit = DeviceLimiter(limits.status)
        self._challenge_limit = DeviceLimiter(limits.challenges)
        self._alert_limit = DeviceLimiter(limits.alerts)
        self._flood_notices = FloodNotices(limits.flood_alert_every_s)
        self._commanded: set[str] = set()  # revoked devices sent a command since this start
        self._unacked: list[Inbound] = []  # a batch the store could not commit, to try again
        self._retry_at = 0.0
        self._stamp: tuple[int, int] = (0, 0)
        self._requests_stamp = 0
        self.metrics = VerifierMetrics(self.counts, mqtt.inbox.qsize)
        self.reload()

    # -- set-up --------------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the registry and the policy (they are edited by provisioning commands), and
        act on revocations and reinstatements made by operators since the last read."""
        previous, stamps = self.devices, self.registry.stamps()
        devices, changed = {}, []
        for device_id, stamp in stamps.items():
            record = previous.get(device_id)
            if record is None or self._registry_stamps.get(device_id) != stamp:
                try:  # only entries new or replaced since the last look are parsed again
                    record = self.registry.get(device_id)
                except StrongroomError as e:
                    log.error("registry_entry_unreadable", device=device_id[:64], reason=str(e))
                    stamps[device_id] = (0, 0, 0)  # read it again next time
                    continue
                changed.append(record)
            devices[device_id] = record
        self.devices, self._registry_stamps = devices, stamps
        if changed:
            self.store.sync_devices(changed)
        for record in changed:
            before = previous.get(record.device_id)
            if before is None or before.status == record.status:
                continue
            if record.status == "revoked":
                self._send_revoke(record.device_id, "revoked by an operator")
            elif record.status == "active":
                self._reinstated(record.device_id)
        try:
            self.policy = self.config.home.load_policy()
        except StrongroomError as e:
            log.error("policy_unreadable_keeping_previous", reason=str(e))
        self._last_reload = self.clock()

    def subscriptions(self) -> list[str]:
        """The topic filters for SUBSCRIBED, in its order."""
        wrap = topics.shared if self.config.shared else (lambda t: t)
        return [wrap(topics.any_device(leaf)) for leaf in SUBSCRIBED]

    # -- outputs -------------------------------------------------------------------------------

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def alert(self, severity: str, device_id: str, reason: str) -> None:
        """Raise an alert about a device, within its alert rate (past it, one says it floods)."""
        if severity != "critical" and not self._alert_limit.allow(device_id, self.clock()):
            self._count("alerts_suppressed")
            self._flooding(device_id, "alerts")
            return
        self._publish_alert(severity, device_id, reason)

    def _flooding(self, device_id: str, what: str) -> None:
        """Say once in a while that a device triggers more `what` than its rate allows."""
        if self._flood_notices.due(device_id, what, self.clock()):
            log.warning("device_flooding", device=device_id, over_limit=what)
            reason = f"flooding: {what} over the device's rate limit are dropped"
            self._publish_alert("warning", device_id, reason)

    def _publish_alert(self, severity: str, device_id: str, reason: str) -> None:
        reason = reason[:MAX_ALERT_REASON]  # however many reasons a device's claims gave
        if severity == "critical":
            log.error("alert", severity=severity, device=device_id, reason=reason)
        else:
            log.warning("alert", severity=severity, device=device_id, reason=reason)
        self._count(f"alert_{severity}")
        try:
            payload = messages.Alert(severity, device_id, reason, self.clock()).encode()
            self.mqtt.publish(topics.ALERTS, payload)
        except MqttError as e:
            log.error("alert_not_published", reason=str(e))

    def revoke(self, device_id: str, reason: str) -> None:
        """Revoke a device: no more keys, a signed revoke command, an alert, an audit entry."""
        record = self.registry.get(device_id)
        if record.status != "revoked":
            record = replace(record, status="revoked")
            self.registry.put(record)
            self.audit.append("revoked", device_id, reason=reason, by="verifier")
            self._sync_crl(device_id)
        elif device_id in self._commanded:
            return  # revoked already, and its retained command stands: nothing new to say
        self.devices[device_id] = record
        self.store.sync_devices([record])
        self._send_revoke(device_id, reason)

    def _sync_crl(self, device_id: str) -> None:
        """Put the device's certificate on hold in the fleet CRL (the broker then refuses it at
        its next connection). A failure leaves the registry as the truth; the next operator
        command on the device repairs the CRL."""
        try:
            crl.sync_device(self.config.home, device_id)
        except (StrongroomError, OSError, ValueError) as e:
            log.error("crl_not_updated", device=device_id, reason=str(e)[:200])

    def _send_revoke(self, device_id: str, reason: str) -> None:
        self.alert("critical", device_id, f"revoked: {reason}")
        command = Command.revoke(device_id, reason, self.clock())
        try:  # recorded first: the confirmation may come as soon as the command is out
            self.store.record_command(device_id, command.nonce, command.issued_at)
        except self.store.transient_errors as e:  # sent all the same; its confirmation is refused
            log.error("revoke_not_recorded", device=device_id, reason=str(e)[:200])
        try:
            topic = topics.device_topic(device_id, topics.COMMAND)
            signed = sign_command(command, self._result_key)
            self.mqtt.publish(topic, signed, retain=True)  # retained: reaches it when back
            self._commanded.add(device_id)
        except MqttError as e:  # sent again at the device's next contraindicated evidence
            log.error("revoke_not_published", device=device_id, reason=str(e))
        self._count("revocations")

    def _reinstated(self, device_id: str) -> None:
        log.info("reinstated", device=device_id)
        self._commanded.discard(device_id)
        self.store.forget_command(device_id)
        try:
            self.mqtt.publish(topics.device_topic(device_id, topics.COMMAND), b"", retain=True)
            self.challenge(device_id)  # it must attest afresh before any key is released
        except MqttError as e:
            log.warning("reinstatement_not_announced", device=device_id, reason=str(e))

    def challenge(self, device_id: str, *, asked_by_device: bool = False) -> None:
        """Send a challenge. One the device asked for (its `online` status) counts against its
        challenge rate; the verifier's own (periodic, after a reinstatement, for an operator)
        do not: they come at the policy's pace, whatever it is."""
        if asked_by_device and not self._challenge_limit.allow(device_id, self.clock()):
            self._count("challenges_suppressed")
            self._flooding(device_id, "challenges")
            return
        nonce = os.urandom(NONCE_SIZE)
        expires = self.clock() + self.policy.nonce_ttl_s
        self.store.issue_nonce(device_id, nonce, expires)
        payload = messages.Challenge(nonce, expires).encode()
        topic = topics.device_topic(device_id, topics.CHALLENGE)
        self.mqtt.publish(topic, payload, wait=False)  # paho keeps it in flight
        self._count("challenges")

    # -- evidence ------------------------------------------------------------------------------

    def _device(self, device_id: str, what: str) -> DeviceRecord:
        """The registry record; a device enrolled since the last reload is picked up at once."""
        device = self.devices.get(device_id)
        if device is None and self.registry.exists(device_id):
            self.reload()
            device = self.devices.get(device_id)
        if device is None:
            raise Rejected(f"{what} from unknown device {device_id}")
        return device

    def _refresh_device(self, device_id: str) -> None:
        if self.registry.exists(device_id):
            record = self.registry.get(device_id)
            self.devices[device_id] = record
            self.store.sync_devices([record])

    def _verified(self, device_id: str, token: bytes) -> Evidence:
        device = self._device(device_id, "evidence")
        parsed = parse_evidence(token)  # once: its kid picks the key that verifies it
        if evidence_kid(parsed) != device_id:
            raise Rejected("evidence names another device than its topic")
        ev = verify_evidence(parsed, device.attestation_key)
        if ev.device_id != device_id:
            raise Rejected("evidence subject is another device")
        return ev

    def _appraise_many(self, items: Sequence[tuple[str, bytes, bool]]) -> list[Outcome]:
        """Verify, check freshness and appraise (device id, token, must answer a challenge)
        items; publish their results. Freshness is checked and recorded for all of them, and
        their results saved, in one transaction: the store's round trips, not the signature
        checks, bound a verifier that takes one message at a time. Each outcome is the evidence
        and its status, None for a duplicate delivery (ignored), or the error that rejected it
        (nothing recorded)."""
        outcomes: list[Outcome] = [None] * len(items)
        verified: list[tuple[int, Evidence, Candidate]] = []
        for i, (device_id, token, need_fresh) in enumerate(items):
            try:
                ev = self._verified(device_id, token)
            except StrongroomError as e:
                outcomes[i] = e
                continue
            digest = hashlib.sha256(token).digest()
            verified.append((i, ev, Candidate(device_id, ev.nonce, ev.seq, digest, need_fresh)))
        if not verified:
            return outcomes
        now = self.clock()
        saved: list[StoredResult] = []
        duplicates: list[str] = []

        def results(acceptances: list[Acceptance]) -> list[StoredResult]:
            for (i, ev, candidate), acceptance in zip(verified, acceptances, strict=True):
                try:
                    freshness = self._admitted(acceptance.freshness, ev, candidate.require_fresh)
                except Rejected as e:
                    outcomes[i] = e
                    continue
                if freshness is None:
                    self._count("duplicates")
                    duplicates.append(ev.device_id)
                    continue
                result = self._result(ev, freshness, now)
                if acceptance.newest:  # late evidence does not replace a newer result
                    token = sign_result(result, self._result_key)
                    saved.append(StoredResult(ev.device_id, result.status, token, now))
                outcomes[i] = (ev, result)
            return saved

        self.store.accept_batch([c for _i, _e, c in verified], now, results)
        for stored in saved:
            try:  # paho keeps it in flight
                topic = topics.device_topic(stored.device_id, topics.RESULT)
                self.mqtt.publish(topic, stored.token, retain=True, wait=False)
            except MqttError as e:
                log.error("result_not_published", device=stored.device_id, reason=str(e))
        published = {stored.device_id for stored in saved}
        for device_id in dict.fromkeys(duplicates):
            if device_id not in published:  # a redelivery within the batch: its result just went
                self._publish_again(device_id)
        for outcome in outcomes:
            if isinstance(outcome, tuple):
                self._appraised(*outcome)
        return outcomes

    def _publish_again(self, device_id: str) -> None:
        """A redelivery of the last evidence accepted from a device: perhaps its result never
        left (a crash after the commit, before the publish), so the stored result goes again
        (retained: the same state, whoever saw it before), at the device's challenge rate; and
        a contraindicated one's revocation is made sure of (it is done once per start)."""
        stored = self.store.result(device_id)
        if stored is None:
            return
        if stored.status == "contraindicated":  # its revocation may not have been carried out
            self.revoke(device_id, "contraindicated (evidence delivered again)")
        if not self._challenge_limit.allow(device_id, self.clock()):
            return
        try:
            topic = topics.device_topic(device_id, topics.RESULT)
            self.mqtt.publish(topic, stored.token, retain=True, wait=False)
        except MqttError as e:
            log.warning("result_not_published", device=device_id, reason=str(e))

    @staticmethod
    def _admitted(freshness: Freshness, ev: Evidence, need_fresh: bool) -> Freshness | None:
        if freshness is Freshness.DUPLICATE:
            return None
        if freshness in (Freshness.REPLAY, Freshness.EXPIRED):
            raise Rejected(f"{freshness.value} evidence (sequence {ev.seq})")
        if need_fresh and freshness is not Freshness.FRESH:
            raise Rejected("a key request must answer an outstanding challenge")
        return freshness

    def _result(self, ev: Evidence, freshness: Freshness, now: float) -> AttestationResult:
        appraisal = appraise(ev, self.policy, self.devices[ev.device_id])
        return AttestationResult(
            device_id=ev.device_id,
            status=appraisal.status,
            vector=appraisal.vector,
            reasons=appraisal.reasons,
            policy_id=f"policy:v{self.policy.version}",
            iat=int(now),
            details={
                "firmware": ev.firmware,
                "svn": ev.enclave.svn,
                "mrenclave": ev.enclave.mrenclave,
                "artifacts": {a.name: a.version for a in ev.artifacts},
                "seq": ev.seq,
                "freshness": freshness.value,
            },
        )

    def _appraised(self, ev: Evidence, result: AttestationResult) -> None:
        self._count(f"appraised_{result.status}")
        log.info(
            "appraised",
            device=ev.device_id,
            status=result.status,
            seq=ev.seq,
            reasons=list(result.reasons),
        )
        if result.status == "contraindicated":
            self.revoke(ev.device_id, "; ".join(result.reasons) or "contraindicated")

    def mark_stale(self, since: float) -> None:
        """Devices silent past their interval and grace get a `none` result saying so."""
        for device_id in self.store.silent_devices(since):
            silent = int(self.clock() - since)
            result = AttestationResult(
                device_id=device_id,
                status="none",
                vector={},
                reasons=(f"stale: no evidence for more than {silent} s",),
                policy_id=f"policy:v{self.policy.version}",
                iat=int(self.clock()),
                details={"freshness": "stale"},
            )
            token = sign_result(result, self._result_key)
            try:
                topic = topics.device_topic(device_id, topics.RESULT)
                self.mqtt.publish(topic, token, retain=True)
            except MqttError as e:  # not saved either: the next round tries again
                log.warning("stale_result_not_published", device=device_id, reason=str(e))
                continue
            self.store.save_result(device_id, "none", token, self.clock())
            self.alert("warning", device_id, result.reasons[0])

    def handle_key_request(self, device_id: str, payload: bytes) -> None:
        request = messages.KeyRequest.decode(payload)
        self._refresh_device(device_id)  # a revocation by an operator counts at once
        (outcome,) = self._appraise_many([(device_id, request.evidence, True)])
        if isinstance(outcome, StrongroomError):
            raise outcome
        if outcome is None:
            return
        ev, status = outcome[0], outcome[1].status
        released, refused = [], []
        lease = keywrap.Lease(self.clock() + self.policy.lease_s, self.policy.offline_grace_s)
        for key_id in request.key_ids:
            reason = self._release_refusal(key_id, ev, status)
            if reason is not None:
                refused.append((key_id, reason))
                log.warning("key_refused", device=device_id, key_id=key_id, reason=reason)
                self.audit.append(
                    "key_refused", device_id, key_id=key_id, reason=reason, seq=ev.seq
                )
                continue
            _entry, data_key = self.keystore.unwrap(key_id)
            try:
                aad = key_aad(device_id, ev.nonce)
                wrapped = keywrap.wrap_key(ev.enclave_key, data_key, lease, key_id=key_id, aad=aad)
            finally:
                data_key[:] = bytes(len(data_key))
            renew_at = lease.until - self.policy.renew_margin_s
            released.append(messages.ReleasedKey(key_id, wrapped, aad, lease.until, renew_at))
            log.info("key_released", device=device_id, key_id=key_id)
            self.audit.append(
                "key_released", device_id, key_id=key_id, seq=ev.seq, mrenclave=ev.enclave.mrenclave
            )
            self._count("keys_released")
        self.counts["keys_refused"] = self.counts.get("keys_refused", 0) + len(refused)
        response = messages.KeyResponse(ev.nonce, tuple(released), tuple(refused))
        self.mqtt.publish(topics.device_topic(device_id, topics.KEYS_RESPONSE), response.encode())

    def _release_refusal(self, key_id: str, ev: Evidence, status: str) -> str | None:
        if status != "affirming":
            return f"attestation result is {status}"
        try:
            entry = self.keystore.entry(key_id)
        except StrongroomError:
            return "unknown key"
        return refusal(entry, ev, self.policy)

    def handle_status(self, device_id: str, payload: bytes, *, retained: bool = False) -> None:
        self._device(device_id, "status")
        if not self._status_limit.allow(device_id, self.clock()):
            self._count("status_suppressed")
            self._flooding(device_id, "status messages")
            return
        status = messages.Status.decode(payload)
        self.store.set_online(device_id, status.state != "offline", self.clock())
        if status.report:
            self.alert("warning", device_id, f"device reports: {status.report}")
        if status.state == "revoked":
            self._revocation_confirmed(device_id, status.command, retained=retained)
        elif status.state == "online" and not status.report:
            self.store.claim_challenge(device_id, self.clock(), 0.0)  # the next is an interval on
            self.challenge(device_id, asked_by_device=True)

    def _revocation_confirmed(self, device_id: str, nonce: bytes, *, retained: bool) -> None:
        """A device confirms a revoke: only one the verifier sent (its command's nonce), once."""
        issued = self.store.confirm_command(device_id, nonce) if nonce else None
        if issued is None:
            if retained:  # the broker's copy of a confirmation already counted, or of old
                log.info("revocation_status_replayed", device=device_id)
                return
            raise Rejected("status confirms a revocation the verifier did not send, or did again")
        latency = round(self.clock() - issued, 3)
        self.audit.append("revocation_confirmed", device_id, latency_s=latency)
        log.info("revocation_confirmed", device=device_id, latency_s=latency)

    # -- loop ----------------------------------------------------------------------------------

    def handle(self, msg: Inbound) -> None:
        self.handle_batch([msg])

    def handle_batch(self, msgs: Sequence[Inbound]) -> None:
        """Handle messages in arrival order; a run of evidence is appraised together. Whatever a
        message holds, handling it ends in its result or its rejection; only the store's failure
        to commit (`store.transient_errors`) is raised, so the batch is tried again."""
        evidence: list[tuple[Inbound, str]] = []
        for msg in msgs:
            try:
                device_id, leaf = topics.parse(msg.topic)
                if len(msg.payload) > messages.MAX_PAYLOAD:
                    raise Rejected(f"{leaf} payload of {len(msg.payload)} bytes is too large")
            except StrongroomError as e:
                self._rejected(msg, e)
                continue
            if msg.retain and leaf in NOT_RETAINED:
                self._clear_retained(msg, device_id)
                continue
            if leaf == topics.EVIDENCE:
                self._count("evidence")
                evidence.append((msg, device_id))
                continue
            self._appraise_evidence(evidence)
            evidence = []
            self._handle_one(msg, device_id, leaf)
        self._appraise_evidence(evidence)

    def _handle_one(self, msg: Inbound, device_id: str, leaf: str) -> None:
        try:
            if leaf == topics.KEYS_REQUEST:
                self._count("key_requests")
                self.handle_key_request(device_id, msg.payload)
                self._observe_latency(msg)
            elif leaf == topics.STATUS and msg.payload:  # empty: a cleared retained message
                self.handle_status(device_id, msg.payload, retained=msg.retain)
        except MqttError as e:  # before StrongroomError, its base: our reply failed, not them
            log.warning("reply_not_published", topic=msg.topic[:120], reason=str(e))
        except StrongroomError as e:
            self._rejected(msg, e)
        except self.store.transient_errors:
            raise
        except Exception as e:  # a defect met by this input: it must not stop the verifier
            self._failed(msg, e)

    def _clear_retained(self, msg: Inbound, device_id: str) -> None:
        """Devices publish evidence and key requests unretained; a retained copy would be
        handed to every verifier at every start. It is ignored, and cleared from the broker."""
        if not msg.payload:
            return  # a cleared topic (our own clearing, seen again)
        self._count("retained_cleared")
        log.warning("retained_message_cleared", topic=msg.topic[:120])
        try:
            self.mqtt.publish(msg.topic, b"", retain=True, wait=False)
        except MqttError as e:
            log.warning("retained_message_not_cleared", topic=msg.topic[:120], reason=str(e))
        self.alert("warning", device_id, f"ignored a retained message on {msg.topic[:120]}")

    def _appraise_evidence(self, evidence: Sequence[tuple[Inbound, str]]) -> None:
        if not evidence:
            return
        try:
            outcomes = self._appraise_many(
                [(device_id, m.payload, False) for m, device_id in evidence]
            )
        except self.store.transient_errors:
            raise
        except Exception as e:
            if len(evidence) == 1:
                self._failed(evidence[0][0], e)
            else:  # find the one that fails: the others are appraised as usual
                log.warning("batch_failed_retrying_one_by_one", error=type(e).__name__)
                for item in evidence:
                    self._appraise_evidence([item])
            return
        for (msg, _device_id), outcome in zip(evidence, outcomes, strict=True):
            if isinstance(outcome, StrongroomError):
                self._rejected(msg, outcome)
            else:
                self._observe_latency(msg)

    def _observe_latency(self, msg: Inbound) -> None:
        if msg.received:  # set by the MQTT adapter when the message arrived
            self.metrics.latency.observe(time.monotonic() - msg.received)

    def _rejected(self, msg: Inbound, error: StrongroomError) -> None:
        self._count("rejected")
        log.warning("message_rejected", topic=msg.topic[:120], reason=str(error))
        self.alert("warning", _topic_device(msg), f"rejected {msg.topic[:120]}: {error}")

    def _failed(self, msg: Inbound, error: Exception) -> None:
        """A message whose handling raised what no input should: a defect. Logged with its
        topic and traceback, alerted, counted; the verifier goes on."""
        self._count("internal_errors")
        log.error(
            "message_failed", topic=msg.topic[:120], error=type(error).__name__, exc_info=error
        )
        reason = f"rejected {msg.topic[:120]}: internal error ({type(error).__name__})"
        self.alert("warning", _topic_device(msg), reason)

    def _sources_changed(self) -> bool:
        """Whether the registry or the policy changed on disk (atomic writes rename files, which
        touches the directory), checked cheaply on every tick."""
        try:
            stamp = (
                self.config.home.registry_dir.stat().st_mtime_ns,
                self.config.home.policy_path.stat().st_mtime_ns,
            )
        except OSError:
            return True
        changed = stamp != self._stamp
        self._stamp = stamp
        return changed

    def _answer_requests(self) -> None:
        """Challenge the devices an operator asked to re-attest (checked cheaply by mtime)."""
        try:
            stamp = requests_dir(self.config.home).stat().st_mtime_ns
        except OSError:
            return
        if stamp == self._requests_stamp:
            return
        self._requests_stamp = stamp
        for device_id in claim_requests(self.config.home):
            try:
                self._device(device_id, "re-attestation request")
                self.challenge(device_id)
                log.info("reattestation_requested", device=device_id)
            except (StrongroomError, MqttError) as e:
                log.warning("reattestation_not_requested", device=device_id[:64], reason=str(e))

    def tick(self) -> None:
        now = self.clock()
        if self._sources_changed() or now - self._last_reload >= REGISTRY_RELOAD_S:
            self.reload()
        self._answer_requests()
        interval = self.config.challenge_interval_s or self.policy.attestation_interval_s
        if now - self._last_stale_check >= interval:
            self._last_stale_check = now
            self.mark_stale(now - self.policy.attestation_interval_s - self.policy.offline_grace_s)
        self._challenge_due(now, interval)

    def _challenge_due(self, now: float, interval: float) -> None:
        """Challenge the online devices last challenged an interval ago, a slice per tick: a
        fleet's challenges, and the evidence that answers them, spread over the interval instead
        of arriving all at once (a slice covers the fleet in half an interval, to catch up)."""
        budget = max(1, math.ceil(2 * len(self.devices) * TICK_S / interval))
        for device_id in self.store.due_for_challenge(now - interval, budget):
            if not self.store.claim_challenge(device_id, now, interval / 2):
                continue  # another verifier process challenges this one
            try:
                self.challenge(device_id)
            except MqttError as e:
                log.warning("challenge_not_sent", device=device_id, reason=str(e))

    def run(self, stop: Callable[[], bool]) -> None:
        for topic, leaf in zip(self.subscriptions(), SUBSCRIBED, strict=True):
            # where a retained publish is wrong, it is seen as such as it happens (MQTT 5)
            self.mqtt.subscribe(topic, retain_as_published=leaf in NOT_RETAINED)
        self._last_stale_check = self.clock()
        was_connected = self.mqtt.connected.is_set()
        last_tick = 0.0
        while not stop():
            connected = self.mqtt.connected.is_set()
            if connected and not was_connected:
                log.info("broker_connected")
            was_connected = connected
            if self._unacked:
                self._retry_unacked()
            else:
                msg = self.mqtt.receive(timeout=0.2)
                if msg is not None:
                    batch = [msg]
                    while len(batch) < BATCH_MAX and (more := self.mqtt.receive(timeout=0)):
                        batch.append(more)
                    self.commit(batch)
            if time.monotonic() - last_tick >= TICK_S:  # not per message: stat calls add up
                last_tick = time.monotonic()
                try:
                    self.tick()
                except Exception as e:  # the registry, the policy or the store: next tick again
                    log.error("tick_failed", error=type(e).__name__, reason=str(e)[:200])

    def commit(self, batch: Sequence[Inbound]) -> bool:
        """Handle a batch and acknowledge it once what was decided is committed. If the store
        cannot commit, nothing is acknowledged and the batch is kept to be tried again."""
        try:
            self.handle_batch(batch)
        except self.store.transient_errors as e:
            if not self._unacked:
                log.error("store_unavailable", reason=str(e)[:200], messages=len(batch))
            self._unacked, self._retry_at = list(batch), time.monotonic() + RETRY_S
            return False
        for msg in batch:
            self.mqtt.ack(msg)
        if self._unacked:
            log.info("store_available_again", messages=len(batch))
            self._unacked = []
        return True

    def _retry_unacked(self) -> None:
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            self.mqtt.idle(min(wait, 0.2))  # the connection stays alive meanwhile
            return
        self.commit(self._unacked)


def _topic_device(msg: Inbound) -> str:
    parts = msg.topic.split("/")
    return parts[1][:64] if len(parts) >= 3 else "?"


def verifier_db_path(home: FleetHome) -> Path:
    return home.root / "verifier" / "state.sqlite"
