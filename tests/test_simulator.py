"""The simulator's small-fleet scorecard: every scenario at least once, with enclaves as real
processes, against its own Mosquitto and verifier; zero mismatches and zero lost messages."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from device_sim import scenarios as sc
from device_sim.connection import Connection
from device_sim.device import MAX_ERRORS, DeviceReport, DeviceSpec, VirtualDevice
from device_sim.kit import Kit, enroll, open_kit
from device_sim.runner import Services, _observe
from device_sim.scenarios import SCENARIOS
from device_sim.scorecard import (
    FleetLog,
    judge,
    offline_needs_s,
    scorecard,
    table,
    why_observed,
)
from strongroom.cli import main
from tests.fleet import require_mosquitto


@pytest.mark.timeout(240)
def test_a_small_fleet_scorecard_has_no_mismatch_and_no_loss(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    require_mosquitto()
    report = tmp_path / "scorecard.json"
    argv = ["sim", "run", "--home", str(tmp_path / "home"), "--devices", str(len(SCENARIOS))]
    argv += ["--duration", "30", "--interval", "2", "--grace", "2", "--report", str(report)]
    code = main(argv)
    out, err = capfd.readouterr()  # the descriptors: the worker processes' output too
    card = json.loads(report.read_text())
    assert card["mismatched_devices"] == [], out
    assert code == 0, out
    assert card["enclave"] == "process"
    assert set(card["scenarios"]) == set(SCENARIOS)
    for name, row in card["scenarios"].items():
        assert row["observed"] == {SCENARIOS[name].expected: 1}, name
    attacks = [n for n, s in SCENARIOS.items() if s.attack]
    assert all(card["scenarios"][n]["detections"] == 1 for n in attacks)
    assert card["evidence"]["lost"] == 0
    assert card["evidence"]["results_received"] > 0
    assert "PASSED" in out
    # no asyncio callback failed (aiomqtt's deferred socket registration: device_sim/connection)
    assert "Exception in callback" not in err and "Bad file descriptor" not in err, err[-3000:]
    assert "keys_requested" not in out  # the devices' protocol logs go to the run's log files
    logs = (tmp_path / "home" / "sim" / "logs" / "devices-0.log").read_text()
    assert '"keys_requested"' in logs


class _Paho:
    """What a connection's socket callbacks use of paho's client."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | None = sock
        self._registered_write = True

    def socket(self) -> socket.socket | None:
        return self.sock

    def loop_read(self) -> None:
        pass

    def loop_write(self) -> None:
        pass


async def _close_before_deferred_registration(client_class: Any) -> list[dict[str, Any]]:
    """paho opens a socket and queues a write, then closes it in the same turn (a broker fault,
    a revoked certificate, a DISCONNECT answered by closing): forgets it, then closes it. The
    loop's callback failures are returned."""
    loop = asyncio.get_running_loop()
    failures: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: failures.append(context))
    client = client_class("localhost", 1)
    ours, theirs = socket.socketpair()
    paho = _Paho(ours)
    client._on_socket_open(paho, None, ours)
    client._on_socket_register_write(paho, None, ours)
    paho.sock = None
    client._on_socket_close(paho, None, ours)
    ours.close()
    await asyncio.sleep(0.05)
    theirs.close()
    return failures


async def _unregistered_before_deferred_registration(client_class: Any) -> bool:
    """paho asks for the writer and takes the request back before the deferred registration
    runs; whether a writer is left registered (one paho will never remove)."""
    client = client_class("localhost", 1)
    ours, theirs = socket.socketpair()
    paho = _Paho(ours)
    paho._registered_write = True
    client._on_socket_register_write(paho, None, ours)
    paho._registered_write = False
    client._on_socket_unregister_write(paho, None, ours)
    await asyncio.sleep(0.05)
    left: bool = asyncio.get_running_loop().remove_writer(ours.fileno())
    ours.close()
    theirs.close()
    return left


async def _a_client() -> aiomqtt.Client:
    return aiomqtt.Client("localhost", 1)  # never connected


def test_aiomqtt_and_paho_have_the_private_names_the_connection_relies_on() -> None:
    for name in (
        "_on_socket_open",
        "_on_socket_close",
        "_on_socket_register_write",
        "_on_socket_unregister_write",
        "_misc_loop",
    ):
        assert callable(getattr(aiomqtt.Client, name, None)), name
    client = asyncio.run(_a_client())
    for name in ("_loop", "_disconnected", "_misc_task"):
        assert hasattr(client, name), name
    paho = client._client  # a real paho Client, made by aiomqtt
    assert type(paho).__module__ == "paho.mqtt.client"
    assert paho._registered_write is False  # nothing to write before connecting


