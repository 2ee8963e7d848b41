"""What the verifier's parts share: its configuration, the fleet's sources (registry, keystore,
policy, the result-signing key, the audit log), the state store, the MQTT adapter, the clock and
the event counts; and the alerts every part raises about a device, within that device's rate.

One `Context` per verifier process, made by `verifier.service.Verifier` and handed to each part.
Nothing here decides anything about a message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from provisioning.home import FleetHome
from provisioning.keystore import Keystore
from provisioning.registry import DeviceRecord, Registry
from strongroom import messages, topics
from strongroom.errors import IntegrityError
from strongroom.mqtt import MqttClient, MqttError
from strongroom.policy import FleetPolicy
from strongroom.signing import SigningKey
from verifier.audit import AuditLog
from verifier.operator import audit_path
from verifier.ratelimit import DeviceLimiter, FloodNotices, RateLimits
from verifier.store import StateStore

log = structlog.get_logger()
MAX_ALERT_REASON = 1000  # characters: within the Alert format's 4096 bytes, whatever the text


class Rejected(IntegrityError):
    """Evidence or a request that is not accepted; the reason goes to the log and the alerts."""


@dataclass(frozen=True)
class VerifierConfig:
    home: FleetHome
    shared: bool = False  # join the `$share/verifiers` group (several verifier processes)
    challenge_interval_s: float | None = None  # default: the policy's attestation interval
    limits: RateLimits = field(default_factory=RateLimits)


class Context:
    """The verifier's shared state. `policy` and `devices` are replaced as a whole when the
    fleet watch re-reads them; `store` may be replaced (tests put a failing one in)."""

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
        self.result_key = SigningKey.from_pem(
            (home.root / "verifier" / "result-signing.key").read_bytes()
        )
        self.audit = AuditLog(audit_path(home), self.result_key)
        self.policy: FleetPolicy = home.load_policy()
        self.devices: dict[str, DeviceRecord] = {}
        self.counts: dict[str, int] = {}
        self.alerts = Alerts(self)

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n


class Alerts:
    """Alerts on `fleet/alerts` about a device: within the device's alert rate (critical ones
    always), and past it one alert, once in a while, that the device floods. A failed publish
    is logged; an alert is never a reason to fail what raised it."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        limits = ctx.config.limits
        self._limit = DeviceLimiter(limits.alerts)
        self._flood_notices = FloodNotices(limits.flood_alert_every_s)

    def alert(self, severity: str, device_id: str, reason: str) -> None:
        """Raise an alert about a device, within its alert rate (past it, one says it floods)."""
        ctx = self._ctx
        if severity != "critical" and not self._limit.allow(device_id, ctx.clock()):
            ctx.count("alerts_suppressed")
            self.flooding(device_id, "alerts")
            return
        self._publish(severity, device_id, reason)

    def flooding(self, device_id: str, what: str) -> None:
        """Say once in a while that a device triggers more `what` than its rate allows."""
        if self._flood_notices.due(device_id, what, self._ctx.clock()):
            log.warning("device_flooding", device=device_id, over_limit=what)
            reason = f"flooding: {what} over the device's rate limit are dropped"
            self._publish("warning", device_id, reason)

    def _publish(self, severity: str, device_id: str, reason: str) -> None:
        ctx = self._ctx
        reason = reason[:MAX_ALERT_REASON]  # however many reasons a device's claims gave
        if severity == "critical":
            log.error("alert", severity=severity, device=device_id, reason=reason)
        else:
            log.warning("alert", severity=severity, device=device_id, reason=reason)
        ctx.count(f"alert_{severity}")
        try:
            payload = messages.Alert(severity, device_id, reason, ctx.clock()).encode()
            ctx.mqtt.publish(topics.ALERTS, payload, wait=False)  # paho keeps it in flight
        except MqttError as e:
            log.error("alert_not_published", reason=str(e))
