"""The verifier as a process against a real Mosquitto (the generated config) and real evidence:
at-least-once, end to end (it acknowledges evidence only once what it decided is committed, so
killing it with SIGKILL at any point of a backlog drain loses nothing; the kill points are drawn
from a seeded generator, and the assertions hold wherever they fall), and a validly signed poison
left retained on a device's topic stops it neither then nor at its next starts."""

from __future__ import annotations

import contextlib
import math
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.enclave_source import write_enclave_source
from device_sim.inline import InlineEnclave, image_identity
from provisioning.build import build_enclave
from provisioning.enroll import enroll_device
from provisioning.home import FleetHome, init_home
from strongroom import topics
from strongroom.mqtt import MqttClient
from tests.fleet import (
    Broker,
    Observer,
    Proc,
    bundle_client,
    cli,
    free_port,
    require_mosquitto,
    wait_until,
)
from tests.tokens import resigned

pytestmark = pytest.mark.integration

DEVICES = 4
PER_DEVICE = 250
KILL_STEP = 60  # at most this many more evidence accepted before the next kill is due
MAX_KILLS = 25


def _accepted(db: Path) -> dict[str, tuple[int, int]]:
    """Per device: evidence accepted, highest sequence number (read beside the running verifier)."""
    if not db.exists():
        return {}
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        try:
            rows = conn.execute("SELECT device_id, accepted, last_seq FROM devices").fetchall()
        except sqlite3.OperationalError:  # not created yet
            return {}
    return {d: (int(a), int(s)) for d, a, s in rows}


def _total(db: Path) -> int:
    return sum(a for a, _s in _accepted(db).values())


def _kill_once_accepted(proc: Proc, db: Path, target: int) -> None:
    """SIGKILL the verifier as soon as `target` evidence are accepted (polled every 5 ms: the
    kill lands within a batch or two of it)."""
    deadline = time.monotonic() + 45
    while _total(db) < target:
        assert time.monotonic() < deadline, f"timed out waiting for {target} evidence accepted"
        assert proc.p.poll() is None, proc.log()
        time.sleep(0.005)
    proc.p.kill()
    proc.stop()


def _fleet(
    root: Path, per_device: int = PER_DEVICE
) -> tuple[FleetHome, dict[str, Path], dict[str, list[bytes]]]:
    home = init_home(root / "home")
    write_enclave_source(root / "src", home.verify_key("artifact"), home.result_verify_key())
    build_enclave(home, root / "src", root / "enclave.img", svn=1)
    identity = image_identity((root / "enclave.img").read_bytes())
    bundles, evidence = {}, {}
    for i in range(DEVICES):
        device_id = f"cam-{i}"
        bundles[device_id] = root / device_id
        enroll_device(home, device_id, bundles[device_id])
        enclave = InlineEnclave.load(bundles[device_id], identity)
        evidence[device_id] = [enclave.evidence() for _ in range(per_device)]
    return home, bundles, evidence


@pytest.fixture
def started() -> Iterator[Callable[[Proc], Proc]]:
    """Keeps the verifier processes a test starts, and stops them whatever happened."""
    procs: list[Proc] = []

    def keep(proc: Proc) -> Proc:
        procs.append(proc)
        return proc

    yield keep
    for proc in procs:
        proc.stop()


