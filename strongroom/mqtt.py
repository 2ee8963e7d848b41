"""The one adapter around paho-mqtt. No other module imports paho.

- Mutual TLS with the fleet CA; MQTT 5 by default (3.1.1 for brokers that only speak it).
- A network thread of our own drives paho (select, then read/write under a lock that every other
  call into paho takes too, because paho writes from the calling thread), reconnecting with
  jittered exponential back-off (`strongroom.retry.Backoff`).
- MQTT 5 session expiry is set explicitly and clean start is off, so the broker keeps the session
  and queued QoS 1 messages across reconnects.
- Callbacks only translate and enqueue into a bounded inbox; they never block or wait.
- Every wait has a timeout; paho's return codes become `MqttError`.
- With `manual_ack`, a QoS 1 message is acknowledged only when the owner calls `ack` after it has
  committed what it decided: a crash before that leaves the message with the broker, which
  delivers it again to the resumed session (at-least-once, end to end).
- Socket I/O is buffered (`_BufferedPaho`): one TLS read takes what has arrived, and what paho
  writes is sent together by the network thread, once per turn.
"""

from __future__ import annotations

import contextlib
import queue
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from strongroom.errors import EnvironmentFault, InputError
from strongroom.retry import Backoff

log = structlog.get_logger()
READ_CHUNK = 65536
PUMP_TURNS = 64  # network turns one pump may take while data keeps arriving


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
    manual_ack: bool = False  # QoS 1 messages are acknowledged by `ack`, not on receipt


@dataclass(frozen=True)
class Inbound:
    topic: str
    payload: bytes
    retain: bool
    received: float = 0.0  # time.monotonic() when the network thread took it
    mid: int = 0  # the packet id, for `MqttClient.ack`
    qos: int = 0
    session: int = 0  # which connection delivered it (an ack after a reconnect is not sent)


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