async def _register_write_without_pahos_flag() -> list[dict[str, Any]]:
    """A paho without `_registered_write` (renamed, say): the loop's callback failures."""
    loop = asyncio.get_running_loop()
    failures: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: failures.append(context))
    client = Connection("localhost", 1)
    ours, theirs = socket.socketpair()
    paho = _Paho(ours)
    del paho._registered_write
    client._on_socket_register_write(paho, None, ours)
    for _ in range(3):  # turns of the loop: the deferred registration runs in the next
        await asyncio.sleep(0)
    loop.remove_writer(ours.fileno())
    ours.close()
    theirs.close()
    return failures


def test_a_paho_without_the_flag_the_guard_reads_fails_loudly() -> None:
    failures = asyncio.run(_register_write_without_pahos_flag())
    assert any(isinstance(f.get("exception"), AttributeError) for f in failures), failures


def test_a_writer_unregistered_before_its_deferred_registration_is_not_added() -> None:
    assert not asyncio.run(_unregistered_before_deferred_registration(Connection))
    assert asyncio.run(_unregistered_before_deferred_registration(aiomqtt.Client))


def test_a_socket_closed_before_its_deferred_registration_is_left_alone() -> None:
    failures = asyncio.run(_close_before_deferred_registration(Connection))
    assert failures == []
    # aiomqtt's own client registers the closed descriptor (if this fails, aiomqtt fixed it
    # and device_sim/connection.py can go)
    failures = asyncio.run(_close_before_deferred_registration(aiomqtt.Client))
    assert any("Bad file descriptor" in str(f.get("exception")) for f in failures), failures


@dataclass
class AwayRestart:
    report: DeviceReport
    log: FleetLog
    broker_down_at: float
    broker_up_at: float


async def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


async def restart_the_broker_while_away(
    kit: Kit, services: Services, spec: DeviceSpec
) -> AwayRestart:
    """The broker goes down as the device leaves beyond the grace (the device waits for it), and
    comes back only once the device has found it down while away."""
    stop, stop_observer = asyncio.Event(), asyncio.Event()
    log = FleetLog(started_at=time.time())
    observer = asyncio.ensure_future(_observe(kit, spec.port, log, stop_observer))
    device = VirtualDevice(kit, spec, stop)
    down: list[float] = []

    async def on_phase(phase: str) -> None:
        if phase == "away-beyond-grace":
            await asyncio.to_thread(services.stop_broker)
            down.append(time.time())

    device.on_phase = on_phase
    running = asyncio.ensure_future(device.run())
    try:
        await until(lambda: down, 90, "the device to leave beyond the grace")
        await until(
            lambda: any("while away" in e and "refused" in e for e in device.report.errors),
            30,
            "the device to find the broker down while away",
        )
        await asyncio.to_thread(services.start_broker)
        up = time.time()

        def back_and_affirmed() -> bool:
            if device.phase != "back":
                return False
            back_at = device.report.offline[-1][1]
            return any(
                t > back_at and s == "affirming" for t, s, _ in log.results.get(spec.device_id, [])
            )

        await until(back_and_affirmed, 90, "an affirming result after coming back")
    finally:
        log.ended_at = time.time()
        stop.set()
        report = await running
        stop_observer.set()
        observer.cancel()
        await asyncio.gather(observer, return_exceptions=True)
    return AwayRestart(report, log, down[0], up)


@pytest.mark.timeout(240)
def test_an_offline_device_recovers_when_the_broker_restarts_while_it_is_away(
    tmp_path: Path,
) -> None:
    require_mosquitto()
    kit = open_kit(tmp_path / "home", interval_s=2, grace_s=2)
    device_id = "sim-offline-00000"
    enroll(kit, {device_id: "offline"})
    policy = kit.home.load_policy()
    interval, grace = float(policy.attestation_interval_s), float(policy.offline_grace_s)
    services = Services(kit, tmp_path)
    services.start_broker()
    services.start_verifier()
    spec = DeviceSpec(
        device_id, "offline", "inline", "localhost", services.port, interval, grace, device_id
    )
    try:
        run = asyncio.run(restart_the_broker_while_away(kit, services, spec))
    finally:
        services.stop()
    verdict, _seen = judge(run.report, run.log)
    assert verdict == sc.RECOVERED, why_observed(run.report, run.log)
    (away_from, away_to) = run.report.offline[1]
    assert run.broker_down_at <= away_from < run.broker_up_at < away_to


def test_an_unknown_scenario_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["sim", "run", "--home", str(tmp_path / "h"), "--scenarios", "healthy,bogus"])
    assert code == 2
    assert "unknown scenario 'bogus'" in capsys.readouterr().err


def test_a_home_not_made_by_the_simulator_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mine").mkdir()
    code = main(["sim", "run", "--home", str(tmp_path / "mine"), "--devices", "2"])
    assert code == 2
    assert "not a fleet home made by the simulator" in capsys.readouterr().err


# -- the scorecard (pure) ------------------------------------------------------------------------


