"""The one adapter around paho-mqtt. No other module imports paho.

- Mutual TLS with the fleet CA; MQTT 5 by default (3.1.1 for brokers that only speak it).
- A network thread of our own drives paho (select, then read/write under a lock that every other
  call into paho takes too, because paho writes from the calling thread), reconnecting with
  jittered exponential back-off (`strongroom.retry.Backoff`).
- MQTT 5 session expiry is set explicitly and clean start is off, so the broker keeps the session
  and queued QoS 1 messages across reconnects.
- Callbacks only translate and enqueue into a bounded inbox; they never block or wait.
- Every wait has a timeout; paho's return codes become `MqttError`.
"""

from __future__ import annotations

import queue
import re
import select
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from strongroom.errors import EnvironmentFault, InputError
from strongroom.retry import Backoff

log = structlog.get_logger()


class MqttError(EnvironmentFault):
    """The broker is unreachable, refused us, or did not acknowledge in time."""

    hint = "check that the broker runs and that this identity may use the topic"


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    client_id: str
    protocol: Literal[5, 311] = 5
    keepalive_s: int = 30
    session_expiry_s: int = 86400
    clean_start: bool = False
    will: Will | None = None
    backoff: Backoff = field(default_factory=Backoff)
    inbox_size: int = 10_000
    max_inflight: int = 100


@dataclass(frozen=True)
class Inbound:
    topic: str
    payload: bytes
    retain: bool
    received: float = 0.0  # time.monotonic() when the network thread took it


def mqtt_protocol(version: str) -> Literal[5, 311]:
    return 311 if version == "3.1.1" else 5


def add_mqtt_version(parser: Any) -> None:
    """The `--mqtt` option of every command that connects to the broker."""
    parser.add_argument(
        "--mqtt",
        default="5",
        choices=["5", "3.1.1"],
        help="MQTT version (3.1.1 for the embedded broker)",
    )


def parse_broker_url(url: str) -> tuple[str, int]:
    """`mqtts://host:port` (or host:port) into (host, port)."""
    rest = url.removeprefix("mqtts://")
    if "://" in rest:
        raise InputError(f"unsupported broker URL {url!r}", hint="use mqtts://HOST:PORT")
    host, _, port = rest.rpartition(":")
    if not host or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise InputError(f"invalid broker URL {url!r}", hint="use mqtts://HOST:PORT")
    return host.strip("[]"), int(port)


