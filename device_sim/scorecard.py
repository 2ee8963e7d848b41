"""The scorecard: each device's observed verdict against its scenario's expected one, detections,
false positives and negatives, time to detect, evidence counts, losses and latency. Pure: it
judges the devices' reports and what the fleet published (results, alerts, statuses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from device_sim import scenarios as sc
from device_sim.device import FORGED_MARK, DeviceReport

SETTLE_S = 3.0  # evidence sent this close to the end is not counted as lost
TABLE_MISMATCHES = 10  # mismatched devices listed under the table (all of them in the JSON)
LAST_ERRORS = 3  # a mismatched device's newest errors shown


@dataclass
class FleetLog:
    """What the simulator's read-only observer saw, per device."""

    results: dict[str, list[tuple[float, str, str]]] = field(default_factory=dict)  # t, status, why
    alerts: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    answered: dict[str, dict[int, float]] = field(default_factory=dict)  # seq -> first result
    forged_status_seen: set[str] = field(default_factory=set)
    broker_restarted_at: float | None = None
    started_at: float = 0.0  # devices started connecting
    ended_at: float = 0.0  # devices told to stop
    missing_reports: int = 0  # devices whose worker process ended without reporting

    def result(self, device: str, t: float, status: str, why: str, seq: int = 0) -> None:
        self.results.setdefault(device, []).append((t, status, why))
        if seq:  # the evidence it answers (stale results answer none)
            first = self.answered.setdefault(device, {})
            first[seq] = min(t, first.get(seq, t))

    def alert(self, device: str, t: float, reason: str) -> None:
        self.alerts.setdefault(device, []).append((t, reason))

    def status(self, device: str, report: str) -> None:
        if FORGED_MARK in report:
            self.forged_status_seen.add(device)


def judge(r: DeviceReport, log: FleetLog) -> tuple[str, float | None]:  # noqa: PLR0911 - one per verdict
    """The observed verdict and when it was first visible."""
    results = _during_run(log, r.device_id)
    if r.denied and r.device_id not in log.forged_status_seen:
        return sc.DENIED, r.attack_at
    if r.local_refusals:
        return sc.REFUSED_LOCALLY, r.local_refusals[0][0]
    bad = [t for t, status, _ in results if status == "contraindicated"]
    if bad:
        return sc.CONTRAINDICATED, bad[0]
    if r.keys_refused:
        return sc.KEYS_REFUSED, None
    rejected = [t for t, reason in log.alerts.get(r.device_id, []) if "rejected" in reason]
    if rejected and r.attack_at is not None:
        return sc.REJECTED, rejected[0]
    if r.scenario == "offline":
        return _offline(r, results, log.ended_at)
    if r.scenario == "broker-restart":
        at = log.broker_restarted_at
        if at is None:
            return sc.SKIPPED, None
        before = any(t < at and s == "affirming" for t, s, _ in results)
        after = any(t > at and s == "affirming" for t, s, _ in results)
        return (sc.RECOVERED if before and after else sc.NOT_RECOVERED), None
    if results:
        return results[-1][1], results[-1][0]
    return "none", None


def _during_run(log: FleetLog, device_id: str) -> list[tuple[float, str, str]]:
    """A device's results in time order, but for stale ones after the run's end: devices stop
    attesting then, and the verifier goes on judging them (while the devices' reports come in)."""
    results = sorted(log.results.get(device_id, []))
    if not log.ended_at:
        return results
    return [(t, s, why) for t, s, why in results if t <= log.ended_at or not _is_stale(s, why)]


def _is_stale(status: str, why: str) -> bool:
    return status == "none" and "stale" in why


def _offline(
    r: DeviceReport, results: list[tuple[float, str, str]], ended_at: float
) -> tuple[str, float | None]:
    verdict, seen_at, _why = _offline_judged(r, results, ended_at)
    return verdict, seen_at


