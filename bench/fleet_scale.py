"""Benchmark: the largest simulated fleet this machine sustains, every device attesting every 30 s
(the verifier challenges each once per interval, spread over it), with p99 evidence-to-result
under 1 s and nothing lost, through the simulator's own Mosquitto (mutual TLS, ACL, descriptor
limit raised) and verifier; enclaves inline (one process per device does not fit), device
connections multiplexed on one asyncio loop per worker process.

For each size: enroll (reused across sizes), start, let every device connect and attest once
(warm-up, not measured), then measure for `--measure` seconds: evidence and results per second,
p50/p99 evidence -> result as the device sees it, evidence lost, and CPU (share of one core) and
peak RSS of the verifier, the broker and the simulator (main process plus workers), sampled from
/proc. Also: time to detect a tampered device (its first evidence to its contraindicated result)
and, with a real agent and enclave process, time from `device revoke` to the confirmed wipe.

    python bench/fleet_scale.py [--sizes 5000,7500] [--measure 120] [--warmup 60] [--home DIR]
"""

# ruff: noqa: PLC0415
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from device_sim.runner import SimConfig, run  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(root: int) -> dict[int, str]:
    """Descendants of `root` (pid -> role), from /proc."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        names[int(entry)] = cmd
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                cmd = names[child]
                role = (
                    "broker"
                    if "mosquitto" in cmd
                    else "verifier"
                    if "verifier run" in cmd
                    else "simulator"
                )
                found[child] = role
                frontier.append(child)
    return found


def _cpu_rss(pid: int) -> tuple[float, int]:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / TICKS
    rss = int(stat[21]) * PAGE
    return cpu, rss


class Sampler(threading.Thread):
    """CPU seconds (per role, each second) and peak RSS per role (a role's processes summed),
    for this process's descendants and itself."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.cpu: dict[int, tuple[str, float]] = {}
        self.peak: dict[str, int] = {}
        self.samples: list[tuple[float, dict[str, float]]] = []  # (wall time, CPU s per role)

    def sample(self) -> dict[str, float]:
        pids = {os.getpid(): "simulator", **_children(os.getpid())}
        rss_now: dict[str, int] = {}
        for pid, role in pids.items():
            try:
                cpu, rss = _cpu_rss(pid)
            except OSError:
                continue
            self.cpu[pid] = (role, cpu)
            rss_now[role] = rss_now.get(role, 0) + rss  # a role's processes together
        for role, rss in rss_now.items():
            self.peak[role] = max(self.peak.get(role, 0), rss)
        totals: dict[str, float] = {}
        for role, cpu in self.cpu.values():
            totals[role] = totals.get(role, 0.0) + cpu
        return totals

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.samples.append((time.time(), self.sample()))

    def cpu_share(self, start: float, end: float) -> dict[str, float]:
        """Each role's CPU time over [start, end] per second of wall time (1.0 = one core)."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return {role: (c1.get(role, 0.0) - c0.get(role, 0.0)) / (t1 - t0) for role in c1}


def measure(report: Path, start: float, end: float) -> dict[str, float]:
    """Evidence sent in [start, end - 5 s): its results, latency and losses, per the devices."""
    latencies, lost, sent, results = [], 0, 0, 0
    for line in report.with_name(report.name + ".devices.jsonl").read_text().splitlines():
        if not line.strip():
            continue  # no report from a worker (the scorecard counts it missing)
        d = json.loads(line)
        if d["scenario"] != "healthy":
            continue
        received: dict[int, float] = {}
        for t, _status, seq, _why in d["results"]:
            received.setdefault(seq, t)
            results += start <= t < end
        for seq, t in d["sent"].items():
            if not start <= t < end - 5:
                continue
            sent += 1
            if int(seq) in received:
                latencies.append(received[int(seq)] - t)
            else:
                lost += 1
    latencies.sort()
    span = end - start
    return {
        "evidence_per_s": sent / (span - 5),
        "results_per_s": results / span,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "lost": lost,
        "evidence": sent,
    }


def run_size(
    home: Path, devices: int, warmup: float, window: float, out: Path
) -> dict[str, object]:
    report = out / f"scorecard-{devices}.json"
    sampler = Sampler()
    sampler.start()
    config = SimConfig(
        home=home,
        devices=devices,
        scenarios=("healthy", "tampered-image"),
        duration_s=warmup + window,
        report=report,
        enclave="inline",
        interval_s=30,
        workers=2,
    )
    code = run(config, out=io.StringIO())
    sampler.stop.set()
    card = json.loads(report.read_text())
    ramp = min(30.0, devices / 200)  # as the simulator spreads its connections
    window_start = card["run"]["started_at"] + ramp + warmup
    window_end = card["run"]["ended_at"]
    figures = measure(report, window_start, window_end)
    ttd = card["scenarios"]["tampered-image"]["time_to_detect_s"]["p50"]
    cpu = sampler.cpu_share(window_start, window_end)
    ok = figures["p99_ms"] < 1000 and figures["lost"] == 0 and code == 0
    return {
        "devices": devices,
        "sustained": ok,
        **figures,
        "cpu": cpu,
        "peak_rss_mib": {r: v / 2**20 for r, v in sampler.peak.items()},
        "tampered_ttd_s": ttd,
        "scorecard_passed": card["passed"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,7500")
    parser.add_argument("--warmup", type=float, default=60.0)
    parser.add_argument("--measure", type=float, default=120.0)
    parser.add_argument("--home", type=Path, help="reuse this simulator home (enrollments kept)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        home = args.home or Path(tmp) / "sim-home"
        rows = [run_size(home, n, args.warmup, args.measure, Path(tmp)) for n in sizes]
        from verifier_throughput import revoke_to_wipe  # type: ignore[import-not-found]

        (Path(tmp) / "wipe").mkdir()
        wipe = revoke_to_wipe(Path(tmp) / "wipe")
    print(
        f"fleet scale: every device attests every 30 s; measured {args.measure:.0f} s after a "
        f"{args.warmup:.0f} s warm-up; target p99 < 1 s, nothing lost, >= 5,000 devices"
    )
    for r in rows:
        cpu = ", ".join(f"{k} {v:.0%}" for k, v in sorted(r["cpu"].items()))  # type: ignore[attr-defined]
        rss = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["peak_rss_mib"].items()))  # type: ignore[attr-defined]
        print(
            f"  {r['devices']:6} devices: {'SUSTAINED' if r['sustained'] else 'not sustained'}; "
            f"evidence {r['evidence_per_s']:.0f}/s, results {r['results_per_s']:.0f}/s, "
            f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, lost {r['lost']}"
        )
        print(f"          CPU (of one core): {cpu}; peak RSS MiB: {rss}")
        print(f"          tampered device detected in {r['tampered_ttd_s']} s")
    best = max((r["devices"] for r in rows if r["sustained"]), default=0)
    print(f"  largest sustained fleet: {best} devices")
    print(f"  device revoke -> enclave's confirmed wipe: {wipe * 1000:.0f} ms")


if __name__ == "__main__":
    main()
