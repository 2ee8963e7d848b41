"""Benchmark: appraised evidence per second for one verifier (SQLite) and for two on a shared
subscription (PostgreSQL), through a real Mosquitto with the fleet's TLS + ACL configuration.

Signed evidence for N enrolled devices is made beforehand with the real platform code (quoting in
process, as the simulator's inline enclaves do) and published at QoS 1 by one client per device:
a backlog of `--rounds` evidence per device, published once while every verifier identity is away
(their persistent sessions queue it). Mosquitto saves that state on exit, and each run starts a
broker of its own from a copy, so every run drains the same backlog. The drain rate is read from
the verifiers' own store (its count of accepted evidence), sampled every 20 ms: the steady rate,
from the sample that saw 10 % of the backlog accepted to the one that saw 90 % (start-up and the
last batches are left out: two processes start and finish at slightly different times); the rate
over the whole drain is listed with each run. A subscriber taking the results live would compete
with the verifiers for the two cores. Afterwards a dashboard-identity observer must
receive every device's retained result, and latency (publish to retained result) is measured on a
further, paced round of 100. One and two verifiers take turns, `--repeat` times each; the figures
are medians (this machine's speed varies from minute to minute), each run listed too.
Beside it, the reference: libsodium's raw Ed25519 verification rate (`crypto_sign_open` on a
prepared signed message, one core, no Python around it but the call), measured in the same run,
before each round of cases; the evidence check uses that same libsodium (strongroom.signing). And,
with a real agent and enclave, the time from `device revoke` to the enclave's confirmed wipe.

Targets (issue 14): one process >= 40% of libsodium's raw verification rate; two processes
>= 1.6x one.

    python bench/verifier_throughput.py [--devices 1000] [--rounds 16] [--repeat 3]
        [--pg postgresql://postgres@127.0.0.1/test]
"""

# ruff: noqa: PLC0415
from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nacl.bindings
import nacl.signing

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from device_sim.inline import InlineEnclave, image_identity  # noqa: E402
from provisioning.enroll import enroll_device  # noqa: E402
from provisioning.home import FleetHome, init_home  # noqa: E402
from strongroom import messages, topics  # noqa: E402
from tests.fleet import Broker, Observer, Proc, bundle_client, cli, free_port, wait_until  # noqa: E402


def raw_verify_rate(seconds: float = 1.0) -> float:
    """libsodium's Ed25519 verifications per second (a 300-byte message, about an evidence's
    signed structure), through PyNaCl's thinnest binding."""
    key = nacl.signing.SigningKey.generate()
    public, signed = bytes(key.verify_key), bytes(key.sign(os.urandom(300)))
    verify = nacl.bindings.crypto_sign_open
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(200):
            verify(signed, public)
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


@dataclass(frozen=True)
class Case:
    """A verifier set-up: its label and, for a run, each process's arguments (a fresh database)
    and how many evidence that database has accepted."""

    label: str
    make: Callable[[str], tuple[list[list[str]], Callable[[], int]]]


def start_verifiers(
    home: FleetHome, broker: Broker, args: list[list[str]], logs: Path
) -> list[Proc]:
    base = ["--log-level", "warning", "verifier", "run", "--home", str(home.root)]
    return [
        Proc(cli(*base, "--broker", broker.url, *a), logs / f"verifier-{k}.log")
        for k, a in enumerate(args)
    ]


def publish_backlog(
    root: Path,
    home: FleetHome,
    bundles: dict[str, Path],
    backlog: list[dict[str, bytes]],
    cases: list[Case],
) -> Path:
    """Publish the backlog once, with every case's verifier identities subscribed and away, and
    return the directory where the broker saved it (sessions, subscriptions, queued messages)."""
    (root / "backlog").mkdir()
    broker = Broker(home, free_port(), root / "backlog", tag="backlog")
    broker.start()
    try:
        for case in cases:  # create their persistent sessions and subscriptions
            args, _accepted = case.make("sessions")
            procs = start_verifiers(home, broker, args, root / "backlog")
            time.sleep(2.0)
            for p in procs:
                p.stop()
        for evidence in backlog:
            publish_all(broker.port, bundles, evidence)
    finally:
        broker.stop()  # Mosquitto saves its state on exit
    saved = root / "backlog" / "saved"
    shutil.copytree(broker.data_dir, saved)
    return saved


def run_case(
    root: Path,
    home: FleetHome,
    bundles: dict[str, Path],
    *,
    saved: Path,
    rounds: list[dict[str, bytes]],
    case: Case,
    run: int,
) -> dict[str, float]:
    """Drain the saved backlog (`rounds` but the last) with the case's verifiers, then check the
    retained results and sample latency with the last round."""
    label = f"{case.label}-{run}"
    (root / label).mkdir()
    broker = Broker(home, free_port(), root / label, tag=label)
    broker.restore(saved)
    broker.start()
    observer = Observer(home, broker.port)
    arrived: dict[str, float] = {}

    def collect(devices: Iterable[str]) -> bool:
        assert observer.client is not None
        while (m := observer.client.receive(0.05)) is not None:
            if m.topic.endswith("/result"):
                arrived[m.topic.split("/")[1]] = m.received
        return all(d in arrived for d in devices)

    verifiers: list[Proc] = []
    try:
        args, accepted = case.make(label)
        total = sum(len(r) for r in rounds[:-1])
        started = time.monotonic()
        verifiers = start_verifiers(home, broker, args, root / label)
        samples = [(started, 0)]
        while samples[-1][1] < total:
            if time.monotonic() - started > 900:
                raise AssertionError(
                    f"{label}: the backlog was not drained ({samples[-1]}/{total})"
                )
            time.sleep(0.02)
            samples.append((time.monotonic(), accepted()))
        observer.start()  # every device's result is retained at the broker
        wait_until(lambda: collect(rounds[0]), 120, f"{label}: the retained results")
        arrived.clear()
        sample = dict(list(rounds[-1].items())[:100])
        sent = publish_all(broker.port, bundles, sample, pace_s=0.02)
        wait_until(lambda: collect(sample), 120, f"{label}: the paced sample")
        latencies = sorted(arrived[d] - sent[d] for d in sample)
        return {
            "rate": drain_rate(samples, 0.1, 0.9),
            "whole": drain_rate(samples, 0.0, 1.0),
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        }
    finally:
        for v in verifiers:
            v.stop()
        observer.stop()
        broker.stop()


