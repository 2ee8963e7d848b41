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
import datetime as dt
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
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from strongroom.connection_problems import (
    CONNACK_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    PLAINTEXT,
    REFUSED_BY_BROKER,
    STABLE_S,
    TIMEOUT,
    TLS_ERROR,
    TLS_HINT,
    CertificateValidity,
    ConnectionProblem,
    certificate_validity,
    classify_connack,
    classify_disconnect,
    classify_error,
    rejected_by_broker,
)
from strongroom.errors import EnvironmentFault, FormatError, InputError
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


def _tls_context(s: MqttSettings, *, tls12_only: bool = False) -> ssl.SSLContext:
    """The client's TLS context: the fleet CA, our identity, TLS 1.2 or later. `tls12_only`
    serves a diagnostic probe: under TLS 1.3 a server checks our certificate after the handshake
    and just closes the connection, while under 1.2 it says why in an alert."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(s.ca))
    except (OSError, ssl.SSLError) as e:
        raise MqttError(
            f"cannot load the fleet CA certificate {s.ca}: {e}",
            hint="check the bundle's tls/ca.pem (or the fleet home's ca/ca.pem)",
        ) from e
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls12_only:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(s.cert), str(s.key))
    except (OSError, ssl.SSLError) as e:
        raise MqttError(f"cannot load the TLS client identity {s.cert}: {e}") from e
    return context


# An MQTT 3.1.1 CONNECT with an empty client id and a clean session: sent in plaintext to a port
# that dropped our TLS handshake, to learn whether it is a plaintext MQTT listener.
_PLAIN_CONNECT = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 10, 0, 0])
# Each blocking step of a diagnostic probe (connect, handshake, answer) waits at most this long:
# a driven client probes in its owner's only thread, and a broker that answers at all does so
# well within it.
PROBE_TIMEOUT_S = 1.5
_DROPPED = (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError)  # the plaintext probe's cue


def _probe_plaintext(host: str, port: int) -> bool:
    """Whether `host:port` answers a plaintext MQTT CONNECT with a CONNACK."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as sock:
            sock.sendall(_PLAIN_CONNECT)
            return sock.recv(1) == b"\x20"
    except OSError:
        return False


def _probe_alert(s: MqttSettings) -> str | None:
    """What the broker says of our certificate in a TLS 1.2 handshake: "" if it accepts it,
    the OpenSSL reason of its alert if not, None if the probe cannot tell (TLS 1.3 only, the
    network)."""
    try:
        context = _tls_context(s, tls12_only=True)
        with (
            socket.create_connection((s.host, s.port), timeout=PROBE_TIMEOUT_S) as raw,
            context.wrap_socket(raw, server_hostname=s.host),
        ):
            return ""
    except ssl.SSLError as e:
        reason = getattr(e, "reason", None) or ""
        return reason if "ALERT" in reason and "PROTOCOL_VERSION" not in reason else None
    except (OSError, MqttError):
        return None


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _handshake_problem(
    error: OSError, s: MqttSettings, where: str, own: CertificateValidity | None
) -> ConnectionProblem:
    """The TCP connect or TLS handshake failed. A port that drops the handshake without a word
    may be a plaintext listener: asked in plaintext MQTT, it answers."""
    if isinstance(error, _DROPPED):
        if _probe_plaintext(s.host, s.port):
            return ConnectionProblem(
                PLAINTEXT,
                f"{where} dropped our TLS handshake and speaks MQTT without TLS",
                "this is a plaintext port: use the broker's TLS port (8883 by default)",
            )
        return ConnectionProblem(
            TLS_ERROR, f"{where} closed the connection during the TLS handshake", TLS_HINT
        )
    return classify_error(error, where, own)


@dataclass(frozen=True)
class BrokerCheck:
    """What `check_broker` found: the problem (None: the broker accepts us) and, when the
    handshake got that far, the validity period of the broker's certificate."""

    where: str
    problem: ConnectionProblem | None
    broker_not_before: dt.datetime | None = None
    broker_not_after: dt.datetime | None = None


def _peer_times(tls: ssl.SSLSocket) -> tuple[dt.datetime | None, dt.datetime | None]:
    peer = tls.getpeercert() or {}
    before, after = peer.get("notBefore"), peer.get("notAfter")
    return (
        dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(str(before)), dt.UTC)
        if before
        else None,
        dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(str(after)), dt.UTC) if after else None,
    )


