"""A failed broker connection is one log line naming its cause, within seconds, logged again only
when the cause changes, while the client keeps retrying; `MqttClient.problem` says the same.

Every cause against a real endpoint: the fleet's Mosquitto (generated TLS configuration), a
closed port, a plaintext Mosquitto, a plain TCP listener, a listener that never answers."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from structlog.testing import capture_logs

from provisioning import ca
from provisioning.broker import find_mosquitto
from provisioning.home import FleetHome, init_home
from strongroom import connection_problems as problems
from strongroom.fsutil import PUBLIC_FILE, SECRET_FILE, write_atomic
from strongroom.mqtt import MqttClient, MqttError, MqttSettings
from strongroom.retry import Backoff
from tests.fleet import Broker, free_port, require_mosquitto, wait_until

FAST = Backoff(initial_s=0.05, factor=1.0, cap_s=0.05, jitter=0.0)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FleetHome, Broker]]:
    """One fleet's Mosquitto for the module. Its server certificate names `localhost` only, so
    that 127.0.0.1 (the same listener) is a wrong host name."""
    require_mosquitto()
    root = tmp_path_factory.mktemp("diag")
    home = init_home(root / "home")
    server = ca.issue(home.ca_issued(), home.fleet_id, "broker", server_names=("localhost",))
    write_atomic(home.root / "broker" / "server.key", server.key_pem, SECRET_FILE)
    write_atomic(home.root / "broker" / "server.pem", server.cert_pem, PUBLIC_FILE)
    broker = Broker(home, free_port(), root)
    broker.start()
    yield home, broker
    broker.stop()


def _identity(directory: Path, name: str, issued: ca.Issued) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    write_atomic(key, issued.key_pem, SECRET_FILE)
    write_atomic(cert, issued.cert_pem, PUBLIC_FILE)
    return cert, key


def _settings(
    ca_file: Path, identity: tuple[Path, Path], port: int, host: str = "localhost", **kw: Any
) -> MqttSettings:
    return MqttSettings(
        host,
        port,
        ca_file,
        identity[0],
        identity[1],
        "dev-1",
        session_expiry_s=0,
        clean_start=True,
        backoff=FAST,
        **kw,
    )


def _device(home: FleetHome, tmp_path: Path, **issue: Any) -> tuple[Path, Path]:
    return _identity(
        tmp_path, "device", ca.issue(home.ca_issued(), home.fleet_id, "dev-1", **issue)
    )


def _diagnose(
    settings: MqttSettings, attempts: int = 3, timeout: float = 20
) -> tuple[str, list[MutableMapping[str, Any]]]:
    """Run a client until it has failed `attempts` times; its cause and the warnings logged."""
    with capture_logs() as logs:
        client = MqttClient(settings).start()
        try:
            wait_until(lambda: client.failed_attempts >= attempts, timeout, "failed attempts")
            problem = client.problem
            assert problem is not None
            assert not client.connected.is_set()
        finally:
            client.stop()
    warnings = [e for e in logs if e["event"] == "mqtt_connection_failed"]
    warnings = [e for e in warnings if e["log_level"] == "warning"]
    return problem.cause, warnings


def _assert_one_line(warnings: list[MutableMapping[str, Any]], cause: str) -> None:
    """Logged once although the client tried again and again."""
    assert [w["cause"] for w in warnings] == [cause]
    assert warnings[0]["hint"] and warnings[0]["detail"]


def test_an_unusable_ca_file_is_a_clear_error(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate")
    with pytest.raises(MqttError, match="fleet CA certificate"):
        MqttClient(_settings(not_pem, (not_pem, not_pem), free_port()))


def test_a_closed_port_is_refused(fleet: tuple[FleetHome, Broker], tmp_path: Path) -> None:
    home, _broker = fleet
    cause, warnings = _diagnose(_settings(home.ca_cert, _device(home, tmp_path), free_port()))
    assert cause == problems.REFUSED
    _assert_one_line(warnings, problems.REFUSED)


def test_a_broker_of_another_fleet_is_an_unknown_ca(
    fleet: tuple[FleetHome, Broker], tmp_path: Path
) -> None:
    _home, broker = fleet
    other = init_home(tmp_path / "other")  # a bundle of another fleet: its CA and certificate
    identity = _identity(tmp_path, "foreign", ca.issue(other.ca_issued(), other.fleet_id, "dev-1"))
    cause, warnings = _diagnose(_settings(other.ca_cert, identity, broker.port))
    assert cause == problems.UNKNOWN_CA
    _assert_one_line(warnings, problems.UNKNOWN_CA)


def test_a_certificate_of_another_fleet_is_rejected_by_the_broker(
    fleet: tuple[FleetHome, Broker], tmp_path: Path
) -> None:
    home, broker = fleet
    other = init_home(tmp_path / "other")
    identity = _identity(tmp_path, "foreign", ca.issue(other.ca_issued(), other.fleet_id, "dev-1"))
    cause, warnings = _diagnose(_settings(home.ca_cert, identity, broker.port))
    assert cause == problems.CERTIFICATE_REJECTED
    _assert_one_line(warnings, problems.CERTIFICATE_REJECTED)
    assert "CA" in warnings[0]["detail"]  # the broker's alert, heard through the TLS 1.2 probe


def test_an_expired_certificate_is_named(fleet: tuple[FleetHome, Broker], tmp_path: Path) -> None:
    home, broker = fleet
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=ca.LEAF_DAYS + 10)
    cause, warnings = _diagnose(
        _settings(home.ca_cert, _device(home, tmp_path, now=long_ago), broker.port)
    )
    assert cause == problems.CERTIFICATE_EXPIRED
    _assert_one_line(warnings, problems.CERTIFICATE_EXPIRED)
    assert "expired on" in warnings[0]["detail"]


def test_a_certificate_not_yet_valid_is_named(
    fleet: tuple[FleetHome, Broker], tmp_path: Path
) -> None:
    home, broker = fleet
    tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    cause, warnings = _diagnose(
        _settings(home.ca_cert, _device(home, tmp_path, now=tomorrow), broker.port)
    )
    assert cause == problems.CERTIFICATE_NOT_YET_VALID
    _assert_one_line(warnings, problems.CERTIFICATE_NOT_YET_VALID)
    assert "clock" in warnings[0]["hint"]


def test_a_name_the_broker_certificate_lacks_is_a_wrong_host_name(
    fleet: tuple[FleetHome, Broker], tmp_path: Path
) -> None:
    home, broker = fleet
    settings = _settings(home.ca_cert, _device(home, tmp_path), broker.port, host="127.0.0.1")
    cause, warnings = _diagnose(settings)
    assert cause == problems.WRONG_HOST_NAME
    _assert_one_line(warnings, problems.WRONG_HOST_NAME)


def _certificate_without_cn(home: FleetHome) -> ca.Issued:
    """Signed by the fleet CA but naming nobody: Mosquitto finds no username in it."""
    ca_key = serialization.load_pem_private_key(home.ca_key.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(home.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nobody")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.Issued(key_pem, cert.public_bytes(serialization.Encoding.PEM))


@pytest.mark.parametrize("protocol", [5, 311], ids=["mqtt5", "mqtt3.1.1"])
def test_a_connack_refusal_is_not_authorised(
    fleet: tuple[FleetHome, Broker], tmp_path: Path, protocol: Any
) -> None:
    home, broker = fleet
    identity = _identity(tmp_path, "nocn", _certificate_without_cn(home))
    settings = _settings(home.ca_cert, identity, broker.port, protocol=protocol)
    cause, warnings = _diagnose(settings)
    assert cause == problems.NOT_AUTHORISED
    _assert_one_line(warnings, problems.NOT_AUTHORISED)


@pytest.fixture
def plaintext_mosquitto(tmp_path: Path) -> Iterator[int]:
    """A Mosquitto listener without TLS (what a wrong port of a real broker often is)."""
    require_mosquitto()
    port = free_port()
    conf = tmp_path / "plain.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\n")
    proc = subprocess.Popen(
        [find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, 10, "the plaintext Mosquitto")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_plaintext_mosquitto_port_is_named(
    fleet: tuple[FleetHome, Broker], tmp_path: Path, plaintext_mosquitto: int
) -> None:
    home, _broker = fleet
    cause, warnings = _diagnose(
        _settings(home.ca_cert, _device(home, tmp_path), plaintext_mosquitto)
    )
    assert cause == problems.PLAINTEXT
    _assert_one_line(warnings, problems.PLAINTEXT)


class _Listener:
    """A TCP listener that answers every connection with `reply` (None: never answers)."""

    def __init__(self, reply: bytes | None, port: int = 0) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.reply, self._open = reply, True
        self._held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while self._open:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.reply is None:
                self._held.append(conn)  # silent: the handshake times out
                continue
            try:
                conn.recv(4096)
                conn.sendall(self.reply)
            except OSError:
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self._open = False
        self.sock.close()
        for conn in self._held:
            conn.close()


def test_a_plaintext_answer_to_the_handshake_is_named(
    fleet: tuple[FleetHome, Broker], tmp_path: Path
) -> None:
    home, _broker = fleet
    listener = _Listener(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    try:
        settings = _settings(home.ca_cert, _device(home, tmp_path), listener.port)
        cause, warnings = _diagnose(settings)
    finally:
        listener.close()
    assert cause == problems.PLAINTEXT
    _assert_one_line(warnings, problems.PLAINTEXT)


def test_a_silent_port_times_out_within_seconds(
    fleet: tuple[FleetHome, Broker], tmp_path: Path
) -> None:
    home, _broker = fleet
    listener = _Listener(None)
    started = time.monotonic()
    try:
        settings = _settings(home.ca_cert, _device(home, tmp_path), listener.port)
        cause, warnings = _diagnose(settings, attempts=1)
    finally:
        listener.close()
    assert cause == problems.TIMEOUT
    assert time.monotonic() - started < problems.CONNECT_TIMEOUT_S + 3
    _assert_one_line(warnings, problems.TIMEOUT)


class _Resetter(_Listener):
    """A TCP listener that resets every connection at its first bytes (a TLS handshake, or a
    plaintext probe), as some middleboxes and TLS-only proxies do."""

    def __init__(self) -> None:
        super().__init__(b"")

    def _serve(self) -> None:
        while self._open:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.recv(4096)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            finally:
                conn.close()


def _counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[float]:
    """Count (and time) the calls of the adapter's probe `name`."""
    import strongroom.mqtt  # noqa: PLC0415 - the module whose probe is counted

    real, calls = getattr(strongroom.mqtt, name), []

    def probe(*args: Any) -> Any:
        started = time.monotonic()
        try:
            return real(*args)
        finally:
            calls.append(time.monotonic() - started)

    monkeypatch.setattr(strongroom.mqtt, name, probe)
    return calls


