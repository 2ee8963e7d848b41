"""Benchmark: appraised evidence per second for one verifier (SQLite) and for two on a shared
subscription (PostgreSQL), through a real Mosquitto with the fleet's TLS + ACL configuration.

Signed evidence for N enrolled devices is made beforehand with the real platform code (quoting in
process, as the simulator's inline enclaves do), published at QoS 1 by one client per device, and
a backlog of `--rounds` evidence per device is published while the verifiers are away (their
persistent sessions queue it). The drain rate is read from the verifiers' own store, sampled every
20 ms: the evidence accepted from the first sample that saw any to the one that saw all, over that
time (a subscriber taking the results live would compete with the verifiers for the two cores).
Afterwards a dashboard-identity observer must receive every device's retained result. Latency
(publish to retained result) is measured on a further, paced round of 100.
Beside it: the raw Ed25519 verification rate of the library the evidence check uses
(cryptography, through strongroom.cose), measured in the same run; and, with a real agent and
enclave, the time from `device revoke` to the enclave's confirmed wipe.

Targets (issue "Continuous trust"): one process >= 35% of the raw verification rate; two processes
>= 1.5x one.

    python bench/verifier_throughput.py [--devices 1000] [--rounds 4] [--pg postgresql://postgres@127.0.0.1/test]
"""

# ruff: noqa: PLC0415
from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from device_sim.inline import InlineEnclave, image_identity  # noqa: E402
from provisioning.enroll import enroll_device  # noqa: E402
from provisioning.home import FleetHome, init_home  # noqa: E402
from strongroom import messages, topics  # noqa: E402
from tests.fleet import Broker, Observer, Proc, bundle_client, cli, free_port, wait_until  # noqa: E402


def raw_verify_rate(seconds: float = 1.0) -> float:
    key = ed25519.Ed25519PrivateKey.generate()
    pub, msg = key.public_key(), os.urandom(300)
    sig = key.sign(msg)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(200):
            pub.verify(sig, msg)
        n += 200
    return n / (time.perf_counter() - start)


def make_fleet(root: Path, devices: int) -> tuple[FleetHome, dict[str, Path]]:
    from agent.enclave_source import write_enclave_source
    from provisioning.build import build_enclave

    home = init_home(root / "home")
    write_enclave_source(root / "src", home.verify_key("artifact"), home.result_verify_key())
    build_enclave(home, root / "src", root / "enclave.img", svn=1)
    bundles = {}
    for i in range(devices):
        device_id = f"bench-{i:05d}"
        bundles[device_id] = root / device_id
        enroll_device(home, device_id, bundles[device_id])
    return home, bundles


def make_evidence(image: Path, bundles: dict[str, Path], per_device: int) -> list[dict[str, bytes]]:
    """`per_device` rounds of evidence, each from the device's own simulated platform (a real
    report and a real quote, so sequence numbers rise from round to round)."""
    identity = image_identity(image.read_bytes())
    rounds: list[dict[str, bytes]] = [{} for _ in range(per_device)]
    for device_id, bundle in bundles.items():
        enclave = InlineEnclave.load(bundle, identity)
        for r in range(per_device):
            rounds[r][device_id] = enclave.evidence()
    return rounds


def _publish(port: int, bundle: Path, device_id: str, token: bytes) -> float:
    client = bundle_client(port, bundle, device_id)
    try:
        client.wait_connected(20)
        sent = time.monotonic()
        client.publish(topics.device_topic(device_id, topics.EVIDENCE), token)
        return sent
    finally:
        client.stop(timeout=1)


def publish_all(
    port: int, bundles: dict[str, Path], evidence: dict[str, bytes], pace_s: float = 0.0
) -> dict[str, float]:
    """Publish each device's evidence from its own connection: in parallel for a backlog, or
    one every `pace_s` seconds for latency."""
    if pace_s:
        sent = {}
        for device_id, token in evidence.items():
            sent[device_id] = _publish(port, bundles[device_id], device_id, token)
            time.sleep(pace_s)
        return sent
    with ThreadPoolExecutor(16) as pool:
        futures = {d: pool.submit(_publish, port, bundles[d], d, t) for d, t in evidence.items()}
        return {d: f.result() for d, f in futures.items()}