def check_broker(s: MqttSettings, verdict_s: float = 1.5) -> BrokerCheck:
    """TCP and TLS with the broker and nothing more: no MQTT CONNECT, so no session is touched
    (the broker makes the certificate's CN the client id: a CONNECT with a device's identity
    would take its running agent's session over). Under TLS 1.3 the broker judges our
    certificate after the handshake; one that waits `verdict_s` for our CONNECT accepted it."""
    where = _where(s.host, s.port)
    try:
        own: CertificateValidity | None = certificate_validity(s.cert.read_bytes())
    except (OSError, FormatError):
        own = None
    context = _tls_context(s)
    try:
        raw = socket.create_connection((s.host, s.port), timeout=CONNECT_TIMEOUT_S)
    except OSError as e:
        return BrokerCheck(where, classify_error(e, where, own))
    with raw:
        try:
            tls = context.wrap_socket(raw, server_hostname=s.host)
        except OSError as e:
            return BrokerCheck(where, _handshake_problem(e, s, where, own))
        with tls:
            before, after = _peer_times(tls)
            tls.settimeout(verdict_s)
            try:
                spoke = tls.recv(1) != b""
            except TimeoutError:
                return BrokerCheck(where, None, before, after)  # it waits for our CONNECT
            except ssl.SSLError as e:
                if "ALERT" in (e.reason or ""):
                    return BrokerCheck(where, classify_error(e, where, own), before, after)
                spoke = False
            except OSError:
                spoke = False
    if spoke:  # something before any CONNECT: not an MQTT broker
        problem = ConnectionProblem(
            REFUSED_BY_BROKER, f"{where} spoke first: it is not an MQTT broker", TLS_HINT
        )
        return BrokerCheck(where, problem, before, after)
    alert = _probe_alert(s)
    now = dt.datetime.now(dt.UTC)
    problem = rejected_by_broker(alert or "", f"the broker at {where}", own, now)
    return BrokerCheck(where, problem, before, after)


