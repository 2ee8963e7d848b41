"""Real fleet components for integration tests: Mosquitto with the generated TLS + ACL config,
the verifier and agents as processes, and an observer with the read-only dashboard identity."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from agent.daemon import AgentConfig
from provisioning.broker import broker_user, find_mosquitto, prepare_state_dir, scratch_state_dir
from provisioning.home import DASHBOARD_CN, FleetHome
from strongroom import messages, topics
from strongroom.ear import AttestationResult, verify_result
from strongroom.errors import StrongroomError
from strongroom.mqtt import Inbound, MqttClient, MqttSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def offline_agent_config(root: Path, bundle: Path, **overrides: Any) -> AgentConfig:
    """An agent's configuration for tests that drive the daemon without a broker: port 1, where
    nothing listens; its image, state and socket under `root`."""
    settings: dict[str, Any] = {
        "bundle": bundle,
        "broker_host": "127.0.0.1",
        "broker_port": 1,
        "image": root / "enclave.img",
        "artifacts": (),
        "state_dir": root / "state",
        "socket": root / "agent.sock",
    }
    return AgentConfig(**(settings | overrides))


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.parent.name))
    return found


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class Proc:
    """A child process whose combined output goes to a log file."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("ab")
        self.p = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._log.close()
        return self.p.returncode


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "strongroom.cli", "--log-level", "info", *args]