def test_a_probe_is_not_repeated_while_the_failure_stays_the_same(
    fleet: tuple[FleetHome, Broker], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driven client probes in its owner's only thread: once per raw failure in a streak."""
    home, _broker = fleet
    calls = _counting(monkeypatch, "_probe_plaintext")
    listener = _Resetter()
    try:
        settings = _settings(home.ca_cert, _device(home, tmp_path), listener.port)
        cause, warnings = _diagnose(settings, attempts=4)
    finally:
        listener.close()
    assert cause == problems.TLS_ERROR
    _assert_one_line(warnings, problems.TLS_ERROR)
    assert len(calls) == 1


class _TlsCloser(_Listener):
    """A TLS listener with the fleet's broker certificate that closes each connection once its
    handshake is done, before any CONNACK, without an alert (as Mosquitto does under TLS 1.3
    with a certificate it refuses)."""

    def __init__(self, home: FleetHome) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        broker = home.root / "broker"
        self.context.load_cert_chain(broker / "server.pem", broker / "server.key")
        super().__init__(b"")

    def _serve(self) -> None:
        while self._open:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.settimeout(5)
                self.context.wrap_socket(conn, server_side=True).close()
            except OSError:
                conn.close()


def test_the_broker_alert_probe_is_not_repeated_on_every_retry(
    fleet: tuple[FleetHome, Broker], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, _broker = fleet
    calls = _counting(monkeypatch, "_probe_alert")
    listener = _TlsCloser(home)
    try:
        settings = _settings(home.ca_cert, _device(home, tmp_path), listener.port)
        cause, warnings = _diagnose(settings, attempts=4)
    finally:
        listener.close()
    assert cause == problems.REFUSED_BY_BROKER
    _assert_one_line(warnings, problems.REFUSED_BY_BROKER)
    assert len(calls) == 1


def test_a_new_cause_is_logged_again(fleet: tuple[FleetHome, Broker], tmp_path: Path) -> None:
    home, _broker = fleet
    port = free_port()
    with capture_logs() as logs:
        client = MqttClient(_settings(home.ca_cert, _device(home, tmp_path), port)).start()
        listener = None
        try:
            wait_until(lambda: client.failed_attempts >= 3, 10, "refusals")
            listener = _Listener(b"HTTP/1.1 400 Bad Request\r\n\r\n", port)
            wait_until(
                lambda: client.problem is not None and client.problem.cause == problems.PLAINTEXT,
                10,
                "the new cause",
            )
        finally:
            client.stop()
            if listener is not None:
                listener.close()
    causes = [
        e["cause"]
        for e in logs
        if e["event"] == "mqtt_connection_failed" and e["log_level"] == "warning"
    ]
    assert causes == [problems.REFUSED, problems.PLAINTEXT]


def test_a_second_client_with_our_identity_is_named_as_a_session_taken_over(
    fleet: tuple[FleetHome, Broker], tmp_path: Path
) -> None:
    """Mosquitto 2.0.11 closes the older connection without a DISCONNECT: the tug of war
    (each reconnect takes the session back) is recognised by its short-lived connections."""
    home, broker = fleet
    settings = _settings(home.ca_cert, _device(home, tmp_path), broker.port)
    with capture_logs() as logs:
        first = MqttClient(settings).start()
        second = None
        try:
            first.wait_connected(10)
            second = MqttClient(settings).start()

            def taken_over() -> bool:
                return any(e.get("cause") == problems.SESSION_TAKEN_OVER for e in list(logs))

            wait_until(taken_over, 20, "a session_taken_over line")
        finally:
            first.stop()
            if second is not None:
                second.stop()
    warned = [e for e in logs if e["log_level"] == "warning"]
    assert {e["cause"] for e in warned} <= {problems.CONNECTION_LOST, problems.SESSION_TAKEN_OVER}
    assert len(warned) <= 4  # one line per cause and client, not one per takeover


def test_wait_connected_says_the_cause_and_what_to_do(
    fleet: tuple[FleetHome, Broker], tmp_path: Path
) -> None:
    _home, broker = fleet
    other = init_home(tmp_path / "other")
    identity = _identity(tmp_path, "foreign", ca.issue(other.ca_issued(), other.fleet_id, "dev-1"))
    client = MqttClient(_settings(other.ca_cert, identity, broker.port)).start()
    try:
        with pytest.raises(MqttError) as raised:
            client.wait_connected(3)
    finally:
        client.stop()
    assert problems.UNKNOWN_CA in str(raised.value)
    assert "another fleet" in raised.value.diagnostics()


def test_our_own_stop_is_not_a_lost_connection(
    fleet: tuple[FleetHome, Broker], tmp_path: Path
) -> None:
    home, broker = fleet
    with capture_logs() as logs:
        client = MqttClient(_settings(home.ca_cert, _device(home, tmp_path), broker.port))
        client.start().wait_connected(10)
        client.stop()
    assert [e for e in logs if e["event"] == "mqtt_connection_failed"] == []
    assert client.problem is None