_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]  # paho lacks a hint


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
        self.read_error: OSError | None = None  # what the last failed read raised (diagnostics)
        # (topic, payload, retain, mid, qos) of each PUBLISH that `_handle_publish` takes itself
        self.on_inbound: Callable[[str, bytes, bool, int, int], None] | None = None

    def buffered(self) -> bool:
        """Whether received bytes wait in memory (select() cannot see them)."""
        return self._rpos < len(self._rbuf)

    def _sock_recv(self, bufsize: int) -> bytes:
        if not self.room():  # paho keeps its place in a packet and reads on later
            raise BlockingIOError
        if self._rpos >= len(self._rbuf):
            try:
                data = super()._sock_recv(READ_CHUNK)  # BlockingIOError: nothing there yet
            except BlockingIOError:
                raise
            except OSError as e:  # paho logs it to nobody and reports a lost connection
                self.read_error = e
                raise
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

    def _handle_publish(self) -> MQTTErrorCode:
        """An incoming PUBLISH of QoS 0, or of QoS 1 that the owner acknowledges (`manual_ack`),
        goes straight to `on_inbound`: paho would build a message object (with a condition
        variable), an MQTT 5 Properties object and a log line for each, none of which we read.
        Anything else, or a packet that does not decode, is paho's to handle (and refuse)."""
        header, packet = self._in_packet["command"], self._in_packet["packet"]
        qos = (header & 0x06) >> 1
        if self.on_inbound is None or qos > 1 or (qos == 1 and not self._manual_ack):
            return super()._handle_publish()
        try:
            end = 2 + int.from_bytes(packet[:2], "big")
            topic = bytes(packet[2:end]).decode()
            mid = int.from_bytes(packet[end : end + 2], "big") if qos else 0
            pos = end + 2 if qos else end
            if self._protocol == paho.MQTTv5:  # the properties' length, a variable byte integer
                size = 0
                for shift in (0, 7, 14, 21):
                    byte = packet[pos]
                    pos, size = pos + 1, size | (byte & 0x7F) << shift
                    if not byte & 0x80:
                        break
                else:
                    raise ValueError("a malformed properties length")
                pos += size
            elif not topic:
                raise ValueError("an empty topic")
            if pos > len(packet):
                raise ValueError("truncated")
        except (ValueError, IndexError):  # UnicodeDecodeError is a ValueError
            return super()._handle_publish()
        with self._in_callback_mutex:
            self.on_inbound(topic, bytes(packet[pos:]), bool(header & 0x01), mid, qos)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        """The broker's PUBACK to one of our QoS 1 publishes, in its short form (success, no
        properties): paho would decode a reason code and a Properties object for an
        `on_publish` callback that we do not set. Any other form is paho's to decode."""
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) != 2 or self.on_publish is not None:
            return super()._handle_pubackcomp(cmd)
        mid = int.from_bytes(packet, "big")
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _update_inflight(self) -> MQTTErrorCode:
        """paho calls this after every PUBACK of ours to send what waits for a free slot, and
        walks all its outgoing messages to find them: a walk over a whole batch of results in
        flight for each result the broker acknowledges. When every outgoing message counts as
        in flight, none waits (paho counts a message in flight only while it holds it), so
        there is nothing to send and no walk."""
        if len(self._out_messages) <= self._inflight_messages:
            return paho.MQTT_ERR_SUCCESS
        return super()._update_inflight()

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
        self.where = _where(settings.host, settings.port)
        self._problem: ConnectionProblem | None = None
        self._reported = ""  # the cause last logged (logged again only when it changes)
        self._opened = 0.0  # when the TCP and TLS handshakes of this connection succeeded
        self._acked = False  # whether this connection got its CONNACK
        self._refusal: ConnectionProblem | None = None  # a CONNACK refusal on this connection
        self._dropped_by: tuple[int, str] | None = None  # the broker's DISCONNECT reason
        self._connected_at: float | None = None  # when this connection got its CONNACK
        self._short_lived = 0  # connections in a row that the broker closed before STABLE_S
        self._said_connected = False  # mqtt_connected logged since the last warning
        self.failed_attempts = 0  # connection attempts that failed since the last success
        # The last failure that took a probe to classify, and its classification: the same raw
        # failure again in this streak of failures is not probed again (see _probed).
        self._probe_cache: tuple[tuple[str, ...], ConnectionProblem] | None = None
        try:
            self.identity: CertificateValidity | None = certificate_validity(
                settings.cert.read_bytes()
            )
        except (OSError, FormatError):  # _make_client says why the identity cannot be used
            self.identity = None
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
        client.tls_set_context(_tls_context(s))
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.max_inflight_messages_set(s.max_inflight)
        client.max_queued_messages_set(0)
        if s.will is not None:
            client.will_set(s.will.topic, s.will.payload, s.will.qos, s.will.retain)
        client.room = self._room
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_inbound = self._on_inbound
        client.on_subscribe = self._on_subscribe
        return client

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            self._refusal = classify_connack(int(rc.value), str(rc), self.where)
            return
        self._acked = True
        self._session += 1  # messages of the last connection come again if unacknowledged
        self.connected.set()
        for topic, (qos, as_published) in self._subscriptions.items():
            client.subscribe(topic, **self._subscribe_options(qos, as_published))

    def _on_disconnect(self, _c: paho.Client, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        self.connected.clear()
        if getattr(flags, "is_disconnect_packet_from_server", False):
            self._dropped_by = (int(getattr(rc, "value", 0)), str(rc))

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

    def _on_inbound(self, topic: str, payload: bytes, retain: bool, mid: int, qos: int) -> None:
        try:
            self.inbox.put_nowait(
                Inbound(topic, payload, retain, time.monotonic(), mid, qos, self._session)
            )
        except queue.Full:  # not while the socket pauses at a full inbox (see _room)
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.error("mqtt_inbox_full", dropped=self.dropped, topic=topic[:120])

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

    def _connect(self) -> ConnectionProblem | None:
        """One connection attempt (the TCP and TLS handshakes; the CONNACK arrives later):
        None when they succeeded, else why not."""
        s = self.settings
        self._acked, self._refusal, self._dropped_by = False, None, None
        self._client.read_error = None
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
        except OSError as e:  # ssl.SSLError and socket.timeout are OSErrors
            return self._handshake_failed(e)
        self._opened = time.monotonic()
        return None

    # -- why a connection failed ---------------------------------------------------------------

    def _handshake_failed(self, error: OSError) -> ConnectionProblem:
        def classify() -> ConnectionProblem:
            return _handshake_problem(error, self.settings, self.where, self.identity)

        if isinstance(error, _DROPPED):  # only these take a probe
            return self._probed(("handshake", type(error).__name__, str(error)), classify)
        return classify()

    def _probed(
        self, raw: tuple[str, ...], classify: Callable[[], ConnectionProblem]
    ) -> ConnectionProblem:
        """`classify()`, which probes the broker, unless the raw failure is the one it last
        classified in this streak of failures: a probe blocks (a driven client's owner too) for
        up to seconds, and a retry that fails the same way learns nothing new from it. A
        connection that succeeds ends the streak."""
        cached = self._probe_cache
        if cached is not None and cached[0] == raw:
            return cached[1]
        problem = classify()
        self._probe_cache = (raw, problem)
        return problem

    def _lost(self) -> ConnectionProblem:
        """Why this connection ended: a CONNACK refusal, the broker's DISCONNECT, or (when it
        ended before any CONNACK) the broker refusing our certificate, which under TLS 1.3 it
        says only by closing: a TLS 1.2 probe hears its alert."""
        if self._refusal is not None:
            return self._refusal
        read_error = self._client.read_error
        if self._acked:
            code, text = self._dropped_by or (0, str(read_error or "closed by the broker"))
            up_since, self._connected_at = self._connected_at, None
            if up_since is not None and time.monotonic() - up_since < STABLE_S:
                self._short_lived += 1
            else:
                self._short_lived = 0
            return classify_disconnect(code, text, self.where, self._short_lived)
        if isinstance(read_error, ssl.SSLError) and "ALERT" in (read_error.reason or ""):
            return classify_error(read_error, self.where, self.identity)
        raw = ("closed_before_connack", type(read_error).__name__, str(read_error or ""))
        return self._probed(raw, self._closed_before_connack)

    def _closed_before_connack(self) -> ConnectionProblem:
        alert = _probe_alert(self.settings)
        if alert == "":  # it accepts our certificate, yet closed before its CONNACK
            return ConnectionProblem(
                REFUSED_BY_BROKER,
                f"the broker at {self.where} closed the connection before answering our CONNECT",
                "see the broker's log for why",
            )
        return rejected_by_broker(
            alert or "", f"the broker at {self.where}", self.identity, dt.datetime.now(dt.UTC)
        )

    @property
    def problem(self) -> ConnectionProblem | None:
        """Why the client is not connected now (None while connected, or before its first
        attempt has ended)."""
        return None if self.connected.is_set() else self._problem

    def _failed(self, problem: ConnectionProblem, retry_in: float) -> None:
        """Record why the last attempt failed; log it when the cause is new."""
        self._problem, self.last_error = problem, problem.line()
        level = log.warning if problem.cause != self._reported else log.debug
        if problem.cause != self._reported:
            self._said_connected = False
        self._reported = problem.cause
        level(
            "mqtt_connection_failed",
            broker=self.where,
            client_id=self.settings.client_id,
            cause=problem.cause,
            detail=problem.detail,
            hint=problem.hint,
            retry_in_s=round(retry_in, 1),
        )

    def _now_connected(self) -> None:
        """Connected (called every turn): logged once, and again only after a logged failure;
        a connection that stays up `STABLE_S` ends the streak of its causes."""
        now = time.monotonic()
        if self._connected_at is None:
            self._connected_at = now
            self._problem, self.failed_attempts, self._probe_cache = None, 0, None
            if not self._said_connected:
                self._said_connected = True
                log.info(
                    "mqtt_connected",
                    broker=self.where,
                    client_id=self.settings.client_id,
                    attempts=self._attempt + 1,
                )
        elif self._reported and now - self._connected_at >= STABLE_S:
            self._reported, self._short_lived = "", 0

    def _turn(self, timeout: float) -> None:
        """One turn of the connection: a (re)connection attempt when one is due (with jittered
        exponential back-off after failures), otherwise one network step of up to `timeout`."""
        if self._up:
            if self._step(timeout) == paho.MQTT_ERR_SUCCESS:
                if self.connected.is_set():
                    self._now_connected()
                    self._attempt = 0
                    return
                if self._acked or time.monotonic() - self._opened < CONNACK_TIMEOUT_S:
                    return
                problem = ConnectionProblem(
                    TIMEOUT,
                    f"no CONNACK from {self.where} within {CONNACK_TIMEOUT_S:g} s of the TLS "
                    "handshake",
                    "check that this port is an MQTT broker's",
                )
                with self._lock:
                    self._client._sock_close()  # our own override (_BufferedPaho)
            elif self._stop.is_set():  # our own disconnect (stop): nothing went wrong
                self._up = False
                self.connected.clear()
                return
            else:
                problem = self._lost()
            self._up = False
            self.connected.clear()
        else:
            wait = self._next_attempt - time.monotonic()
            if wait > 0:
                self._stop.wait(min(wait, timeout))
                return
            failed = self._connect()
            if failed is None:
                self._up = True
                return
            problem = failed
        delay = self.settings.backoff.delay(self._attempt)
        self._next_attempt = time.monotonic() + delay
        self._attempt += 1
        self.failed_attempts += 1
        self._failed(problem, delay)

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
            problem = self._problem
            if problem is None:
                raise MqttError(f"no connection to {self.where} within {timeout:g} s (no answer)")
            raise MqttError(
                f"no connection to {self.where} within {timeout:g} s ({problem.cause}: "
                f"{problem.detail})",
                hint=problem.hint,
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
