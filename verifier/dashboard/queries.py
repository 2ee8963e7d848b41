"""Reading the fleet view: table rows with search, filter, sort and pages, the summary, one
device's detail, alerts, the chart's history and the whole-fleet snapshot, as JSON-ready data.
Pure; shared by the web API and `strongroom status`."""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from strongroom.ear import VECTOR_KEYS, tier_of
from strongroom.errors import InputError
from verifier.dashboard.view import CATEGORIES, PRECEDENCE, DeviceState, FleetView, is_revoked

SORT_KEYS = ("device", "status", "firmware", "svn", "age", "lease")
MAX_PAGE = 500
_RANK = {name: i for i, name in enumerate(PRECEDENCE)}


@dataclass(frozen=True)
class Row:
    device_id: str
    status: str  # the summary category
    result: str  # status of the latest verified result ("" if none, or while unverified)
    reasons: tuple[str, ...]
    firmware: str
    svn: int | None
    measurement: str  # MRENCLAVE, hex
    artifacts: tuple[tuple[str, int], ...]
    evidence_at: int | None  # appraisal time of the latest evidence
    lease_until: float | None
    connection: str
    registry: str

    def to_json_dict(self, now: float) -> dict[str, Any]:
        return {
            "device": self.device_id,
            "status": self.status,
            "result": self.result,
            "reasons": list(self.reasons),
            "firmware": self.firmware,
            "svn": self.svn,
            "measurement": self.measurement,
            "artifacts": dict(self.artifacts),
            "evidence_age_s": None if self.evidence_at is None else round(now - self.evidence_at),
            "lease_until": self.lease_until,
            "connection": self.connection,
            "registry": self.registry,
        }


def row(d: DeviceState) -> Row:
    appraised = d.appraised
    details = appraised.details if appraised is not None else {}
    raw_mr = details.get("mrenclave", b"")
    artifacts = details.get("artifacts")
    svn = details.get("svn")
    return Row(
        device_id=d.device_id,
        status=d.category,
        result=d.result.status if d.result is not None and not d.unverified else "",
        reasons=_reasons(d),
        firmware=str(details.get("firmware", "")),
        svn=svn if isinstance(svn, int) and not isinstance(svn, bool) else None,
        measurement=_hex(raw_mr),
        artifacts=_artifacts(artifacts) if isinstance(artifacts, dict) else (),
        evidence_at=appraised.iat if appraised is not None else None,
        lease_until=None if is_revoked(d) else d.lease_until,  # a revoked enclave wipes its keys
        connection=d.connection,
        registry=d.registry,
    )