def _offline_judged(
    r: DeviceReport, results: list[tuple[float, str, str]], ended_at: float
) -> tuple[str, float | None, str]:
    """The offline scenario's verdict, when it was seen, and what was missing if anything. A run
    that ends before the device is back from its second time away is too short to tell
    (`offline_needs_s`): skipped, not a failure of the fleet's."""
    if len(r.offline) < 2:
        return sc.SKIPPED, None, f"the run ended before its second time away ({len(r.offline)})"
    (short_from, short_to), (long_from, long_to) = r.offline[0], r.offline[1]
    if long_to >= ended_at:
        return sc.SKIPPED, None, "the run ended while it was away beyond the grace"
    stale = [t for t, s, why in results if _is_stale(s, why)]
    stale_early = any(short_from <= t <= short_to + 0.5 for t in stale)
    stale_late = [t for t in stale if long_from <= t <= long_to + 1.0]
    back = any(t > long_to and s == "affirming" for t, s, _ in results)
    seen_at = stale_late[0] if stale_late else None
    if stale_early:
        return sc.NOT_RECOVERED, seen_at, "declared stale while away within the grace"
    if not stale_late:
        return sc.NOT_RECOVERED, None, "not declared stale while away beyond the grace"
    if not back:
        return sc.NOT_RECOVERED, seen_at, "no affirming result after coming back"
    return sc.RECOVERED, seen_at, ""


def why_observed(r: DeviceReport, log: FleetLog) -> str:
    """What the fleet showed of a device, in a few words: why its verdict is what it is."""
    results = _during_run(log, r.device_id)
    missing = ""
    if r.scenario == "offline":
        missing = _offline_judged(r, results, log.ended_at)[2]
    elif r.scenario == "broker-restart" and log.broker_restarted_at is not None:
        missing = _restart_missing(results, log.broker_restarted_at)
    if missing:
        return missing
    if r.local_refusals:
        return f"refused locally: {r.local_refusals[0][1]}"
    if r.keys_refused:
        return f"keys refused: {r.keys_refused[0]}"
    if not results:
        return "no result"
    _t, status, why = results[-1]
    return f"last result {status}" + (f": {why}" if why else "")


def offline_needs_s(interval_s: float, grace_s: float) -> float:
    """About how long a run must last for the offline scenario to be scored: online two
    intervals, away half the grace, online two intervals, away until stale (silent past the
    interval and grace, found at the verifier's next check, an interval at most), back."""
    return 2 * interval_s + grace_s / 2 + 2 * interval_s + (2 * interval_s + grace_s) + 5


def _restart_missing(results: list[tuple[float, str, str]], at: float) -> str:
    if not any(t < at and s == "affirming" for t, s, _ in results):
        return "no affirming result before the broker restart"
    if not any(t > at and s == "affirming" for t, s, _ in results):
        return "no affirming result after the broker restart"
    return ""


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