def run_case(
    root: Path,
    home: FleetHome,
    bundles: dict[str, Path],
    rounds: list[dict[str, bytes]],
    *,
    verifier_args: list[list[str]],
    label: str,
    accepted: Callable[[], int],
) -> dict[str, float]:
    """`accepted()`: how many evidence the verifiers' store has accepted so far."""
    (root / label).mkdir()
    broker = Broker(home, free_port(), root / label)
    broker.start()
    observer = Observer(home, broker.port)

    def start_verifiers(settle_s: float) -> list[Proc]:
        procs = [
            Proc(
                cli(
                    "--log-level",
                    "warning",
                    "verifier",
                    "run",
                    "--home",
                    str(home.root),
                    "--broker",
                    broker.url,
                    *args,
                ),
                root / label / f"verifier-{k}.log",
            )
            for k, args in enumerate(verifier_args)
        ]
        time.sleep(settle_s)
        return procs

    arrived: dict[str, float] = {}

    def collect(devices: Iterable[str]) -> bool:
        assert observer.client is not None
        while (m := observer.client.receive(0.05)) is not None:
            if m.topic.endswith("/result"):
                arrived[m.topic.split("/")[1]] = m.received
        return all(d in arrived for d in devices)

    try:
        for v in start_verifiers(2.0):  # create their persistent sessions and subscriptions
            v.stop()
        backlog, total = rounds[:-1], sum(len(r) for r in rounds[:-1])
        for evidence in backlog:  # the backlog waits at the broker
            publish_all(broker.port, bundles, evidence)
        started = time.monotonic()
        verifiers = start_verifiers(0.0)
        first: tuple[float, int] | None = None
        while (count := accepted()) < total:
            if time.monotonic() - started > 900:
                raise AssertionError(f"{label}: the backlog was not drained ({count}/{total})")
            if count and first is None:
                first = (time.monotonic(), count)
            time.sleep(0.02)
        drained = time.monotonic()
        assert first is not None, "the backlog was drained before the first sample"
        rate = (total - first[1]) / (drained - first[0])
        observer.start()  # every device's result is retained at the broker
        wait_until(lambda: collect(rounds[0]), 120, f"{label}: the retained results")
        arrived.clear()
        sample = dict(list(rounds[-1].items())[:100])
        sent = publish_all(broker.port, bundles, sample, pace_s=0.02)
        wait_until(lambda: collect(sample), 120, f"{label}: the paced sample")
        latencies = sorted(arrived[d] - sent[d] for d in sample)
        for v in verifiers:
            v.stop()
        return {
            "rate": rate,
            "drain_s": drained - started,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        }
    finally:
        observer.stop()
        broker.stop()


def sqlite_accepted(db: Path) -> Callable[[], int]:
    def count() -> int:
        if not db.exists():
            return 0
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
            try:
                return int(conn.execute("SELECT count(*) FROM seen").fetchone()[0])
            except sqlite3.OperationalError:  # not created yet
                return 0

    return count


def postgres_accepted(url: str, schema: str) -> Callable[[], int]:
    import psycopg

    conn = psycopg.connect(url, autocommit=True)  # one connection for all the samples

    def count() -> int:
        try:
            query = f"SELECT count(*) FROM {schema}.seen"  # noqa: S608 - our schema name
            row = conn.execute(query.encode()).fetchone()
        except psycopg.errors.UndefinedTable:
            return 0
        return 0 if row is None else int(row[0])

    return count


def revoke_to_wipe(root: Path) -> float:
    """With a real agent, enclave and verifier: `device revoke` to the enclave's confirmation."""
    from tests.fleet import Fleet

    (root / "revoke").mkdir()
    fleet = Fleet(root / "revoke")
    try:
        fleet.start()
        fleet.enroll("cam-r")
        fleet.agent("cam-r")
        fleet.observer.wait_result("cam-r", "affirming")
        wait_until(lambda: fleet.invoke("cam-r", "vendor:echo", "1").returncode == 0, 30, "keys")
        fleet.observer.drain()
        start = time.monotonic()
        subprocess.run(
            cli(
                "device", "revoke", "cam-r", "--home", str(fleet.home.root), "--reason", "benchmark"
            ),
            check=True,
            capture_output=True,
        )

        def confirmed() -> bool:
            return any(
                m.topic.endswith("/status")
                and m.payload
                and messages.Status.decode(m.payload).state == "revoked"
                for m in fleet.observer.drain()
            )

        wait_until(confirmed, 30, "the wipe's confirmation")
        return time.monotonic() - start
    finally:
        fleet.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4, help="backlog: evidence per device")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        home, bundles = make_fleet(root, args.devices)
        rounds = make_evidence(root / "enclave.img", bundles, args.rounds + 1)
        setup = time.perf_counter() - t0
        raw = raw_verify_rate()
        one = run_case(
            root,
            home,
            bundles,
            rounds,
            verifier_args=[["--db", str(root / "one.sqlite")]],
            label="one-sqlite",
            accepted=sqlite_accepted(root / "one.sqlite"),
        )
        schema = f"bench_{secrets.token_hex(4)}"
        two = run_case(
            root,
            home,
            bundles,
            rounds,
            verifier_args=[
                ["--db", args.pg, "--db-schema", schema, "--shared", "--instance", str(i)]
                for i in (1, 2)
            ],
            label="two-postgres",
            accepted=postgres_accepted(args.pg, schema),
        )
        wipe = revoke_to_wipe(root)
    print(
        f"verifier throughput, {args.devices} devices, a backlog of {args.rounds} signed evidence "
        "each, QoS 1, "
        f"real Mosquitto with mTLS + ACL (set-up {setup:.0f} s)"
    )
    print(f"  raw Ed25519 verify (cryptography, same run)     {raw:9.0f} /s")
    print(
        f"  one verifier, SQLite                             {one['rate']:9.0f} /s  "
        f"({one['rate'] / raw:.0%} of raw; target >= 35%)"
    )
    print(
        f"  two verifiers, PostgreSQL, shared subscription   {two['rate']:9.0f} /s  "
        f"({two['rate'] / one['rate']:.2f}x one; target >= 1.5x)"
    )
    for label, r in (("one", one), ("two", two)):
        print(
            f"  publish -> retained result, {label:3}: p50 {r['p50_ms']:7.1f} ms, "
            f"p99 {r['p99_ms']:7.1f} ms"
        )
    print(f"  device revoke -> enclave's confirmed wipe        {wipe * 1000:9.0f} ms")


if __name__ == "__main__":
    main()