def test_killing_the_verifier_during_a_drain_loses_no_evidence_and_accepts_none_twice(
    tmp_path: Path, started: Callable[[Proc], Proc]
) -> None:
    require_mosquitto()
    home, bundles, evidence = _fleet(tmp_path)
    broker = Broker(home, free_port(), tmp_path)
    broker.start()
    db = tmp_path / "state.sqlite"
    argv = cli("verifier", "run", "--home", str(home.root), "--broker", broker.url, "--db", str(db))
    logs = tmp_path / "verifier.log"
    try:
        # its persistent session and subscriptions exist once it has accepted a first evidence
        verifier = started(Proc(argv, logs))
        first = bundle_client(broker.port, bundles["cam-0"], "cam-0")
        first.wait_connected(10)

        def subscribed() -> bool:  # published again until the subscription is in place
            first.publish(topics.device_topic("cam-0", topics.EVIDENCE), evidence["cam-0"][0])
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                if _total(db) >= 1:
                    return True
                time.sleep(0.05)
            return False

        wait_until(subscribed, 30, "the verifier to subscribe")
        first.stop()
        assert verifier.stop() == 0
        total = DEVICES * PER_DEVICE
        for device_id, tokens in evidence.items():  # the backlog, while the verifier is away
            client = bundle_client(broker.port, bundles[device_id], device_id)
            client.wait_connected(10)
            for token in tokens[1:] if device_id == "cam-0" else tokens:
                client.publish(topics.device_topic(device_id, topics.EVIDENCE), token)
            client.stop()

        rng = random.Random(13)
        kills = mid_drain = 0
        while _total(db) < total and kills < MAX_KILLS:
            target = min(total, _total(db) + rng.randint(1, KILL_STEP))
            verifier = started(Proc(argv, logs))
            _kill_once_accepted(verifier, db, target)  # SIGKILL: no clean-up, whatever it did
            kills += 1
            mid_drain += _total(db) < total
        assert mid_drain >= 3, "the kills should fall inside the drain"

        connections = verifier.log().count('"broker_connected"')
        verifier = started(Proc(argv, logs))
        wait_until(  # the last start drains the rest, if any, and is up before it is stopped
            lambda: (
                verifier.log().count('"broker_connected"') > connections and _total(db) >= total
            ),
            60,
            "the whole backlog accepted",
        )
        observer = Observer(home, broker.port).start()
        try:
            for device_id in bundles:  # every retained result names the device's last evidence
                wait_until(
                    lambda d=device_id: any(
                        r.details.get("seq") == PER_DEVICE for r in observer.results(d)
                    ),
                    20,
                    f"the last result of {device_id}",
                )
        finally:
            observer.stop()
        assert verifier.stop() == 0
        accepted = _accepted(db)
        assert accepted == {d: (PER_DEVICE, PER_DEVICE) for d in bundles}  # each seq once, all
        assert "internal error" not in verifier.log()
    finally:
        broker.stop()


def test_a_retained_poison_is_cleared_and_stops_the_verifier_at_no_start(
    tmp_path: Path, started: Callable[[Proc], Proc]
) -> None:
    require_mosquitto()
    home, bundles, evidence = _fleet(tmp_path, per_device=3)
    broker = Broker(home, free_port(), tmp_path)
    broker.start()
    db = tmp_path / "state.sqlite"
    argv = cli("verifier", "run", "--home", str(home.root), "--broker", broker.url, "--db", str(db))
    poison = resigned(bundles["cam-0"], "cam-0", evidence["cam-0"][0], iat=math.inf, seq=2**64 + 7)
    try:
        attacker = bundle_client(broker.port, bundles["cam-0"], "cam-0")
        attacker.wait_connected(10)
        attacker.publish(topics.device_topic("cam-0", topics.EVIDENCE), poison, retain=True)
        attacker.stop()
        for start in range(3):
            verifier = started(Proc(argv, tmp_path / f"verifier-{start}.log"))
            client = bundle_client(broker.port, bundles["cam-1"], "cam-1")
            client.wait_connected(10)
            token = evidence["cam-1"][start]

            def appraised(
                token: bytes = token, client: MqttClient = client, start: int = start
            ) -> bool:  # published again until the verifier is subscribed
                client.publish(topics.device_topic("cam-1", topics.EVIDENCE), token)
                return _accepted(db).get("cam-1", (0, 0))[0] > start

            wait_until(appraised, 30, f"cam-1's evidence appraised after start {start}")
            client.stop()
            assert verifier.p.poll() is None, verifier.log()
            assert verifier.stop() == 0
            cleared = "retained_message_cleared" in verifier.log()
            assert cleared == (start == 0), verifier.log()  # cleared at once, then gone
        assert "cam-0" not in _accepted(db) or _accepted(db)["cam-0"] == (0, 0)
    finally:
        broker.stop()