def scorecard(reports: list[DeviceReport], log: FleetLog, meta: dict[str, Any]) -> dict[str, Any]:
    per: dict[str, dict[str, Any]] = {}
    latencies: list[float] = []
    sent = results = lost = 0
    mismatched = []
    for r in reports:
        s = sc.SCENARIOS[r.scenario]
        verdict, seen_at = judge(r, log)
        row = per.setdefault(
            r.scenario,
            {
                "expected": s.expected,
                "devices": 0,
                "observed": {},
                "detections": 0,
                "false_positives": 0,
                "false_negatives": 0,
                "mismatches": 0,
                "_ttd": [],
            },
        )
        row["devices"] += 1
        row["observed"][verdict] = row["observed"].get(verdict, 0) + 1
        if verdict == sc.SKIPPED:
            continue
        if verdict != s.expected:
            row["mismatches"] += 1
            mismatched.append(
                {
                    "device": r.device_id,
                    "scenario": r.scenario,
                    "expected": s.expected,
                    "observed": verdict,
                    "why": why_observed(r, log),
                    "errors": r.errors[-LAST_ERRORS:],  # the newest: what it last ran into
                    "error_count": r.error_count,
                    "local_refusals": [why for _t, why in r.local_refusals[:3]],
                }
            )
            if s.attack and verdict == sc.AFFIRMING:
                row["false_negatives"] += 1
            elif not s.attack:
                row["false_positives"] += 1
        elif s.attack:
            row["detections"] += 1
            start = r.attack_at or (min(r.sent.values()) if r.sent else None)
            if seen_at is not None and start is not None:
                row["_ttd"].append(max(0.0, seen_at - start))
        # seq -> the first time its result was seen, by the device or the observer (one of
        # them may have been away): the retained copy that comes again after a reconnect is
        # not the answer, it only repeats it
        received = dict(log.answered.get(r.device_id, {}))
        for t, _status, seq, _why in r.results:
            received[seq] = min(t, received.get(seq, t))
        for seq, t_sent in r.sent.items():
            sent += 1
            if seq in received:
                results += 1
                latencies.append(max(0.0, received[seq] - t_sent))  # iat: whole seconds
            elif _should_have_result(s.expected, t_sent, r, log):
                lost += 1
    for row in per.values():
        ttd = row.pop("_ttd")
        row["time_to_detect_s"] = {"p50": _percentile(ttd, 0.5), "max": max(ttd, default=None)}
    return {
        **meta,
        "scenarios": per,
        "evidence": {
            "sent": sent,
            "results_received": results,
            "lost": lost,
            "latency_ms": {
                "p50": _ms(_percentile(latencies, 0.5)),
                "p99": _ms(_percentile(latencies, 0.99)),
            },
        },
        "run": {"started_at": log.started_at, "ended_at": log.ended_at},
        "mismatched_devices": mismatched,
        "missing_reports": log.missing_reports,
        "passed": not mismatched and lost == 0 and log.missing_reports == 0,
    }


def _should_have_result(expected: str, t_sent: float, r: DeviceReport, log: FleetLog) -> bool:
    """Honest evidence of a device expected to be trusted, sent while it was online and early
    enough to be answered before the end."""
    if expected not in (sc.AFFIRMING, sc.RECOVERED) or t_sent >= log.ended_at - SETTLE_S:
        return False
    return not any(a <= t_sent <= b for a, b in r.offline)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 1)


def table(card: dict[str, Any]) -> str:
    head = f"{'scenario':20} {'expected':16} {'observed':32} {'det':>4} {'FP':>3} {'FN':>3}"
    lines = [f"{head} {'ttd p50':>8}"]
    for name, row in card["scenarios"].items():
        observed = ", ".join(f"{v} {n}" for v, n in row["observed"].items())
        ttd = row["time_to_detect_s"]["p50"]
        lines.append(
            f"{name:20} {row['expected']:16} {observed[:32]:32} {row['detections']:>4} "
            f"{row['false_positives']:>3} {row['false_negatives']:>3} "
            f"{'-' if ttd is None else f'{ttd:.2f} s':>8}"
        )
    ev = card["evidence"]
    lines.append(
        f"evidence sent {ev['sent']}, results {ev['results_received']}, lost {ev['lost']}; "
        f"evidence -> result p50 {ev['latency_ms']['p50']} ms, p99 {ev['latency_ms']['p99']} ms"
    )
    mismatched = card["mismatched_devices"]
    for m in mismatched[:TABLE_MISMATCHES]:
        lines.append(
            f"  {m['device']} ({m['scenario']}): {m['observed']}, expected {m['expected']}: "
            f"{m['why']}"
        )
        if m["errors"]:
            lines.append(f"    last errors: {' | '.join(m['errors'])}")
    if len(mismatched) > TABLE_MISMATCHES:
        lines.append(f"  ... and {len(mismatched) - TABLE_MISMATCHES} more in the JSON report")
    lines.append("PASSED" if card["passed"] else f"FAILED: {len(mismatched)} mismatches")
    return "\n".join(lines)
