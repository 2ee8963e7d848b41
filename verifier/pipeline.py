"""The appraisal pipeline: evidence in, signed results out.

For each evidence: the device its topic names must be registered; the token's key id must name
that device, its signature must verify with the device's registered key and its subject must be
that device; then, for the whole batch in one store transaction, freshness is checked and
recorded (`verifier.freshness`), each fresh one appraised (`verifier.appraisal`, pure) and its
EAR signed and saved. Results are published retained on `fleet/<id>/result` once committed; a
contraindicated one revokes the device. A duplicate delivery of the last accepted evidence sends
its stored result again (at the device's challenge rate). Anything that fails a check is that
evidence's rejection, recorded nowhere; the caller alerts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import structlog

from strongroom import topics
from strongroom.ear import AttestationResult, sign_result
from strongroom.errors import StrongroomError
from strongroom.evidence import Evidence, evidence_kid, parse_evidence, verify_evidence
from strongroom.mqtt import MqttError
from verifier.appraisal import appraise
from verifier.challenges import ChallengeScheduler
from verifier.context import Context, Rejected
from verifier.fleetwatch import FleetWatch
from verifier.freshness import Acceptance, Candidate, Freshness, admit
from verifier.store import StoredResult

log = structlog.get_logger()

# What became of one evidence: appraised, a duplicate delivery (None), or rejected.
Outcome = tuple[Evidence, AttestationResult] | StrongroomError | None


class AppraisalPipeline:
    def __init__(self, ctx: Context, fleet: FleetWatch, challenges: ChallengeScheduler) -> None:
        self._ctx, self._fleet, self._challenges = ctx, fleet, challenges
        self.unpublished: set[str] = set()  # devices whose saved result did not go out

    def verified(self, device_id: str, token: bytes) -> Evidence:
        """The evidence, its signature checked with the topic's device's registered key."""
        device = self._fleet.device(device_id, "evidence")
        parsed = parse_evidence(token)  # once: its kid picks the key that verifies it
        if evidence_kid(parsed) != device_id:
            raise Rejected("evidence names another device than its topic")
        ev = verify_evidence(parsed, device.attestation_key)
        if ev.device_id != device_id:
            raise Rejected("evidence subject is another device")
        return ev

    def appraise(self, items: Sequence[tuple[str, bytes, bool]]) -> list[Outcome]:
        """Verify, check freshness and appraise (device id, token, must answer a challenge)
        items; publish their results. Freshness is checked and recorded for all of them, and
        their results saved, in one transaction: the store's round trips, not the signature
        checks, bound a verifier that takes one message at a time. Each outcome is the evidence
        and its result, None for a duplicate delivery (ignored), or the error that rejected it
        (nothing recorded). Only the store's failure to commit is raised: a publish that fails
        after it is counted (`replies_not_published`) for its device alone."""
        ctx = self._ctx
        outcomes: list[Outcome] = [None] * len(items)
        verified: list[tuple[int, Evidence, Candidate]] = []
        for i, (device_id, token, need_fresh) in enumerate(items):
            try:
                ev = self.verified(device_id, token)
            except StrongroomError as e:
                outcomes[i] = e
                continue
            digest = hashlib.sha256(token).digest()
            verified.append((i, ev, Candidate(device_id, ev.nonce, ev.seq, digest, need_fresh)))
        if not verified:
            return outcomes
        now = ctx.clock()
        saved: list[StoredResult] = []
        duplicates: list[str] = []

        def results(acceptances: list[Acceptance]) -> list[StoredResult]:
            for (i, ev, candidate), acceptance in zip(verified, acceptances, strict=True):
                try:
                    freshness = admit(
                        acceptance.freshness, ev.seq, require_fresh=candidate.require_fresh
                    )
                except StrongroomError as e:
                    outcomes[i] = e
                    continue
                if freshness is None:
                    ctx.count("duplicates")
                    duplicates.append(ev.device_id)
                    continue
                result = self._result(ev, freshness, now)
                if acceptance.newest:  # late evidence does not replace a newer result
                    token = sign_result(result, ctx.result_key)
                    saved.append(StoredResult(ev.device_id, result.status, token, now))
                outcomes[i] = (ev, result)
            return saved

        ctx.store.accept_batch([c for _i, _e, c in verified], now, results)
        # Committed, and the batch will be acknowledged: each device's follow-up (its result
        # sent again, its count and log line, its revocation) is done on its own, so that a
        # publish failing for one cannot skip the others' (nothing would come again for them).
        for stored in saved:
            self._publish(stored.device_id, stored.token)
        published = {stored.device_id for stored in saved}
        for device_id in dict.fromkeys(duplicates):
            if device_id not in published:  # a redelivery within the batch: its result just went
                try:
                    self._publish_again(device_id)
                except MqttError as e:
                    self._not_published(device_id, e)
        for outcome in outcomes:
            if isinstance(outcome, tuple):
                try:
                    self._appraised(*outcome)
                except MqttError as e:
                    self._not_published(outcome[0].device_id, e)
        return outcomes

    def _not_published(self, device_id: str, error: MqttError) -> None:
        """A reply that failed to go out after the commit: the transport's fault, not the
        device's (no rejection, no alert)."""
        self._ctx.count("replies_not_published")
        log.warning("reply_not_published", device=device_id, reason=str(error))

    def _publish(self, device_id: str, token: bytes) -> None:
        try:  # paho keeps it in flight, and sends it again after a reconnect
            topic = topics.device_topic(device_id, topics.RESULT)
            self._ctx.mqtt.publish(topic, token, retain=True, wait=False)
        except MqttError as e:  # the decision stands: the stored result goes at the next connect
            self._ctx.count("replies_not_published")
            self.unpublished.add(device_id)
            log.error("result_not_published", device=device_id, reason=str(e))
        else:
            self.unpublished.discard(device_id)

    def publish_unpublished(self) -> None:
        """Publish the stored result of each device whose result did not go out (called when
        the connection is back). Not rate limited: the device did nothing to ask for it. One
        that fails again waits for the next connect, or for the device's next result."""
        for device_id in sorted(self.unpublished):
            stored = self._ctx.store.result(device_id)
            if stored is None:
                self.unpublished.discard(device_id)
            else:
                self._publish(device_id, stored.token)

    def _publish_again(self, device_id: str) -> None:
        """A redelivery of the last evidence accepted from a device: perhaps its result never
        left (a crash after the commit, before the publish), so the stored result goes again
        (retained: the same state, whoever saw it before), at the device's challenge rate; and
        a contraindicated one's revocation is made sure of (it is done once per start)."""
        stored = self._ctx.store.result(device_id)
        if stored is None:
            return
        if stored.status == "contraindicated":  # its revocation may not have been carried out
            self._fleet.revoke(device_id, "contraindicated (evidence delivered again)")
        if self._challenges.within_rate(device_id):
            self._publish(device_id, stored.token)

    def _result(self, ev: Evidence, freshness: Freshness, now: float) -> AttestationResult:
        ctx = self._ctx
        appraisal = appraise(ev, ctx.policy, ctx.devices[ev.device_id])
        return AttestationResult(
            device_id=ev.device_id,
            status=appraisal.status,
            vector=appraisal.vector,
            reasons=appraisal.reasons,
            policy_id=f"policy:v{ctx.policy.version}",
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
        self._ctx.count(f"appraised_{result.status}")
        log.info(
            "appraised",
            device=ev.device_id,
            status=result.status,
            seq=ev.seq,
            reasons=list(result.reasons),
        )
        if result.status == "contraindicated":
            self._fleet.revoke(ev.device_id, "; ".join(result.reasons) or "contraindicated")