def _hex(value: Any) -> str:
    """A measurement as hex, whether the claim holds bytes or (as the verifier writes) hex."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, str) and len(value) <= 128 and all(c in string.hexdigits for c in value):
        return value.lower()
    return ""


def _artifacts(versions: dict[Any, Any]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted((str(k), v) for k, v in versions.items() if isinstance(v, int)))


def _reasons(d: DeviceState) -> tuple[str, ...]:
    if d.unverified:
        return (f"unverified result: {d.unverified}",)
    reasons = d.result.reasons if d.result is not None else ()
    if d.category == "revoked" and not reasons:
        notes = [n.text for n in d.audit if n.event == "revoked"]
        return (f"revoked ({notes[-1]})" if notes and notes[-1] else "revoked",)
    if d.report and d.connection != "revoked":  # a revoked device echoes the revocation reason
        reasons = (*reasons, f"device reports: {d.report}")
    return reasons


@dataclass(frozen=True)
class Query:
    search: str = ""
    status: str = ""  # a category, or "" for every device
    sort: str = "status"
    descending: bool = False
    offset: int = 0
    limit: int = 50

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> Query:
        """From URL query parameters (`q`, `status`, `sort`, `desc`, `offset`, `limit`)."""
        status, sort = params.get("status", ""), params.get("sort", "status")
        if status and status not in CATEGORIES:
            raise InputError(f"unknown status filter {status[:40]!r}")
        if sort not in SORT_KEYS:
            raise InputError(f"unknown sort key {sort[:40]!r}", hint=f"use {', '.join(SORT_KEYS)}")
        try:
            offset, limit = int(params.get("offset", "0")), int(params.get("limit", "50"))
        except ValueError as e:
            raise InputError("offset and limit must be integers") from e
        if offset < 0 or not 0 < limit <= MAX_PAGE:
            raise InputError(f"offset must be >= 0 and limit between 1 and {MAX_PAGE}")
        return cls(
            search=params.get("q", "")[:100],
            status=status,
            sort=sort,
            descending=params.get("desc", "") in ("1", "true"),
            offset=offset,
            limit=limit,
        )


@dataclass(frozen=True)
class Page:
    total: int  # devices in the fleet view
    matched: int  # devices that pass the search and the filter
    offset: int
    rows: tuple[Row, ...]

    def to_json_dict(self, now: float) -> dict[str, Any]:
        return {
            "total": self.total,
            "matched": self.matched,
            "offset": self.offset,
            "rows": [r.to_json_dict(now) for r in self.rows],
        }


def _search_text(r: Row) -> str:
    names = " ".join(f"{n} v{v}" for n, v in r.artifacts)
    return " ".join((r.device_id, r.status, r.firmware, r.measurement, names, *r.reasons)).lower()


def _firmware_key(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in value.split("."))
    except ValueError:
        return ()


def _sort_value(r: Row, key: str) -> Any:
    if key == "status":
        return _RANK[r.status]
    if key == "firmware":
        return _firmware_key(r.firmware) if r.firmware else None
    if key == "svn":
        return r.svn
    if key == "age":
        return None if r.evidence_at is None else -r.evidence_at  # older evidence is larger
    if key == "lease":
        return r.lease_until
    return r.device_id


def query(view: FleetView, q: Query) -> Page:
    """Search, filter, sort (ties by device id; unknown values last) and cut one page."""
    rows = [row(d) for d in view.devices.values() if not q.status or d.category == q.status]
    needle = q.search.strip().lower()
    if needle:
        rows = [r for r in rows if needle in _search_text(r)]
    rows.sort(key=lambda r: r.device_id)
    known = [r for r in rows if _sort_value(r, q.sort) is not None]
    unknown = [r for r in rows if _sort_value(r, q.sort) is None]
    known.sort(key=lambda r: _sort_value(r, q.sort), reverse=q.descending)
    ordered = known + unknown
    return Page(
        total=len(view.devices),
        matched=len(ordered),
        offset=q.offset,
        rows=tuple(ordered[q.offset : q.offset + q.limit]),
    )


def all_rows(view: FleetView) -> list[Row]:
    return [row(view.devices[k]) for k in sorted(view.devices)]


def summary(view: FleetView, now: float) -> dict[str, Any]:
    return {
        "at": now,
        "version": view.version,
        "total": len(view.devices),
        "counts": dict(view.counts),
        "alerts": view.alert_count,
        "ignored": view.ignored,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def detail(view: FleetView, device_id: str, now: float) -> dict[str, Any] | None:
    """One device: its row, the AR4SI vector and claims of its latest verified result, its
    result timeline (newest first), status and audit notes. None for an unknown device."""
    d = view.devices.get(device_id)
    if d is None:
        return None
    r = d.result
    return {
        "row": row(d).to_json_dict(now),
        "unverified": d.unverified,
        "result": None
        if r is None
        else {
            "status": r.status,
            "iat": r.iat,
            "policy": r.policy_id,
            "verifier": r.verifier_id,
            "reasons": list(r.reasons),
            "vector": [
                {"claim": k, "value": r.vector.get(k, 0), "tier": tier_of(r.vector.get(k, 0))}
                for k in VECTOR_KEYS
            ],
            "details": _jsonable(r.details),
        },
        "timeline": [
            {"iat": t.iat, "status": t.status, "reasons": list(t.reasons), "freshness": t.freshness}
            for t in reversed(d.timeline)
        ],
        "connection": {"state": d.connection, "at": d.connection_at, "report": d.report},
        "audit": [{"at": n.at, "event": n.event, "text": n.text} for n in reversed(d.audit)],
    }


def recent_alerts(view: FleetView, limit: int = 50) -> list[dict[str, Any]]:
    newest = list(view.alerts)[-limit:][::-1]
    return [
        {
            "seq": a.seq,
            "severity": a.severity,
            "device": a.device_id,
            "reason": a.reason,
            "at": a.at,
        }
        for a in newest
    ]


def history(view: FleetView) -> dict[str, Any]:
    return {
        "categories": list(CATEGORIES),
        "samples": [[t, list(counts)] for t, counts in view.history],
    }


def snapshot(view: FleetView, now: float, *, alerts: int = 20) -> dict[str, Any]:
    """The whole fleet as one JSON document: `strongroom status --json`."""
    return {
        "summary": summary(view, now),
        "devices": [r.to_json_dict(now) for r in all_rows(view)],
        "alerts": recent_alerts(view, alerts),
    }
