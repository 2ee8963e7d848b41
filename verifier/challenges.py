"""The challenge scheduler: fresh nonces to devices, periodically and when a device asks.

A challenge is recorded in the store (`issue_nonce`) before it is published, so its answer is
recognised whichever verifier process receives it. Periodic challenges go to online devices last
challenged an interval ago, a slice per tick, each claimed in the store so that several verifiers
share them (a claim whose challenge could not go out is given back, so the device is due again
at the next tick); those follow the policy's pace and are never rate limited. A device asks for
one with its `online` status: that counts against its challenge rate, as does a result sent
again for a redelivered evidence (`within_rate`). Nothing is spent while the broker is away.
"""

from __future__ import annotations

import math
import os

import structlog

from strongroom import messages, topics
from strongroom.mqtt import MqttError
from verifier.context import Context
from verifier.ratelimit import DeviceLimiter

log = structlog.get_logger()
NONCE_SIZE = 32
TICK_S = 0.2  # how often the loop's housekeeping runs; the periodic slice is sized by it


class ChallengeScheduler:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._limit = DeviceLimiter(ctx.config.limits.challenges)

    @property
    def interval(self) -> float:
        """Seconds between a device's periodic challenges (configured, or the policy's)."""
        return self._ctx.config.challenge_interval_s or self._ctx.policy.attestation_interval_s

    def within_rate(self, device_id: str) -> bool:
        """Take one of the device's challenge tokens, if it has one."""
        return self._limit.allow(device_id, self._ctx.clock())

    def challenge(self, device_id: str, *, asked_by_device: bool = False) -> bool:
        """Send a challenge; False if the device's rate suppressed it. One the device asked for
        (its `online` status) counts against its challenge rate; the verifier's own (periodic,
        after a reinstatement, for an operator) do not: they come at the policy's pace,
        whatever it is. MqttError if it cannot go out: while not connected, before anything is
        spent; if the broker refuses it, the nonce stays recorded and expires unanswered."""
        ctx = self._ctx
        if not ctx.mqtt.connected.is_set():  # no rate token, no nonce for what cannot go out
            raise MqttError(f"not connected; cannot challenge {device_id}")
        if asked_by_device and not self.within_rate(device_id):
            ctx.count("challenges_suppressed")
            ctx.alerts.flooding(device_id, "challenges")
            return False
        nonce = os.urandom(NONCE_SIZE)
        expires = ctx.clock() + ctx.policy.nonce_ttl_s
        ctx.store.issue_nonce(device_id, nonce, expires)
        payload = messages.Challenge(nonce, expires).encode()
        topic = topics.device_topic(device_id, topics.CHALLENGE)
        ctx.mqtt.publish(topic, payload, wait=False)  # paho keeps it in flight
        ctx.count("challenges")
        return True

    def due(self, now: float, interval: float) -> None:
        """Challenge the online devices last challenged an interval ago, a slice per tick: a
        fleet's challenges, and the evidence that answers them, spread over the interval instead
        of arriving all at once (a slice covers the fleet in half an interval, to catch up)."""
        ctx = self._ctx
        budget = max(1, math.ceil(2 * len(ctx.devices) * TICK_S / interval))
        for device_id in ctx.store.due_for_challenge(now - interval, budget):
            if not ctx.store.claim_challenge(device_id, now, interval / 2):
                continue  # another verifier process challenges this one
            try:
                self.challenge(device_id)
            except MqttError as e:  # due again at the next tick, not an interval away
                ctx.store.unclaim_challenge(device_id, now)
                log.warning("challenge_not_sent", device=device_id, reason=str(e))
