"""The verifier's loop: messages from the MQTT adapter's inbox to the parts that handle them.

What has already arrived (up to BATCH_MAX) is taken as one batch and handled in arrival order, a
run of evidence appraised together. Whatever a message holds, handling it ends in its result or
its rejection (logged with its topic, alerted against the topic's device); a defect met by one
message rejects that message alone. Only the store's failure to commit is different: then nothing
of the batch is acknowledged and it is tried again after RETRY_S, so a crash or an outage
redelivers what was not committed (the freshness rules make a redelivery harmless). A batch is
acknowledged to the broker once what was decided about it is committed.

Transport errors are never blamed on a device: a reply (a key response, a challenge, a result)
that cannot be published is logged and counted (`replies_not_published`), never rejected or
alerted. What was decided is committed by then, so the message is acknowledged as usual and not
retried; the device asks again, and a result that did not go out is published from the store
when the loop sees the connection back.

Retained messages on the topics devices publish evidence and key requests on are ignored and
cleared, so nothing replays at every start. Between batches, every TICK_S, a housekeeping turn:
the fleet watch, then the periodic challenges.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import structlog

from strongroom import messages, topics
from strongroom.errors import StrongroomError
from strongroom.mqtt import Inbound, MqttError
from verifier.challenges import TICK_S, ChallengeScheduler
from verifier.context import Context, Rejected
from verifier.fleetwatch import FleetWatch
from verifier.keybroker import KeyBroker
from verifier.metrics import VerifierMetrics
from verifier.pipeline import AppraisalPipeline

log = structlog.get_logger()
BATCH_MAX = 64  # messages taken from the inbox at once (only what has already arrived)
RETRY_S = 1.0  # after the store could not commit a batch, this long until it is tried again
SUBSCRIBED = (topics.EVIDENCE, topics.KEYS_REQUEST, topics.STATUS)  # every device's
NOT_RETAINED = (topics.EVIDENCE, topics.KEYS_REQUEST)  # retained copies ignored and cleared


class VerifierLoop:
    def __init__(
        self,
        ctx: Context,
        *,
        pipeline: AppraisalPipeline,
        broker: KeyBroker,
        challenges: ChallengeScheduler,
        fleet: FleetWatch,
        metrics: VerifierMetrics,
    ) -> None:
        self._ctx, self._pipeline, self._broker = ctx, pipeline, broker
        self._challenges, self._fleet, self._metrics = challenges, fleet, metrics
        self._unacked: list[Inbound] = []  # a batch the store could not commit, to try again
        self._retry_at = 0.0

    def subscriptions(self) -> list[str]:
        """The topic filters for SUBSCRIBED, in its order."""
        wrap = topics.shared if self._ctx.config.shared else (lambda t: t)
        return [wrap(topics.any_device(leaf)) for leaf in SUBSCRIBED]

    # -- one batch -----------------------------------------------------------------------------

    def handle_batch(self, msgs: Sequence[Inbound]) -> None:
        """Handle messages in arrival order; a run of evidence is appraised together. Whatever a
        message holds, handling it ends in its result or its rejection; only the store's failure
        to commit (`store.transient_errors`) is raised, so the batch is tried again."""
        ctx = self._ctx
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
                ctx.count("evidence")
                evidence.append((msg, device_id))
                continue
            self._appraise_evidence(evidence)
            evidence = []
            self._handle_one(msg, device_id, leaf)
        self._appraise_evidence(evidence)

    def _handle_one(self, msg: Inbound, device_id: str, leaf: str) -> None:
        try:
            if leaf == topics.KEYS_REQUEST:
                self._ctx.count("key_requests")
                self._broker.handle_key_request(device_id, msg.payload)
                self._observe_latency(msg)
            elif leaf == topics.STATUS and msg.payload:  # empty: a cleared retained message
                self._fleet.handle_status(device_id, msg.payload, retained=msg.retain)
        except MqttError as e:  # before StrongroomError, its base: our reply failed, not them
            self._reply_not_published(msg, e)
        except StrongroomError as e:
            self._rejected(msg, e)
        except self._ctx.store.transient_errors:
            raise
        except Exception as e:  # a defect met by this input: it must not stop the verifier
            self._failed(msg, e)

    def _clear_retained(self, msg: Inbound, device_id: str) -> None:
        """Devices publish evidence and key requests unretained; a retained copy would be
        handed to every verifier at every start. It is ignored, and cleared from the broker."""
        if not msg.payload:
            return  # a cleared topic (our own clearing, seen again)
        self._ctx.count("retained_cleared")
        log.warning("retained_message_cleared", topic=msg.topic[:120])
        try:
            self._ctx.mqtt.publish(msg.topic, b"", retain=True, wait=False)
        except MqttError as e:
            log.warning("retained_message_not_cleared", topic=msg.topic[:120], reason=str(e))
        self._ctx.alerts.alert(
            "warning", device_id, f"ignored a retained message on {msg.topic[:120]}"
        )

    def _appraise_evidence(self, evidence: Sequence[tuple[Inbound, str]]) -> None:
        if not evidence:
            return
        try:
            outcomes = self._pipeline.appraise(
                [(device_id, m.payload, False) for m, device_id in evidence]
            )
        except self._ctx.store.transient_errors:
            raise
        except Exception as e:  # a publish failing after the commit is counted in the pipeline
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
            self._metrics.latency.observe(time.monotonic() - msg.received)

    def _reply_not_published(self, msg: Inbound, error: MqttError) -> None:
        self._ctx.count("replies_not_published")
        log.warning("reply_not_published", topic=msg.topic[:120], reason=str(error))

    def _rejected(self, msg: Inbound, error: StrongroomError) -> None:
        self._ctx.count("rejected")
        log.warning("message_rejected", topic=msg.topic[:120], reason=str(error))
        self._ctx.alerts.alert(
            "warning", _topic_device(msg), f"rejected {msg.topic[:120]}: {error}"
        )

    def _failed(self, msg: Inbound, error: Exception) -> None:
        """A message whose handling raised what no input should: a defect. Logged with its
        topic and traceback, alerted, counted; the verifier goes on."""
        self._ctx.count("internal_errors")
        log.error(
            "message_failed", topic=msg.topic[:120], error=type(error).__name__, exc_info=error
        )
        reason = f"rejected {msg.topic[:120]}: internal error ({type(error).__name__})"
        self._ctx.alerts.alert("warning", _topic_device(msg), reason)

    # -- acknowledgement -----------------------------------------------------------------------

    def commit(self, batch: Sequence[Inbound]) -> bool:
        """Handle a batch and acknowledge it once what was decided is committed. If the store
        cannot commit, nothing is acknowledged and the batch is kept to be tried again."""
        ctx = self._ctx
        try:
            self.handle_batch(batch)
        except ctx.store.transient_errors as e:
            if not self._unacked:
                log.error("store_unavailable", reason=str(e)[:200], messages=len(batch))
            self._unacked, self._retry_at = list(batch), time.monotonic() + RETRY_S
            return False
        for msg in batch:
            ctx.mqtt.ack(msg)
        if self._unacked:
            log.info("store_available_again", messages=len(batch))
            self._unacked = []
        return True

    def _retry_unacked(self) -> None:
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            self._ctx.mqtt.idle(min(wait, 0.2))  # the connection stays alive meanwhile
            return
        self.commit(self._unacked)

    # -- the loop ------------------------------------------------------------------------------

    def tick(self) -> None:
        now = self._ctx.clock()
        self._fleet.watch(now)
        self._challenges.due(now, self._challenges.interval)

    def _connected_again(self) -> None:
        """The connection is (back) up: the results that could not be published go out."""
        try:
            self._pipeline.publish_unpublished()
        except Exception as e:  # the store: at the next connect, or the device's next result
            log.error("results_not_republished", error=type(e).__name__, reason=str(e)[:200])

    def run(self, stop: Callable[[], bool]) -> None:
        mqtt = self._ctx.mqtt
        for topic, leaf in zip(self.subscriptions(), SUBSCRIBED, strict=True):
            # where a retained publish is wrong, it is seen as such as it happens (MQTT 5)
            mqtt.subscribe(topic, retain_as_published=leaf in NOT_RETAINED)
        self._fleet.start()
        was_connected = mqtt.connected.is_set()
        last_tick = 0.0
        while not stop():
            connected = mqtt.connected.is_set()
            if connected and not was_connected:
                log.info("broker_connected")
                self._connected_again()
            was_connected = connected
            if self._unacked:
                self._retry_unacked()
            else:
                msg = mqtt.receive(timeout=0.2)
                if msg is not None:
                    batch = [msg]
                    while len(batch) < BATCH_MAX and (more := mqtt.receive(timeout=0)):
                        batch.append(more)
                    self.commit(batch)
            if time.monotonic() - last_tick >= TICK_S:  # not per message: stat calls add up
                last_tick = time.monotonic()
                try:
                    self.tick()
                except Exception as e:  # the registry, the policy or the store: next tick again
                    log.error("tick_failed", error=type(e).__name__, reason=str(e)[:200])


def _topic_device(msg: Inbound) -> str:
    parts = msg.topic.split("/")
    return parts[1][:64] if len(parts) >= 3 else "?"
