"""The dashboard's inputs: MQTT with a read-only dashboard identity (results, status, alerts) and
the fleet home (registry, audit log), applied to a `LiveView` by one thread of its own.

The dashboard identity may only read `fleet/+/result`, `fleet/+/status` and `fleet/alerts`
(`provisioning/broker_config.py`). It keeps no session: what matters is retained, and alerts
missed while away are in the verifier's log.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import structlog

from provisioning.home import FleetHome
from strongroom import topics
from strongroom.mqtt import Inbound, MqttClient, MqttError, MqttSettings, parse_broker_url
from verifier.dashboard.home_watch import HomeWatch
from verifier.dashboard.live import LiveView
from verifier.dashboard.view import FleetView

log = structlog.get_logger()
SUBSCRIPTIONS = (topics.any_device(topics.RESULT), topics.any_device(topics.STATUS), topics.ALERTS)
BATCH = 1000  # messages applied under one lock; a burst of retained results is a few batches


@dataclass(frozen=True)
class FeedConfig:
    home: FleetHome
    broker: str  # mqtts://HOST:PORT
    instance: int = 1  # which dashboard identity: 0 `_dashboard`, N `_dashboard-N`
    protocol: Literal[5, 311] = 5
    home_poll_s: float = 0.5
    connect_timeout_s: float = 10.0


def consumer_client(config: FeedConfig) -> MqttClient:
    """An MQTT client with the home's read-only dashboard identity `config.instance`."""
    host, port = parse_broker_url(config.broker)
    cn, cert, key = config.home.dashboard_identity(config.instance)
    return MqttClient(
        MqttSettings(
            host=host,
            port=port,
            ca=config.home.ca_cert,
            cert=cert,
            key=key,
            client_id=cn,
            protocol=config.protocol,
            session_expiry_s=0,
            clean_start=True,
        )
    )


class FleetFeed:
    """Feeds a LiveView. `collect()` for one settled snapshot, or `start()` a thread that
    keeps it current until `stop()`."""

    def __init__(self, config: FeedConfig, live: LiveView, mqtt: MqttClient | None = None) -> None:
        self.config, self.live = config, live
        self.mqtt = mqtt or consumer_client(config)
        self.watch = HomeWatch(config.home)
        self._subscribed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_home_poll = 0.0

    # -- one step at a time --------------------------------------------------------------------

    def _subscribe(self) -> None:
        for topic in SUBSCRIPTIONS:
            self.mqtt.subscribe(topic)
        self._subscribed = True

    def pump(self, timeout: float) -> int:
        """Apply what arrives within `timeout` (and whatever is queued behind it); the count."""
        first = self.mqtt.receive(timeout)
        if first is None:
            return 0
        batch: list[Inbound] = [first]
        while len(batch) < BATCH and (msg := self.mqtt.receive(0)) is not None:
            batch.append(msg)
        now = self.live.clock()

        def apply(view: FleetView) -> None:
            for msg in batch:
                view.apply(msg.topic, msg.payload, now)
            view.record_history(now)

        self.live.use(apply)
        return len(batch)

    def poll_home(self) -> None:
        statuses = self.watch.registry_statuses()
        lease_s = self.watch.lease_s()
        more = True
        while more:  # a long audit log is read in pieces, each applied under the lock briefly
            entries, more = self.watch.audit_entries()
            if entries:
                self.live.use(partial(FleetView.apply_audit, entries=entries, lease_s=lease_s))
        now = self.live.clock()

        def apply(view: FleetView) -> None:
            if statuses is not None:
                view.apply_registry(statuses)
            view.record_history(now)

        self.live.use(apply)
        self._last_home_poll = time.monotonic()

    def collect(
        self, settle_s: float, quiet_s: float = 0.3, until: Callable[[], bool] | None = None
    ) -> bool:
        """Connect, subscribe and apply messages until none came for `quiet_s` (the retained
        ones arrive right after subscribing) or `settle_s` has passed. Without `until`, a broker
        not reached within the connect timeout is an MqttError; with it (a watcher), the client
        keeps retrying (the adapter logs each new cause) until connected, or until `until()` says
        to give up: then False."""
        self.mqtt.start()
        while until is not None and not until():
            try:
                self.mqtt.wait_connected(1.0)
                break
            except MqttError:
                continue
        if until is not None and until():
            return False
        self.mqtt.wait_connected(self.config.connect_timeout_s)
        self._subscribe()
        self.live.connected = True
        self.poll_home()
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            if not self.pump(min(quiet_s, max(0.0, deadline - time.monotonic()))):
                break
        return True

    # -- as a thread ---------------------------------------------------------------------------

    def start(self) -> FleetFeed:
        self.mqtt.start()
        self._thread = threading.Thread(target=self._run, name="dashboard-feed", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as e:  # the page must stay up and say so, not freeze silently
                log.error("dashboard_feed_failed", error=f"{type(e).__name__}: {e}")
                self.live.connected = False
                self._stop.wait(1.0)

    def step(self, timeout: float = 0.2) -> None:
        """One turn: (re)subscribe once connected, apply messages, re-read the home if due."""
        connected = self.mqtt.connected.is_set()
        if connected != self.live.connected:
            self.live.connected = connected
            log.info("broker_connected" if connected else "broker_disconnected")
        if connected and not self._subscribed:
            try:
                self._subscribe()
            except MqttError as e:
                log.warning("subscribe_failed", reason=str(e))
        self.pump(timeout)
        if time.monotonic() - self._last_home_poll >= self.config.home_poll_s:
            self.poll_home()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.mqtt.stop()