def offline_report(**changes: object) -> DeviceReport:
    report = DeviceReport("sim-offline-00000", "offline", "inline")
    report.offline = [(110.0, 111.0), (130.0, 150.0)]
    for text in ("mqtt: first", "mqtt: Disconnected during message iteration", "mqtt: refused"):
        report.error(text)
    report.error("mqtt (while away): [Errno 111] Connection refused")
    for name, value in changes.items():
        setattr(report, name, value)
    return report


def test_the_table_says_why_a_device_mismatched_with_its_last_errors() -> None:
    log = FleetLog(started_at=100.0, ended_at=200.0)
    log.result("sim-offline-00000", 160.0, "affirming", "")  # back, but never declared stale
    card = scorecard([offline_report()], log, {})
    (mismatch,) = card["mismatched_devices"]
    assert mismatch["why"] == "not declared stale while away beyond the grace"
    assert mismatch["errors"][-1] == "mqtt (while away): [Errno 111] Connection refused"
    text = table(card)
    device_line = next(line for line in text.splitlines() if "sim-offline-00000" in line)
    assert "not-recovered, expected recovered" in device_line
    assert "not declared stale while away beyond the grace" in device_line
    errors_line = next(line for line in text.splitlines() if "last errors:" in line)
    assert "Connection refused" in errors_line and "Disconnected during" in errors_line
    assert "mqtt: first" not in text  # the newest three, not the first
    assert text.splitlines()[-1] == "FAILED: 1 mismatches"


def test_a_recovered_offline_device_lists_no_mismatch() -> None:
    log = FleetLog(started_at=100.0, ended_at=200.0)
    log.result("sim-offline-00000", 140.0, "none", "stale: no evidence for more than 7 s")
    log.result("sim-offline-00000", 151.0, "affirming", "")
    card = scorecard([offline_report()], log, {})
    assert card["mismatched_devices"] == [] and card["passed"]
    assert "last errors" not in table(card)


@pytest.mark.parametrize(
    "offline",
    [
        pytest.param([(110.0, 111.0)], id="stopped-before-its-second-time-away"),
        pytest.param([(110.0, 111.0), (130.0, 200.1)], id="stopped-while-away"),
    ],
)
def test_a_run_too_short_for_the_offline_scenario_skips_it(
    offline: list[tuple[float, float]],
) -> None:
    log = FleetLog(started_at=100.0, ended_at=200.0)
    card = scorecard([offline_report(offline=offline)], log, {})
    assert card["scenarios"]["offline"]["observed"] == {sc.SKIPPED: 1}
    assert card["mismatched_devices"] == []
    assert offline_needs_s(30, 5) > 100  # such a run at the default policy, say


def test_a_device_the_verifier_finds_stale_after_the_run_stopped_it_keeps_its_verdict() -> None:
    report = DeviceReport("sim-00000", "healthy", "inline")
    log = FleetLog(started_at=100.0, ended_at=200.0)
    log.result("sim-00000", 198.0, "affirming", "", seq=9)
    log.result("sim-00000", 204.0, "none", "stale: no evidence for more than 4 s")
    assert judge(report, log) == (sc.AFFIRMING, 198.0)
    log.result("sim-00000", 199.0, "none", "stale: no evidence for more than 4 s")  # in the run
    assert judge(report, log)[0] == "none"


def test_a_retained_result_received_again_after_a_reconnect_is_not_its_latency() -> None:
    report = DeviceReport("sim-00000", "healthy", "inline")
    report.sent = {1: 100.0}
    report.results = [(100.2, "affirming", 1, ""), (125.0, "affirming", 1, "")]  # then retained
    log = FleetLog(started_at=99.0, ended_at=200.0)
    log.result("sim-00000", 100.2, "affirming", "", seq=1)
    card = scorecard([report], log, {})
    assert card["evidence"]["latency_ms"] == {"p50": 200.0, "p99": 200.0}


def test_a_result_the_observer_saw_while_its_device_was_away_is_no_loss() -> None:
    report = DeviceReport("sim-00000", "healthy", "inline")
    report.sent = {1: 100.0, 2: 150.0}
    report.results = [(100.1, "affirming", 1, "")]  # it missed the answer to 2
    log = FleetLog(started_at=99.0, ended_at=200.0)
    log.result("sim-00000", 100.1, "affirming", "", seq=1)
    log.result("sim-00000", 150.3, "affirming", "", seq=2)
    evidence = scorecard([report], log, {})["evidence"]
    assert (evidence["sent"], evidence["results_received"], evidence["lost"]) == (2, 2, 0)
    assert evidence["latency_ms"]["p99"] == 300.0


def test_a_report_keeps_its_newest_errors_and_counts_them_all() -> None:
    report = DeviceReport("sim-00000", "healthy", "inline")
    for i in range(MAX_ERRORS + 5):
        report.error(f"error {i}")
    assert len(report.errors) == MAX_ERRORS and report.errors[-1] == f"error {MAX_ERRORS + 4}"
    assert report.error_count == MAX_ERRORS + 5
    assert DeviceReport.from_json_dict(report.to_json_dict()) == report