@dataclass
class Broker:
    """`strongroom broker run` (Mosquitto under the broker's own user, CRL reloads) with its
    state directory outside the fleet home: pytest's tmp directories are closed to other users.
    The state directory lives as long as this object, so a restart keeps its persistence."""

    home: FleetHome
    port: int
    logdir: Path
    embedded: bool = False
    proc: Proc | None = None
    tag: str = ""  # names its state directory
    _state: Path | None = field(default=None, repr=False)

    @property
    def state_dir(self) -> Path:
        if self._state is None:
            self._state = scratch_state_dir(f"sr-broker{self.tag}-")
            weakref.finalize(self, shutil.rmtree, self._state.parent, True)
        return self._state

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    def restore(self, saved: Path) -> None:
        """Before the first start: begin with a copy of another broker's saved data."""
        user = broker_user()
        prepare_state_dir(self.state_dir, user)
        shutil.copytree(saved, self.data_dir)
        if not user.is_current:
            for path in [self.data_dir, *self.data_dir.rglob("*")]:
                os.chown(path, user.uid, user.gid)

    def start(self) -> None:
        log = self.logdir / "broker.log"
        if self.embedded:
            argv = cli(
                "broker",
                "run",
                "--embedded",
                "--home",
                str(self.home.root),
                "--port",
                str(self.port),
            )
        else:
            argv = cli(
                "broker",
                "run",
                "--home",
                str(self.home.root),
                "--port",
                str(self.port),
                "--state-dir",
                str(self.state_dir),
            )
        self.proc = Proc(argv, log)
        wait_until(self._accepting, 20, "the broker to listen")

    def _accepting(self) -> bool:
        if self.proc is not None and self.proc.p.poll() is not None:
            raise AssertionError(f"the broker exited: {self.proc.log()[-2000:]}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def mosquitto_pid(self) -> int:
        """The Mosquitto process `broker run` started (from its `broker_started` log line)."""
        assert self.proc is not None
        for line in self.proc.log().splitlines():
            if '"broker_started"' in line:
                return int(json.loads(line)["pid"])
        raise AssertionError("the broker did not log its start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    @property
    def url(self) -> str:
        return f"mqtts://localhost:{self.port}"


@dataclass
class Observer:
    """Reads what any dashboard may read: results, status and alerts."""

    home: FleetHome
    port: int
    protocol: Literal[5, 311] = 5
    seen: list[Inbound] = field(default_factory=list)
    client: MqttClient | None = None

    def start(self) -> Observer:
        self.client = MqttClient(
            MqttSettings(
                "localhost",
                self.port,
                self.home.ca_cert,
                self.home.root / "dashboard" / "client.pem",
                self.home.root / "dashboard" / "client.key",
                DASHBOARD_CN,
                session_expiry_s=0,
                clean_start=True,
                protocol=self.protocol,
            )
        ).start()
        self.client.wait_connected(10)
        for leaf in (topics.RESULT, topics.STATUS):
            self.client.subscribe(topics.any_device(leaf))
        self.client.subscribe(topics.ALERTS)
        return self

    def drain(self) -> list[Inbound]:
        assert self.client is not None
        while (msg := self.client.receive(0.01)) is not None:
            self.seen.append(msg)
        return self.seen

    def results(self, device_id: str) -> list[AttestationResult]:
        key = self.home.result_verify_key()
        topic = topics.device_topic(device_id, topics.RESULT)
        return [verify_result(m.payload, key) for m in self.drain() if m.topic == topic]

    def wait_result(self, device_id: str, status: str, timeout: float = 30) -> AttestationResult:
        def found() -> AttestationResult | None:
            matching = [r for r in self.results(device_id) if r.status == status]
            return matching[-1] if matching else None

        result: AttestationResult = wait_until(found, timeout, f"{status} result for {device_id}")
        return result

    def states(self, device_id: str) -> list[str]:
        """The device's status states seen so far (online, offline, revoked), oldest first."""
        topic = topics.device_topic(device_id, topics.STATUS)
        return [
            messages.Status.decode(m.payload).state
            for m in self.drain()
            if m.topic == topic and m.payload
        ]

    def alerts(self) -> list[messages.Alert]:
        out = []
        for m in self.drain():
            if m.topic == topics.ALERTS:
                with contextlib.suppress(StrongroomError):
                    out.append(messages.Alert.decode(m.payload))
        return out

    def stop(self) -> None:
        if self.client is not None:
            self.client.stop()


def bundle_client(
    port: int, bundle: Path, client_id: str, *, protocol: Literal[5, 311] = 5
) -> MqttClient:
    """A started MQTT client with a bundle's TLS identity (its client id may differ: tests
    try impostors), keeping no session."""
    return MqttClient(
        MqttSettings(
            "localhost",
            port,
            bundle / "tls/ca.pem",
            bundle / "tls/client.pem",
            bundle / "tls/client.key",
            client_id,
            protocol=protocol,
            session_expiry_s=0,
            clean_start=True,
        )
    ).start()


def verifier_client(home: FleetHome, port: int, instance: int = 1) -> MqttClient:
    """A started, connected client with a numbered verifier identity, keeping no session: what
    may publish results (tests forge them with it)."""
    cn, cert, key = home.verifier_identity(instance)
    client = MqttClient(
        MqttSettings(
            "localhost", port, home.ca_cert, cert, key, cn, session_expiry_s=0, clean_start=True
        )
    ).start()
    client.wait_connected(10)
    return client


def short_socket_dir() -> Path:
    """Unix socket paths are limited to ~100 bytes; pytest's tmp paths can be longer."""
    return Path(tempfile.mkdtemp(prefix="sr-", dir="/tmp"))


def require_mosquitto() -> None:
    try:
        find_mosquitto()
    except StrongroomError:
        if os.environ.get("CI"):
            raise
        pytest.skip("mosquitto is not installed (make test installs it)")


def copy_into_bundle(bundle: Path, image: Path, artifacts: list[Path]) -> None:
    shutil.copy(image, bundle / "enclave.img")
    (bundle / "artifacts").mkdir(exist_ok=True)
    for a in artifacts:
        shutil.copy(a, bundle / "artifacts" / a.name)


class Fleet:
    """A fleet home with a production enclave image and sealed artifacts, a real Mosquitto, the
    verifier process and agent processes. Call `start()` after any policy changes."""

    def __init__(self, root: Path, *, embedded: bool = False) -> None:
        from agent.enclave_source import write_enclave_source  # noqa: PLC0415 - heavy imports
        from provisioning.build import build_enclave  # noqa: PLC0415
        from provisioning.home import init_home  # noqa: PLC0415
        from provisioning.seal import seal_artifact  # noqa: PLC0415

        require_mosquitto()
        self.root = root
        self.home = init_home(root / "home")
        src = root / "enclave-src"
        write_enclave_source(src, self.home.verify_key("artifact"), self.home.result_verify_key())
        self.image = root / "enclave.img"
        build_enclave(self.home, src, self.image, svn=1)
        code = root / "vendor.py"
        code.write_text("def echo(x):\n    return {'echo': x}\n")
        self.code = root / "vendor-v1.sra"
        seal_artifact(self.home, code, self.code, name="vendor", version=1, kind="code")
        self.broker = Broker(self.home, free_port(), root, embedded=embedded)
        self.mqtt: list[str] = ["--mqtt", "3.1.1"] if embedded else []
        self.protocol: Literal[5, 311] = 311 if embedded else 5
        self.verifier: Proc | None = None
        self.agents: dict[str, Proc] = {}
        self.sockets = short_socket_dir()
        self.observer: Observer | None = None

    def start(
        self, *, challenge_interval: float | None = None, verifier_args: tuple[str, ...] = ()
    ) -> Fleet:
        self.broker.start()
        self.start_verifier(challenge_interval=challenge_interval, extra=verifier_args)
        self.observer = Observer(self.home, self.broker.port, self.protocol).start()
        return self

    def start_verifier(
        self, *, challenge_interval: float | None = None, extra: tuple[str, ...] = ()
    ) -> None:
        argv = cli(
            "verifier",
            "run",
            "--home",
            str(self.home.root),
            "--broker",
            self.broker.url,
            *self.mqtt,
            *extra,
        )
        if challenge_interval:
            argv += ["--challenge-interval", str(challenge_interval)]
        verifier = self.verifier = Proc(argv, self.root / "verifier.log")
        wait_until(lambda: "verifier_started" in verifier.log(), 20, "verifier start")

    def set_policy(self, text_from: str, text_to: str) -> None:
        path = self.home.policy_path
        text = path.read_text()
        assert text_from in text
        path.write_text(text.replace(text_from, text_to))

    def enroll(
        self,
        device_id: str,
        *,
        image: Path | None = None,
        artifacts: list[Path] | None = None,
        **kwargs: Any,
    ) -> Path:
        from provisioning.enroll import enroll_device  # noqa: PLC0415

        bundle = self.root / device_id
        enroll_device(self.home, device_id, bundle, **kwargs)
        copy_into_bundle(
            bundle, image or self.image, [self.code] if artifacts is None else artifacts
        )
        return bundle

    def socket(self, device_id: str) -> Path:
        return self.sockets / f"{device_id}.sock"

    def agent(self, device_id: str, *, interval: float = 300, dev: bool = False) -> Proc:
        argv = cli(
            "agent",
            "run",
            "--bundle",
            str(self.root / device_id),
            "--broker",
            self.broker.url,
            "--socket",
            str(self.socket(device_id)),
            "--interval",
            str(interval),
            *self.mqtt,
            "--no-privilege-separation",  # separated agents: tests/test_privilege_separation.py
        )
        if dev:
            argv.append("--dev")
        proc = Proc(argv, self.root / f"agent-{device_id}.log")
        self.agents[device_id] = proc
        return proc

    def invoke(
        self, device_id: str, entrypoint: str, value: str
    ) -> subprocess.CompletedProcess[str]:
        argv = cli(
            "agent",
            "invoke",
            "--bundle",
            str(self.root / device_id),
            "--socket",
            str(self.socket(device_id)),
            entrypoint,
            value,
        )
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    def stop(self) -> None:
        for proc in self.agents.values():
            proc.stop()
        if self.observer is not None:
            self.observer.stop()
        if self.verifier is not None:
            self.verifier.stop()
        self.broker.stop()
        shutil.rmtree(self.sockets, ignore_errors=True)