def drain_rate(samples: list[tuple[float, int]], low: float, high: float) -> float:
    """Evidence per second between the first samples that saw `low` and `high` of the backlog
    accepted (0.0: the first sample that saw any)."""
    total = samples[-1][1]
    t0, n0 = next(s for s in samples if s[1] > 0 and s[1] >= low * total)
    t1, n1 = next(s for s in samples if s[1] >= high * total)
    assert t1 > t0, "the drain was shorter than the sampling interval"
    return (n1 - n0) / (t1 - t0)


def sqlite_accepted(db: Path) -> Callable[[], int]:
    def count() -> int:
        if not db.exists():
            return 0
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
            try:
                row = conn.execute("SELECT coalesce(sum(accepted), 0) FROM devices").fetchone()
                return int(row[0])
            except sqlite3.OperationalError:  # not created yet
                return 0

    return count


class PostgresSchemas:
    """A fresh schema per run on one server, counted through one connection, dropped at the end."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.url, self.schemas = url, list[str]()
        self._conn = psycopg.connect(url, autocommit=True)

    def new(self) -> str:
        self.schemas.append(f"bench_{secrets.token_hex(4)}")
        return self.schemas[-1]

    def accepted(self, schema: str) -> Callable[[], int]:
        import psycopg

        def count() -> int:
            try:
                query = f"SELECT coalesce(sum(accepted), 0) FROM {schema}.devices"  # noqa: S608 - our schema name
                row = self._conn.execute(query.encode()).fetchone()
            except psycopg.errors.UndefinedTable:
                return 0
            return 0 if row is None else int(row[0])

        return count

    def drop(self) -> None:
        for schema in self.schemas:
            self._conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE".encode())
        self._conn.close()


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
    parser.add_argument("--rounds", type=int, default=16, help="backlog: evidence per device")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    pg = PostgresSchemas(args.pg)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        def one(label: str) -> tuple[list[list[str]], Callable[[], int]]:
            db = root / f"{label}.sqlite"
            return [["--db", str(db)]], sqlite_accepted(db)

        def two(_label: str) -> tuple[list[list[str]], Callable[[], int]]:
            schema = pg.new()
            verifier = ["--db", args.pg, "--db-schema", schema, "--shared", "--instance"]
            return [[*verifier, "1"], [*verifier, "2"]], pg.accepted(schema)

        cases = [Case("one-sqlite", one), Case("two-postgres", two)]
        t0 = time.perf_counter()
        home, bundles = make_fleet(root, args.devices)
        rounds = make_evidence(root / "enclave.img", bundles, args.rounds + 1)
        saved = publish_backlog(root, home, bundles, rounds[:-1], cases)
        setup = time.perf_counter() - t0
        runs: dict[str, list[dict[str, float]]] = {c.label: [] for c in cases}
        raws = []
        try:
            for run in range(args.repeat):
                raws.append(raw_verify_rate())
                for case in cases:
                    runs[case.label].append(
                        run_case(
                            root, home, bundles, saved=saved, rounds=rounds, case=case, run=run
                        )
                    )
            wipe = revoke_to_wipe(root)
        finally:
            pg.drop()
    report(args, setup, raws=raws, ones=runs["one-sqlite"], twos=runs["two-postgres"], wipe=wipe)


def report(
    args: argparse.Namespace,
    setup: float,
    *,
    raws: list[float],
    ones: list[dict[str, float]],
    twos: list[dict[str, float]],
    wipe: float,
) -> None:
    def median(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    raw, one, two = statistics.median(raws), median(ones, "rate"), median(twos, "rate")
    print(
        f"verifier throughput, {args.devices} devices, a backlog of {args.rounds} signed evidence "
        f"each, QoS 1, real Mosquitto with mTLS + ACL (set-up {setup:.0f} s); "
        f"medians of {args.repeat} runs"
    )
    print(f"  raw Ed25519 verify (libsodium, same run)        {raw:9.0f} /s")
    print(
        f"  one verifier, SQLite                             {one:9.0f} /s  "
        f"({one / raw:.0%} of raw; target >= 40%)"
    )
    print(
        f"  two verifiers, PostgreSQL, shared subscription   {two:9.0f} /s  "
        f"({two / one:.2f}x one; target >= 1.6x)"
    )
    for label, runs in (("one", ones), ("two", twos)):
        print(
            f"  publish -> retained result, {label:3}: p50 {median(runs, 'p50_ms'):7.1f} ms, "
            f"p99 {median(runs, 'p99_ms'):7.1f} ms"
        )
    print(f"  device revoke -> enclave's confirmed wipe        {wipe * 1000:9.0f} ms")
    print(
        "  runs (raw; one, two: 10-90 %, whole drain /s): "
        + "; ".join(
            f"{r:.0f}; {o['rate']:.0f}, {o['whole']:.0f}; {t['rate']:.0f}, {t['whole']:.0f}"
            for r, o, t in zip(raws, ones, twos, strict=True)
        )
    )


if __name__ == "__main__":
    main()
