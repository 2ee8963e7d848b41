"""Daemons say at start, at the default log level, what they serve, where they connect and as
whom; a broker they cannot reach is one line naming the cause; Ctrl-C (SIGINT) stops them
without a traceback. One-shot commands stay quiet."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from provisioning.enroll import enroll_device
from provisioning.home import FleetHome
from tests.fleet import Broker, free_port, require_mosquitto, short_socket_dir, wait_until


def _strongroom(*args: str) -> list[str]:
    return [sys.executable, "-m", "strongroom.cli", *args]  # no --log-level: the default


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Daemon:
    def __init__(self, argv: list[str], log: Path, *, sigint_ignored: bool = False) -> None:
        """`sigint_ignored`: started as a shell without job control starts a background job
        (SIGINT ignored, which an exec hands down), as CI may start the tests."""
        self.log_path = log
        self._log = log.open("wb")
        self.p = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            preexec_fn=_ignore_sigint if sigint_ignored else None,  # noqa: PLW1509 - no threads
        )

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def event(self, name: str, timeout: float = 20) -> dict[str, Any]:
        found: dict[str, Any] = wait_until(
            lambda: next((e for e in self.lines() if e["event"] == name), None), timeout, name
        )
        return found

    def interrupt(self) -> tuple[int, str]:
        self.p.send_signal(signal.SIGINT)
        try:
            code = self.p.wait(20)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()
            self._log.close()
        return code, self.log_path.read_text(errors="replace")


def _stops_cleanly(daemon: _Daemon) -> None:
    code, text = daemon.interrupt()
    assert code in (0, 130), text[-2000:]
    assert "Traceback" not in text


def test_the_verifier_says_what_it_serves_and_names_an_unreachable_broker(
    fleet_home: FleetHome, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens
    daemon = _Daemon(
        _strongroom(
            "verifier",
            "run",
            "--home",
            str(fleet_home.root),
            "--broker",
            f"mqtts://localhost:{port}",
        ),
        tmp_path / "verifier.log",
    )
    started = daemon.event("verifier_started")
    assert started["fleet"] == fleet_home.fleet_id
    assert started["broker"] == f"localhost:{port}" and started["identity"] == "_verifier"
    assert started["store"].endswith("state.sqlite")
    failed = daemon.event("mqtt_connection_failed")
    assert failed["cause"] == "refused" and failed["level"] == "warning"
    time.sleep(2)  # retries go on; the cause is not logged again
    assert sum(e["event"] == "mqtt_connection_failed" for e in daemon.lines()) == 1
    _stops_cleanly(daemon)


def test_the_dashboard_says_where_it_serves_and_stops_on_ctrl_c(
    fleet_home: FleetHome, tmp_path: Path
) -> None:
    web, broker = free_port(), free_port()
    daemon = _Daemon(
        _strongroom(
            "dashboard",
            "--home",
            str(fleet_home.root),
            "--port",
            str(web),
            "--broker",
            f"mqtts://localhost:{broker}",
        ),
        tmp_path / "dashboard.log",
    )
    started = daemon.event("dashboard_started")
    assert started["url"] == f"http://127.0.0.1:{web}/"
    assert started["broker"] == f"localhost:{broker}" and started["identity"] == "_dashboard-1"
    assert daemon.event("mqtt_connection_failed")["cause"] == "refused"
    _stops_cleanly(daemon)


def test_status_watch_says_where_it_connects_and_stops_on_ctrl_c(
    fleet_home: FleetHome, tmp_path: Path
) -> None:
    broker = free_port()
    daemon = _Daemon(
        _strongroom(
            "status", "--home", str(fleet_home.root), "--watch", "--json",
            "--broker", f"mqtts://localhost:{broker}",
        ),
        tmp_path / "status.log",
    )  # fmt: skip
    assert daemon.event("status_watching")["broker"] == f"localhost:{broker}"
    assert daemon.event("mqtt_connection_failed")["cause"] == "refused"
    _stops_cleanly(daemon)


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["terminal", "background-job"])
def test_broker_run_says_its_listener_crl_and_user_and_stops_on_ctrl_c(
    fleet_home: FleetHome, tmp_path: Path, sigint_ignored: bool
) -> None:
    """Ctrl-C right after the start stops Mosquitto too: a SIGINT passed on before it installs
    its handlers used to be lost where SIGINT was inherited ignored, and `broker run` waited."""
    require_mosquitto()
    place = Broker(fleet_home, free_port(), tmp_path)
    daemon = _Daemon(
        _strongroom(
            "broker", "run", "--home", str(fleet_home.root), "--port", str(place.port),
            "--state-dir", str(place.state_dir),
        ),
        tmp_path / "broker.log",
        sigint_ignored=sigint_ignored,
    )  # fmt: skip
    starting = daemon.event("broker_starting")
    assert starting["listener"] == f"127.0.0.1:{place.port}"
    assert starting["crl"].endswith("crl.pem") and starting["user"]
    daemon.event("broker_started")
    _stops_cleanly(daemon)


def test_the_agent_says_who_it_is_and_where_it_connects(
    fleet_home: FleetHome, tmp_path: Path
) -> None:
    bundle = tmp_path / "cam-1"
    enroll_device(fleet_home, "cam-1", bundle)  # no enclave image: it stops right after
    socket_path = short_socket_dir() / "a.sock"
    run = subprocess.run(
        _strongroom(
            "agent", "run", "--bundle", str(bundle), "--broker", "mqtts://localhost:1",
            "--socket", str(socket_path), "--no-privilege-separation",
        ),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    events = [json.loads(x) for x in run.stderr.splitlines() if x.startswith("{")]
    starting = next(e for e in events if e["event"] == "agent_starting")
    assert starting["device"] == "cam-1" and starting["broker"] == "localhost:1"
    assert "CN=cam-1" in starting["certificate"] and starting["certificate_expires"]
    assert starting["socket"] == str(socket_path)
    assert starting["state"] == str(bundle / "state")


@pytest.mark.parametrize(
    "argv", [["fleet", "init"], ["doctor", "--home"]], ids=["fleet-init", "doctor"]
)
def test_one_shot_commands_log_nothing_by_default(tmp_path: Path, argv: list[str]) -> None:
    home = tmp_path / "home"
    if argv[0] == "doctor":
        subprocess.run(_strongroom("fleet", "init", str(home)), check=True, capture_output=True)
    run = subprocess.run(
        _strongroom(*argv, str(home)), capture_output=True, text=True, timeout=60, check=False
    )
    assert run.stderr == "", run.stderr