class MqttClient:
    """A connection that stays up: subscriptions are renewed after every reconnect."""

    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self.inbox: queue.Queue[Inbound] = queue.Queue(maxsize=settings.inbox_size)
        self.connected = threading.Event()
        self.dropped = 0
        self.last_error = ""
        self._subscriptions: dict[str, int] = {}
        self._suback: dict[int, list[int]] = {}
        self._suback_cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()  # see _step
        self._client = self._make_client()

    # -- paho set-up and callbacks (translate and enqueue only) --------------------------------

    def _make_client(self) -> paho.Client:
        s = self.settings
        protocol = paho.MQTTv5 if s.protocol == 5 else paho.MQTTv311
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=protocol,
            clean_session=None if s.protocol == 5 else s.clean_start,
        )
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(s.ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(str(s.cert), str(s.key))
        except (OSError, ssl.SSLError) as e:
            raise MqttError(f"cannot load the TLS client identity {s.cert}: {e}") from e
        client.tls_set_context(context)
        client.max_inflight_messages_set(s.max_inflight)
        client.max_queued_messages_set(0)
        if s.will is not None:
            client.will_set(s.will.topic, s.will.payload, s.will.qos, s.will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            self.last_error = f"connection refused: {rc}"
            return
        self.connected.set()
        for topic, qos in self._subscriptions.items():
            client.subscribe(topic, qos)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.connected.clear()
        self.last_error = f"disconnected: {rc}"

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            self.inbox.put_nowait(
                Inbound(msg.topic, bytes(msg.payload), bool(msg.retain), time.monotonic())
            )
        except queue.Full:
            self.dropped += 1

    def _on_subscribe(self, _c: paho.Client, _u: Any, mid: int, codes: Any, _p: Any) -> None:
        with self._suback_cond:
            self._suback[mid] = [int(getattr(c, "value", c)) for c in codes]
            self._suback_cond.notify_all()

    # -- network thread ------------------------------------------------------------------------

    def _connect_properties(self) -> Properties | None:
        if self.settings.protocol != 5:
            return None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho lacks a hint
        props.SessionExpiryInterval = self.settings.session_expiry_s
        return props

    def _step(self) -> int:
        """One turn of the network loop. paho writes to the socket from whichever thread calls
        publish(), so every call that may touch the socket runs under one lock; only the wait
        for readiness happens outside it."""
        sock = self._client.socket()
        if sock is None:
            return int(paho.MQTT_ERR_NO_CONN)
        want_write = self._client.want_write()
        try:
            readable, writable, _ = select.select([sock], [sock] if want_write else [], [], 0.1)
        except (OSError, ValueError):
            return int(paho.MQTT_ERR_CONN_LOST)
        with self._lock:
            if readable:
                rc = self._client.loop_read()
                if rc != paho.MQTT_ERR_SUCCESS:
                    return int(rc)
            if writable or self._client.want_write():
                rc = self._client.loop_write()
                if rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_AGAIN):
                    return int(rc)
            return int(self._client.loop_misc())

    def _run(self) -> None:
        s, attempt, first = self.settings, 0, True
        while not self._stop.is_set():
            try:
                if first:
                    with self._lock:
                        self._client.connect(
                            s.host,
                            s.port,
                            s.keepalive_s,
                            clean_start=s.clean_start
                            if s.protocol == 5
                            else paho.MQTT_CLEAN_START_FIRST_ONLY,
                            properties=self._connect_properties(),
                        )
                    first = False
                else:
                    with self._lock:
                        self._client.reconnect()
            except (OSError, ssl.SSLError) as e:
                self.last_error = f"cannot connect to {s.host}:{s.port}: {e}"
                self._stop.wait(s.backoff.delay(attempt))
                attempt += 1
                continue
            while not self._stop.is_set():
                if self._step() != paho.MQTT_ERR_SUCCESS:
                    break
                if self.connected.is_set():
                    attempt = 0
            self.connected.clear()
            if not self._stop.is_set():
                self._stop.wait(s.backoff.delay(attempt))
                attempt += 1

    def start(self) -> MqttClient:
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()
        return self

    def wait_connected(self, timeout: float) -> None:
        if not self.connected.wait(timeout):
            raise MqttError(
                f"no connection to {self.settings.host}:{self.settings.port} within "
                f"{timeout:g} s ({self.last_error or 'no answer'})"
            )

    # -- operations (never from a callback) ----------------------------------------------------

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 10.0) -> list[int]:
        """Subscribe (and again after every reconnect); return the SUBACK reason codes."""
        self._subscriptions[topic] = qos
        if not self.connected.is_set():
            return []
        with self._lock:
            rc, mid = self._client.subscribe(topic, qos)
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise MqttError(f"cannot subscribe to {topic}: {paho.error_string(rc)}")
        deadline = time.monotonic() + timeout
        with self._suback_cond:
            while mid not in self._suback:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MqttError(f"no SUBACK for {topic} within {timeout:g} s")
                self._suback_cond.wait(left)
            return self._suback.pop(mid)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float = 10.0,
        wait: bool = True,
    ) -> None:
        """Publish and, for QoS 1, wait for the broker's acknowledgement (unless `wait` is
        False: paho then keeps the message in flight and resends it until acknowledged)."""
        if not self.connected.is_set():
            raise MqttError(f"not connected; cannot publish to {topic}")
        with self._lock:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise MqttError(f"cannot publish to {topic}: {paho.error_string(info.rc)}")
        if qos == 0 or not wait:
            return
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as e:
            raise MqttError(f"publish to {topic} failed: {e}") from e
        if not info.is_published():
            raise MqttError(f"no acknowledgement for {topic} within {timeout:g} s")

    def receive(self, timeout: float) -> Inbound | None:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        try:
            with self._lock:
                self._client.disconnect()
        except Exception as e:
            log.debug("mqtt_disconnect_failed", error=str(e))
        if self._thread is not None:
            self._thread.join(timeout)