class _BufferedPaho(paho.Client):
    """paho with buffered socket I/O. paho reads a packet in three or more calls (command byte,
    each length byte, body) and writes every packet (each PUBACK too) with its own TLS record and
    system call; each call releases and retakes the GIL. At thousands of messages a second those
    calls cost more than the messages' processing. Here a read takes up to READ_CHUNK bytes and
    serves paho's small reads from memory, and writes collect until `MqttClient._step` calls
    `flush` once per turn (in the network thread, or in a driven client's `pump`).

    It overrides paho's socket helpers (`_sock_recv`, `_sock_send`, `_sock_close`), which the
    paho version range in setup.cfg pins; tests/test_mqtt.py checks them against real Mosquitto.
    Every call into it is made under MqttClient's lock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf, self._rpos = b"", 0
        self.room: Callable[[], bool] = lambda: True  # whether the owner can take a message
        self._wbuf: list[bytes] = []

    def buffered(self) -> bool:
        """Whether received bytes wait in memory (select() cannot see them)."""
        return self._rpos < len(self._rbuf)

    def _sock_recv(self, bufsize: int) -> bytes:
        if not self.room():  # paho keeps its place in a packet and reads on later
            raise BlockingIOError
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(READ_CHUNK)  # BlockingIOError: nothing there yet
            if len(data) <= bufsize:
                return data  # b"": the broker closed the connection
            self._rbuf, self._rpos = data, 0
        start = self._rpos
        self._rpos = min(start + bufsize, len(self._rbuf))
        return self._rbuf[start : self._rpos]

    def _sock_send(self, buf: bytes | bytearray) -> int:
        if self._sock is None:
            raise ConnectionError("self._sock is None")
        self._wbuf.append(bytes(buf))
        return len(buf)

    def want_write(self) -> bool:
        return bool(self._wbuf) or super().want_write()

    def flush(self) -> None:
        """Send what paho wrote since the last flush, in one call (the rest stays for the next
        when the socket is full). OSError when the connection is lost."""
        if not self._wbuf or self._sock is None:
            return
        data = b"".join(self._wbuf)
        self._wbuf.clear()
        try:
            sent = super()._sock_send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self._wbuf.append(data[sent:])

    def _sock_close(self) -> None:
        with contextlib.suppress(OSError):  # what is buffered (a DISCONNECT) goes out if it can
            self.flush()
        self._rbuf, self._rpos = b"", 0
        self._wbuf.clear()
        super()._sock_close()


class MqttClient:
    """A connection that stays up: subscriptions are renewed after every reconnect."""

    def __init__(self, settings: MqttSettings, *, driven: bool = False) -> None:
        """`driven`: no network thread; the owner calls `pump` (and `receive`, which pumps)."""
        self.settings, self.driven = settings, driven
        self.inbox: queue.Queue[Inbound] = queue.Queue(maxsize=settings.inbox_size)
        self.connected = threading.Event()
        self.dropped = 0  # messages that found the inbox full (none: see _room)
        self.last_error = ""
        self._paused = False
        self._subscriptions: dict[str, tuple[int, bool]] = {}  # topic: qos, retain as published
        self._session = 0  # connections so far: an Inbound's `session`
        self._suback: dict[int, list[int]] = {}
        self._suback_cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()  # see _step
        self._up, self._first, self._attempt, self._next_attempt = False, True, 0, 0.0
        # Written to when something is queued for sending, so the network thread wakes to send it.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_pending = False
        self._client = self._make_client()

    # -- paho set-up and callbacks (translate and enqueue only) --------------------------------

    def _make_client(self) -> _BufferedPaho:
        s = self.settings
        protocol = paho.MQTTv5 if s.protocol == 5 else paho.MQTTv311
        client = _BufferedPaho(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=protocol,
            clean_session=None if s.protocol == 5 else s.clean_start,
            manual_ack=s.manual_ack,
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
        client.room = self._room
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            self.last_error = f"connection refused: {rc}"
            return
        self._session += 1  # messages of the last connection come again if unacknowledged
        self.connected.set()
        for topic, (qos, as_published) in self._subscriptions.items():
            client.subscribe(topic, **self._subscribe_options(qos, as_published))

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.connected.clear()
        self.last_error = f"disconnected: {rc}"

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            self.inbox.put_nowait(
                Inbound(
                    msg.topic,
                    bytes(msg.payload),
                    bool(msg.retain),
                    time.monotonic(),
                    msg.mid,
                    msg.qos,
                    self._session,
                )
            )
        except queue.Full:  # not while the socket pauses at a full inbox (see _room)
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.error("mqtt_inbox_full", dropped=self.dropped, topic=msg.topic[:120])

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
        props.ReceiveMaximum = self.settings.max_inflight  # unacknowledged messages to us
        return props

    def _room(self) -> bool:
        """Whether the inbox has room. paho acknowledges each message as it reads it, so one
        read into a full inbox would be lost: the socket reads nothing more (`_BufferedPaho.
        room`) until the consumer has taken one (`receive` wakes the network thread). A slow
        consumer holds the broker back instead, whatever the broker sends at once (Mosquitto
        restoring a saved session sends its whole queue)."""
        self._paused = self.inbox.qsize() >= self.settings.inbox_size
        return not self._paused

    def _wake(self) -> None:
        """Wake the network thread to send what a caller queued (once until it has woken)."""
        if not self._wake_pending and not self.driven:
            self._wake_pending = True
            with contextlib.suppress(OSError):  # full (it is waking anyway) or closed (stopping)
                self._wake_w.send(b"\0")

    def _woken(self) -> None:
        self._wake_pending = False  # before draining: a later wake is not lost
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass

    def _step(self, timeout: float) -> int:
        """One turn of the network loop: wait until the socket is readable, writable (when
        something waits to be sent) or a caller queued a message; then read, write and flush.
        paho queues writes from whichever thread calls publish(), so every call into it runs
        under one lock; only the wait happens outside it."""
        client = self._client
        sock = client.socket()
        if sock is None:
            return int(paho.MQTT_ERR_NO_CONN)
        with self._lock:
            want_write, buffered = client.want_write(), client.buffered()
        room = self._room()
        try:
            readable, _, _ = select.select(
                [sock, self._wake_r] if room else [self._wake_r],
                [sock] if want_write else [],
                [],
                0 if buffered and room else timeout,
            )
        except (OSError, ValueError):
            return int(paho.MQTT_ERR_CONN_LOST)
        if self._wake_r in readable:
            self._woken()
        with self._lock:
            if room and (sock in readable or buffered):
                rc = client.loop_read()
                if rc != paho.MQTT_ERR_SUCCESS:
                    return int(rc)
            rc = client.loop_write()  # paho's queue into the buffer
            if rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_AGAIN):
                return int(rc)
            rc = client.loop_misc()
            try:
                client.flush()
            except OSError:
                return int(paho.MQTT_ERR_CONN_LOST)
            return int(rc)

    def _connect(self) -> bool:
        """One connection attempt (the TCP and TLS handshakes; the CONNACK arrives later)."""
        s = self.settings
        try:
            with self._lock:
                if self._first:
                    self._client.connect(
                        s.host,
                        s.port,
                        s.keepalive_s,
                        clean_start=s.clean_start
                        if s.protocol == 5
                        else paho.MQTT_CLEAN_START_FIRST_ONLY,
                        properties=self._connect_properties(),
                    )
                    self._first = False
                else:
                    self._client.reconnect()
        except (OSError, ssl.SSLError) as e:
            self.last_error = f"cannot connect to {s.host}:{s.port}: {e}"
            return False
        return True

    def _turn(self, timeout: float) -> None:
        """One turn of the connection: a (re)connection attempt when one is due (with jittered
        exponential back-off after failures), otherwise one network step of up to `timeout`."""
        if self._up:
            if self._step(timeout) == paho.MQTT_ERR_SUCCESS:
                if self.connected.is_set():
                    self._attempt = 0
                return
            self._up = False
            self.connected.clear()
        else:
            wait = self._next_attempt - time.monotonic()
            if wait > 0:
                self._stop.wait(min(wait, timeout))
                return
            self._up = self._connect()
            if self._up:
                return
        self._next_attempt = time.monotonic() + self.settings.backoff.delay(self._attempt)
        self._attempt += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._turn(0.1)
        self.connected.clear()

    def start(self) -> MqttClient:
        """Start the network thread (in driven mode, the owner's `pump` calls do its work)."""
        if not self.driven:
            self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
            self._thread.start()
        return self

    def pump(self, timeout: float) -> None:
        """Driven mode: the network work, in the caller's thread. Waits up to `timeout` for
        traffic, then takes in all that has arrived and sends all that waits. One thread doing
        both the network and the processing saves the GIL hand-offs between two threads, which
        at thousands of messages a second cost more than the work itself."""
        self._turn(timeout)
        for _ in range(PUMP_TURNS):
            sock = self._client.socket()
            if not self._up or sock is None:
                return
            if not self._room():
                return  # the owner takes from the inbox first
            if not (self._client.buffered() or select.select([sock], [], [], 0)[0]):
                return
            self._turn(0)

    def idle(self, timeout: float) -> None:
        """Wait without taking messages, keeping the connection alive (driven: by pumping)."""
        if self.driven:
            self.pump(timeout)
        else:
            self._stop.wait(timeout)

    def _wait(self, done: Callable[[], bool], timeout: float) -> bool:
        """Driven mode: pump until `done()` or the timeout."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.pump(min(left, 0.05))
        return True

    def wait_connected(self, timeout: float) -> None:
        if self.driven:
            connected = self._wait(self.connected.is_set, timeout)
        else:
            connected = self.connected.wait(timeout)
        if not connected:
            raise MqttError(
                f"no connection to {self.settings.host}:{self.settings.port} within "
                f"{timeout:g} s ({self.last_error or 'no answer'})"
            )

    # -- operations (never from a callback) ----------------------------------------------------

    def _subscribe_options(self, qos: int, as_published: bool) -> dict[str, Any]:
        if self.settings.protocol == 5 and as_published:
            return {"options": SubscribeOptions(qos=qos, retainAsPublished=True)}
        return {"qos": qos}

    def subscribe(
        self,
        topic: str,
        qos: int = 1,
        timeout: float = 10.0,
        *,
        retain_as_published: bool = False,
    ) -> list[int]:
        """Subscribe (and again after every reconnect); return the SUBACK reason codes.
        `retain_as_published` (MQTT 5): live messages keep the retain flag they were published
        with, so a retained publish is recognisable as it happens (MQTT 3.1.1 clears the flag on
        live messages; only those replayed from the retained store carry it)."""
        self._subscriptions[topic] = (qos, retain_as_published)
        if not self.connected.is_set():
            return []
        with self._lock:
            rc, mid = self._client.subscribe(
                topic, **self._subscribe_options(qos, retain_as_published)
            )
        self._wake()
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise MqttError(f"cannot subscribe to {topic}: {paho.error_string(rc)}")
        with self._suback_cond:
            if self.driven:
                acked = self._wait(lambda: mid in self._suback, timeout)
            else:
                acked = self._suback_cond.wait_for(lambda: mid in self._suback, timeout)
            if not acked:
                raise MqttError(f"no SUBACK for {topic} within {timeout:g} s")
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
        self._wake()
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise MqttError(f"cannot publish to {topic}: {paho.error_string(info.rc)}")
        if qos == 0 or not wait:
            return
        try:
            if self.driven:
                self._wait(info.is_published, timeout)
            else:
                info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as e:
            raise MqttError(f"publish to {topic} failed: {e}") from e
        if not info.is_published():
            raise MqttError(f"no acknowledgement for {topic} within {timeout:g} s")

    def ack(self, msg: Inbound) -> None:
        """Acknowledge a message (with `manual_ack`, once what it caused is committed). One from
        an earlier connection is not acknowledged: the broker delivers it again on the resumed
        session, and its packet id may by now name another message."""
        if not self.settings.manual_ack or msg.qos == 0:
            return
        with self._lock:  # the session changes under it (on_connect runs in paho's calls)
            if msg.session != self._session:
                return
            rc = self._client.ack(msg.mid, msg.qos)
        self._wake()
        if rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.debug("mqtt_ack_not_sent", reason=paho.error_string(rc))

    def receive(self, timeout: float) -> Inbound | None:
        if self.driven:
            if self.inbox.empty():
                self.pump(timeout)
            timeout = 0
        try:
            msg = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if self._paused:
            self._wake()  # the network thread may read again
        return msg

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        try:
            with self._lock:
                self._client.disconnect()
        except Exception as e:
            log.debug("mqtt_disconnect_failed", error=str(e))
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self._wake_r.close()
            self._wake_w.close()
