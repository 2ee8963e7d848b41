"""`strongroom status` on a terminal: the fleet view as rich tables. Text from the fleet is
passed as `Text` objects, never as markup, so a reason cannot restyle or hide the output."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from verifier.dashboard.view import CATEGORIES

STYLES = {
    "affirming": "bold green",
    "warning": "bold yellow",
    "contraindicated": "bold red",
    "stale": "magenta",
    "offline": "bright_black",
    "revoked": "bold red3",
    "unverified": "bold dark_orange",
    "pending": "cyan",
}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    if s < 90:
        return f"{s} s ago"
    if s < 5400:
        return f"{round(s / 60)} min ago"
    return f"{round(s / 3600)} h ago"


def _until(at: float | None, now: float) -> str:
    if at is None:
        return "-"
    left = at - now
    return f"expired {_age(-left)}" if left <= 0 else f"in {_age(left).removesuffix(' ago')}"


def render(doc: dict[str, Any], *, max_rows: int | None = None) -> RenderableType:
    """The summary line and the device table of a `view.snapshot` document, worst first."""
    summary, now = doc["summary"], doc["summary"]["at"]
    line = Text(f"{summary['total']} devices  ")
    for category in CATEGORIES:
        count = summary["counts"].get(category, 0)
        if count:
            line.append(f"{category} {count}", style=STYLES[category])
            line.append("  ")
    if not summary.get("connected", True):
        line.append("(broker unreachable)", style="bold red")
    order = {c: i for i, c in enumerate(("unverified", "contraindicated", "revoked"))}
    rows = sorted(doc["devices"], key=lambda r: (order.get(r["status"], 9), r["device"]))
    hidden = 0
    if max_rows is not None and len(rows) > max_rows:
        rows, hidden = rows[:max_rows], len(rows) - max_rows
    table = Table(expand=False, show_lines=False, header_style="bold")
    for column in ("Device", "Status", "Firmware", "Enclave"):
        table.add_column(column, no_wrap=True)
    table.add_column("Artifacts", overflow="fold")
    table.add_column("Last evidence", no_wrap=True)
    table.add_column("Key lease", no_wrap=True)
    table.add_column("Reasons", overflow="fold", min_width=20)
    for r in rows:
        enclave = f"SVN {r['svn']} {r['measurement'][:12]}" if r["svn"] is not None else "-"
        artifacts = ", ".join(f"{n} v{v}" for n, v in r["artifacts"].items()) or "-"
        table.add_row(
            Text(r["device"]),
            Text(r["status"], style=STYLES.get(r["status"], "")),
            Text(r["firmware"] or "-"),
            Text(enclave),
            Text(artifacts),
            Text(_age(r["evidence_age_s"])),
            Text(_until(r["lease_until"], now)),
            Text("; ".join(r["reasons"])),
        )
    parts: list[RenderableType] = [line, table]
    if hidden:
        parts.append(Text(f"... and {hidden} more (see --json or the dashboard)", style="dim"))
    return Group(*parts)
