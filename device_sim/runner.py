"""`strongroom sim run`: start (or use) a broker and a verifier, run the virtual devices in worker
processes (one asyncio loop each), watch the fleet with a read-only identity, restart the broker
mid-run when asked, and write the scorecard. Ctrl-C stops early with a partial report."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any

import aiomqtt
import structlog

from device_sim import scenarios as sc
from device_sim.connection import Connection
from device_sim.device import DeviceReport, DeviceSpec, VirtualDevice, _tls_files
from device_sim.kit import Kit, enroll, load_kit, open_kit, plan_fleet
from device_sim.ports import free_port, wait_listening
from device_sim.scorecard import FleetLog, offline_needs_s, scorecard, table
from provisioning.broker import find_mosquitto, scratch_state_dir
from strongroom import logs, messages, topics
from strongroom.ear import verify_result
from strongroom.errors import StrongroomError
from strongroom.fsutil import write_atomic

log = structlog.get_logger()
STOP_GRACE_S = 20.0  # devices have this long to disconnect cleanly once told to stop
STARTUP_LIMIT_S = 300.0  # the run starts without the devices whose enclaves are not up by then
OBSERVER_INSTANCE = 8  # the read-only identity `_dashboard-8` is the simulator's


@dataclass(frozen=True)
class SimConfig:
    home: Path
    devices: int
    scenarios: tuple[str, ...]
    duration_s: float
    report: Path
    enclave: str  # "inline" | "process"
    broker_url: str | None = None  # None: start our own broker and verifier
    interval_s: int = 30
    grace_s: int = 5
    workers: int = 1


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (thousands of connections)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Services:
    """The broker and verifier the simulator runs for its home."""

    def __init__(self, kit: Kit, logdir: Path) -> None:
        self.kit, self.logdir = kit, logdir
        self.port = free_port()
        self.broker: subprocess.Popen[bytes] | None = None
        self.verifier: subprocess.Popen[bytes] | None = None
        self.broker_state: Path | None = None

    def start_broker(self) -> None:
        """`broker run`: Mosquitto as its own user, with the fleet CRL, its fd limit raised."""
        find_mosquitto()  # a clear error rather than a broker that never listens
        if self.broker_state is None:  # outside the home, which is closed to the broker's user
            self.broker_state = scratch_state_dir("strongroom-sim-broker-")  # kept for restarts
        out = (self.logdir / "broker.log").open("ab")
        argv = [sys.executable, "-m", "strongroom.cli", "--log-level", "warning", "broker", "run"]
        argv += ["--home", str(self.kit.home.root), "--port", str(self.port)]
        argv += ["--state-dir", str(self.broker_state)]
        self.broker = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        wait_listening(self.port, 20, "the broker")

    def stop_broker(self) -> None:
        if self.broker is not None:
            self.broker.send_signal(signal.SIGTERM)
            self.broker.wait(15)
            self.broker = None

    def start_verifier(self) -> None:
        out = (self.logdir / "verifier.log").open("ab")
        argv = [sys.executable, "-m", "strongroom.cli", "--log-level", "warning", "verifier", "run"]
        argv += ["--home", str(self.kit.home.root), "--broker", f"mqtts://localhost:{self.port}"]
        self.verifier = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        time.sleep(2.0)  # connected and subscribed (it logs only warnings here)

    def stop(self) -> None:
        if self.verifier is not None:
            self.verifier.send_signal(signal.SIGTERM)
            self.verifier.wait(15)
        self.stop_broker()
        if self.broker_state is not None:
            shutil.rmtree(self.broker_state.parent, ignore_errors=True)


# -- workers -----------------------------------------------------------------------------------


def _worker(  # noqa: PLR0917 - a process's arguments, passed once
    home: str, specs: list[DeviceSpec], ramp_s: float, stop: Any, out: Any, up: Any, log: str
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    # the devices' protocol logs as the agent does (JSON lines), into the run's log directory
    logs.configure("info", json=True)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(Path(log).open("a")))  # noqa: SIM115 - the process's
    raise_fd_limit()
    reports = asyncio.run(_run_devices(Path(home), specs, ramp_s, stop, up))
    out.put([r.to_json_dict() for r in reports])


async def _run_devices(
    home: Path, specs: list[DeviceSpec], ramp_s: float, stop: Any, up: Any
) -> list[DeviceReport]:
    """Run `specs` until `stop`; `up` (a shared counter) counts the devices whose enclave has
    started (or was refused)."""
    kit = load_kit(home)
    stopped = asyncio.Event()
    devices = [VirtualDevice(kit, spec, stopped) for spec in specs]

    def started() -> None:
        with up.get_lock():
            up.value += 1

    async def watch_stop() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.2)
        stopped.set()

    async def start(i: int, device: VirtualDevice) -> DeviceReport:
        await asyncio.sleep(ramp_s * i / max(1, len(devices)))
        return await device.run(started)

    tasks = [asyncio.ensure_future(start(i, d)) for i, d in enumerate(devices)]
    await watch_stop()
    _done, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
    for task in pending:  # one stuck device must not cost the run its report
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    reports = []
    for device, task in zip(devices, tasks, strict=True):
        if task in pending:
            device.report.error(f"did not stop within {STOP_GRACE_S:g} s; cancelled")
        elif task.exception() is not None:
            error = task.exception()
            device.report.error(f"{type(error).__name__}: {error}")
        reports.append(device.report)
    return reports


# -- the observer --------------------------------------------------------------------------------


async def _observe(kit: Kit, port: int, fleet: FleetLog, stop: asyncio.Event) -> None:
    """The read-only observer. Retained messages on its first connection are state from before
    this run and are skipped; after a reconnect (a broker restart), those it has not seen yet
    were published while it was away and count, at the time they were appraised."""
    cn, cert, key = kit.home.dashboard_identity(OBSERVER_INSTANCE)
    verifier_key = kit.home.result_verify_key()
    last: dict[str, bytes] = {}  # topic -> the latest payload seen there
    connected_before = False
    while not stop.is_set():
        try:
            async with Connection(
                "localhost",
                port,
                identifier=cn,
                tls_context=_tls_files(kit.home.ca_cert, cert, key),
                protocol=aiomqtt.ProtocolVersion.V5,
            ) as client:
                for topic in (
                    topics.any_device(topics.RESULT),
                    topics.any_device(topics.STATUS),
                    topics.ALERTS,
                ):
                    await client.subscribe(topic, qos=1)
                missed_while_away = connected_before
                connected_before = True
                async for msg in client.messages:
                    topic = str(msg.topic)
                    payload = msg.payload if isinstance(msg.payload, bytes) else b""
                    seen, last[topic] = last.get(topic), payload
                    if msg.retain and (not missed_while_away or seen == payload):
                        continue  # from before this run, or seen already
                    _observed(fleet, topic, payload, verifier_key, appraised_at=msg.retain)
        except aiomqtt.MqttError:
            await asyncio.sleep(0.5)


def _observed(
    fleet: FleetLog, topic: str, payload: bytes, verifier_key: Any, *, appraised_at: bool = False
) -> None:
    """Record one message; a result at the time it arrived or (`appraised_at`, for one that
    arrived late) at its appraisal time."""
    now = time.time()
    try:
        if topic == topics.ALERTS:
            alert = messages.Alert.decode(payload)
            fleet.alert(alert.device_id, now, alert.reason)
            return
        device, leaf = topics.parse(topic)
        if leaf == topics.RESULT and payload:
            r = verify_result(payload, verifier_key)
            if r.device_id == device:  # another device's result proves nothing about this one
                at = float(r.iat) if appraised_at else now
                seq = r.details.get("seq")
                seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else 0
                fleet.result(device, at, r.status, "; ".join(r.reasons), seq)
        elif leaf == topics.STATUS and payload:
            fleet.status(device, messages.Status.decode(payload).report)
    except StrongroomError:
        pass  # the scorecard only counts what verifies


async def _collect(queue: Any, procs: list[Any]) -> list[DeviceReport]:
    """The workers' reports, each put once its devices stopped; a worker that died without
    reporting is not waited for."""
    reports: list[DeviceReport] = []
    waiting = len(procs)
    deadline = time.monotonic() + STOP_GRACE_S + 60
    while waiting and time.monotonic() < deadline:
        try:
            docs = await asyncio.to_thread(queue.get, True, 1.0)
        except Empty:
            if not any(p.is_alive() for p in procs):
                break
            continue
        reports += [DeviceReport.from_json_dict(d) for d in docs]
        waiting -= 1
    return reports


async def _fleet_up(up: Any, n: int, procs: list[Any], ctrl_c: asyncio.Event, out: Any) -> None:
    """Wait until every device's enclave is up (or refused) before the run's clock starts: on a
    loaded machine starting enclave processes can take longer than a short run, whose scenarios
    (offline, broker-restart) are timed from its start."""
    deadline = time.monotonic() + STARTUP_LIMIT_S
    last_note = 0.0
    while up.value < n and time.monotonic() < deadline and not ctrl_c.is_set():
        if not any(p.is_alive() for p in procs):
            break
        if time.monotonic() - last_note >= 5:
            print(f"starting: {up.value}/{n} devices up", file=out, flush=True)
            last_note = time.monotonic()
        await asyncio.sleep(0.1)
    if up.value < n:
        print(f"starting: only {up.value}/{n} devices up; running anyway", file=out, flush=True)


async def _drive(  # noqa: PLR0917 - the run's parts, passed once
    config: SimConfig,
    kit: Kit,
    services: Services,
    specs: list[DeviceSpec],
    fleet: FleetLog,
    names: tuple[str, ...],
    out: Any,
) -> tuple[list[DeviceReport], bool]:
    port = specs[0].port
    stop_observer = asyncio.Event()
    observer = asyncio.ensure_future(_observe(kit, port, fleet, stop_observer))
    await asyncio.sleep(1.0)
    ctx = mp.get_context("spawn")
    stop, queue, up = ctx.Event(), ctx.Queue(), ctx.Value("i", 0)
    ramp = min(30.0, len(specs) / 200)  # TLS handshakes spread over the first seconds
    chunks = [specs[i :: config.workers] for i in range(config.workers)]
    logdir = kit.root / "logs"
    procs = [
        ctx.Process(
            target=_worker,
            args=(str(config.home), chunk, ramp, stop, queue, up, str(logdir / f"devices-{i}.log")),
        )
        for i, chunk in enumerate(chunks)
        if chunk
    ]
    for p in procs:
        p.start()
    ctrl_c = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, ctrl_c.set)
    await _fleet_up(up, len(specs), procs, ctrl_c, out)
    started, restarted, last_note = time.time(), False, 0.0
    fleet.started_at = started
    total = config.duration_s + ramp
    try:
        while (elapsed := time.time() - started) < total and not ctrl_c.is_set():
            if "broker-restart" in names and not restarted and elapsed >= total * 0.7:
                services.stop_broker()
                await asyncio.sleep(1.0)
                services.start_broker()
                fleet.broker_restarted_at = time.time()
                restarted = True
            if elapsed - last_note >= 5 or last_note == 0:
                seen = sum(len(v) for v in fleet.results.values())
                bar = "#" * int(30 * elapsed / total)
                print(
                    f"[{bar:30}] {elapsed:5.0f}/{total:.0f} s, {seen} results", file=out, flush=True
                )
                last_note = elapsed
            await asyncio.sleep(0.25)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    interrupted = ctrl_c.is_set()
    if interrupted:
        print("interrupted: stopping the devices for a partial report", file=out)
    fleet.ended_at = time.time()
    stop.set()
    reports: list[DeviceReport] = []
    reports += await _collect(queue, procs)
    fleet.missing_reports = len(specs) - len(reports)
    for p in procs:
        await asyncio.to_thread(p.join, 30)
        if p.is_alive():  # its report came too late (or never): it would block our exit
            p.terminate()
    await asyncio.sleep(1.0)  # the last results reach the observer
    stop_observer.set()
    observer.cancel()
    return reports, interrupted


# -- the run ---------------------------------------------------------------------------------------


def run(config: SimConfig, out: Any = None) -> int:
    """Run the simulation and write its scorecard; progress and the table go to `out` (the
    standard output of the moment the run starts, by default)."""
    out = out if out is not None else sys.stdout
    names = config.scenarios
    notes: list[str] = []
    if config.broker_url is not None and "broker-restart" in names:
        names = tuple(n for n in names if n != "broker-restart")
        notes.append("broker-restart skipped: the broker is not the simulator's (--broker)")
    kit = open_kit(config.home, interval_s=config.interval_s, grace_s=config.grace_s)
    policy = kit.home.load_policy()
    needs = offline_needs_s(policy.attestation_interval_s, policy.offline_grace_s)
    if "offline" in names and config.duration_s < needs:
        notes.append(
            f"offline needs a run of about {needs:.0f} s at interval "
            f"{policy.attestation_interval_s} s and grace {policy.offline_grace_s} s: "
            "a shorter one scores it skipped"
        )
    for note in notes:
        print(f"note: {note}", file=out)
    plan = plan_fleet(sc.shares(config.devices, names))
    enroll(kit, plan)
    logdir = kit.root / "logs"
    logdir.mkdir(exist_ok=True)
    raise_fd_limit()
    services = Services(kit, logdir)
    if config.broker_url is None:
        services.start_broker()
        services.start_verifier()
        port = services.port
    else:
        port = int(config.broker_url.rsplit(":", 1)[1])
    victim = next(d for d, s in plan.items() if s == "healthy")
    specs = [
        DeviceSpec(
            d,
            s,
            config.enclave,
            "localhost",
            port,
            float(policy.attestation_interval_s),
            float(policy.offline_grace_s),
            victim,
        )
        for d, s in plan.items()
    ]
    fleet = FleetLog()
    try:
        reports, interrupted = asyncio.run(_drive(config, kit, services, specs, fleet, names, out))
    finally:
        services.stop()
    meta = {
        "devices": len(specs),
        "enclave": config.enclave,
        # what runs on the simulator's own copy of the platform, whatever the enclave mode
        "in_process_parts": {
            "clone": "the copied bundle's evidence",
            "stolen-sealed-keys": "sealing with one platform and unsealing with another",
        },
        "duration_s": config.duration_s,
        "broker": config.broker_url or "own Mosquitto (restarted mid-run)"
        if "broker-restart" in names
        else config.broker_url or "own Mosquitto",
        "policy": {
            "interval_s": policy.attestation_interval_s,
            "offline_grace_s": policy.offline_grace_s,
        },
        "interrupted": interrupted,
        "notes": notes,
    }
    card = scorecard(reports, fleet, meta)
    write_atomic(config.report, json.dumps(card, indent=2).encode(), 0o644)
    details = config.report.with_name(config.report.name + ".devices.jsonl")
    lines = [json.dumps(r.to_json_dict()) for r in reports]
    write_atomic(details, ("\n".join(lines) + "\n").encode(), 0o644)
    print(table(card), file=out)
    print(f"scorecard written to {config.report}", file=out)
    return 0 if card["passed"] and not interrupted else 1
