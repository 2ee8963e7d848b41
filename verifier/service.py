"""The fleet verifier and key broker: one `Verifier` composing parts that have one job each.

- `verifier.pipeline`: evidence → size, device, signature, freshness (in the store), appraisal,
  signed EAR, retained result.
- `verifier.keybroker`: key requests → evidence answering an outstanding challenge, release,
  HPKE wrap.
- `verifier.challenges`: periodic and device-asked challenges, and the device's challenge rate.
- `verifier.fleetwatch`: registry and policy reloads, stale devices, revocation commands and
  confirmations, the CRL, operators' requests, status messages.
- `verifier.loop`: inbox batches, acknowledgement after commit, retry of what the store could not
  commit, housekeeping ticks, the catch-all per message.

They share a `verifier.context.Context` (configuration, store, MQTT adapter, clock, fleet sources,
counts, alerts). The rules themselves are pure modules: `verifier.freshness`,
`verifier.appraisal`, `verifier.release`, `verifier.ratelimit`. This facade is the public surface
the CLI, the simulator, the benchmarks and the tests use.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from provisioning.home import FleetHome
from provisioning.keystore import Keystore
from provisioning.registry import DeviceRecord, Registry
from strongroom.mqtt import Inbound, MqttClient
from strongroom.policy import FleetPolicy
from verifier.audit import AuditLog
from verifier.challenges import NONCE_SIZE, TICK_S, ChallengeScheduler
from verifier.context import MAX_ALERT_REASON, Context, Rejected, VerifierConfig
from verifier.fleetwatch import REGISTRY_RELOAD_S, FleetWatch
from verifier.keybroker import KEY_AAD_DOMAIN, KeyBroker, key_aad
from verifier.loop import BATCH_MAX, NOT_RETAINED, RETRY_S, SUBSCRIBED, VerifierLoop
from verifier.metrics import VerifierMetrics
from verifier.pipeline import AppraisalPipeline, Outcome
from verifier.store import StateStore

__all__ = [
    "BATCH_MAX",
    "KEY_AAD_DOMAIN",
    "MAX_ALERT_REASON",
    "NONCE_SIZE",
    "NOT_RETAINED",
    "REGISTRY_RELOAD_S",
    "RETRY_S",
    "SUBSCRIBED",
    "TICK_S",
    "Outcome",
    "Rejected",
    "Verifier",
    "VerifierConfig",
    "key_aad",
    "verifier_db_path",
]


class Verifier:
    def __init__(
        self,
        config: VerifierConfig,
        store: StateStore,
        mqtt: MqttClient,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ctx = ctx = Context(config, store, mqtt, clock)
        self.metrics = VerifierMetrics(ctx.counts, mqtt.inbox.qsize)
        self.challenges = ChallengeScheduler(ctx)
        self.fleet = FleetWatch(ctx, self.challenges)
        self.pipeline = AppraisalPipeline(ctx, self.fleet, self.challenges)
        self.broker = KeyBroker(ctx, self.pipeline, self.fleet)
        self.loop = VerifierLoop(
            ctx,
            pipeline=self.pipeline,
            broker=self.broker,
            challenges=self.challenges,
            fleet=self.fleet,
            metrics=self.metrics,
        )
        self.fleet.reload()

    # -- what the parts share ------------------------------------------------------------------

    @property
    def config(self) -> VerifierConfig:
        return self.ctx.config

    @property
    def mqtt(self) -> MqttClient:
        return self.ctx.mqtt

    @property
    def clock(self) -> Callable[[], float]:
        return self.ctx.clock

    @property
    def registry(self) -> Registry:
        return self.ctx.registry

    @property
    def keystore(self) -> Keystore:
        return self.ctx.keystore

    @property
    def audit(self) -> AuditLog:
        return self.ctx.audit

    @property
    def counts(self) -> dict[str, int]:
        return self.ctx.counts

    @property
    def devices(self) -> dict[str, DeviceRecord]:
        return self.ctx.devices

    @property
    def store(self) -> StateStore:
        return self.ctx.store

    @store.setter
    def store(self, store: StateStore) -> None:
        self.ctx.store = store

    @property
    def policy(self) -> FleetPolicy:
        return self.ctx.policy

    @policy.setter
    def policy(self, policy: FleetPolicy) -> None:
        self.ctx.policy = policy

    # -- what the parts do ---------------------------------------------------------------------

    def reload(self) -> None:
        self.fleet.reload()

    def subscriptions(self) -> list[str]:
        return self.loop.subscriptions()

    def alert(self, severity: str, device_id: str, reason: str) -> None:
        self.ctx.alerts.alert(severity, device_id, reason)

    def revoke(self, device_id: str, reason: str) -> None:
        self.fleet.revoke(device_id, reason)

    def challenge(self, device_id: str, *, asked_by_device: bool = False) -> None:
        self.challenges.challenge(device_id, asked_by_device=asked_by_device)

    def mark_stale(self, since: float) -> None:
        self.fleet.mark_stale(since)

    def handle_status(self, device_id: str, payload: bytes, *, retained: bool = False) -> None:
        self.fleet.handle_status(device_id, payload, retained=retained)

    def handle_key_request(self, device_id: str, payload: bytes) -> None:
        self.broker.handle_key_request(device_id, payload)

    def handle(self, msg: Inbound) -> None:
        self.loop.handle_batch([msg])

    def handle_batch(self, msgs: Sequence[Inbound]) -> None:
        self.loop.handle_batch(msgs)

    def commit(self, batch: Sequence[Inbound]) -> bool:
        return self.loop.commit(batch)

    def tick(self) -> None:
        self.loop.tick()

    def run(self, stop: Callable[[], bool]) -> None:
        self.loop.run(stop)


def verifier_db_path(home: FleetHome) -> Path:
    return home.root / "verifier" / "state.sqlite"
