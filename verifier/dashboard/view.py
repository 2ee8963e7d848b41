"""The fleet as a dashboard sees it: a model built from what a read-only consumer receives
(retained results and status, alerts) and from what the fleet home says (registry status, audit
entries). Shared by the web dashboard and `strongroom status`. Pure: no I/O; callers pass `now`
(only `strongroom.ear.verify_result` reads the clock, for a token's validity period); the
verifier's public key is given as data.

Trust rule: a result counts only once its signature verifies with the verifier's key and it names
the device of its topic. Anything else on a result topic, whatever the bytes, makes the device
"unverified" until a verifiable result at least as new arrives, and nothing from the unverifiable
bytes is shown. That includes an empty payload: MQTT's way of clearing a retained message, which
the verifier never does (it only replaces a result), so a consumer that sees a result withdrawn
stops trusting the device; one that subscribes afterwards gets no result at all (pending).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from strongroom import messages, topics
from strongroom.ear import AttestationResult, verify_result
from strongroom.errors import FormatError, StrongroomError
from strongroom.fields import DEVICE_ID_RE
from strongroom.signing import VerifyKey

# What a device counts as in the summary; one each, decided in this order of precedence.
PRECEDENCE = (
    "unverified",  # the latest result on its topic did not verify
    "contraindicated",
    "revoked",  # revoked in the registry (or, without a registry, the enclave confirmed it)
    "offline",
    "stale",  # a "none" result whose details say "stale": silent past interval + grace
    "warning",
    "affirming",
    "pending",  # enrolled or seen, but no result yet (or a "none" result that is not stale)
)
CATEGORIES = (
    "affirming",
    "warning",
    "contraindicated",
    "stale",
    "offline",
    "revoked",
    "unverified",
    "pending",
)
TIMELINE_LEN = 50
ALERTS_LEN = 200
HISTORY_LEN = 2000
AUDIT_LEN = 20
COALESCE_S = 1.0  # history samples closer than this are merged (bursts of retained messages)
AUDITED_ACTIONS = (
    "revoked",
    "reinstated",
    "reattestation_requested",
    "revocation_confirmed",
    "key_refused",
)


@dataclass(frozen=True)
class TimelineEntry:
    iat: int
    status: str
    reasons: tuple[str, ...]
    freshness: str


@dataclass(frozen=True)
class AlertEntry:
    seq: int
    severity: str
    device_id: str
    reason: str
    at: float


@dataclass(frozen=True)
class AuditNote:
    at: float
    event: str
    text: str


@dataclass
class DeviceState:
    """Everything known about one device; changed only through `FleetView`."""

    device_id: str
    result: AttestationResult | None = None  # latest verified result
    appraised: AttestationResult | None = None  # latest verified result from evidence (not stale)
    unverified: str = ""  # why the latest result on the topic was not believed ("" if it was)
    connection: str = ""  # online, offline, revoked; "" never heard
    connection_at: float = 0.0
    report: str = ""
    registry: str = ""  # active or revoked; "" when not (or no longer) in the registry
    lease_until: float | None = None
    timeline: deque[TimelineEntry] = field(default_factory=lambda: deque(maxlen=TIMELINE_LEN))
    audit: deque[AuditNote] = field(default_factory=lambda: deque(maxlen=AUDIT_LEN))
    category: str = "pending"
    version: int = 0


def is_revoked(d: DeviceState) -> bool:
    """The registry decides; without it (not enrolled here), the device's confirmation."""
    return d.registry == "revoked" if d.registry else d.connection == "revoked"


def categorize(d: DeviceState) -> str:
    """The one summary category of a device (see PRECEDENCE)."""
    revoked = is_revoked(d)
    result = d.result.status if d.result is not None else ""
    stale = result == "none" and d.result is not None and freshness(d.result) == "stale"
    held = {
        "unverified": bool(d.unverified),
        "contraindicated": result == "contraindicated",
        "revoked": revoked,
        "offline": d.connection == "offline",
        "stale": stale,
        "warning": result == "warning",
        "affirming": result == "affirming",
    }
    return next((name for name in PRECEDENCE if held.get(name)), "pending")


def freshness(r: AttestationResult) -> str:
    return str(r.details.get("freshness", ""))


class FleetView:
    """The model. Each `apply_*` returns whether anything visible changed."""

    def __init__(self, verify_key: VerifyKey) -> None:
        self._key = verify_key
        self.devices: dict[str, DeviceState] = {}
        self.counts: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.version = 0
        self.ignored = 0  # messages that were not understood (malformed status or alert)
        self.alerts: deque[AlertEntry] = deque(maxlen=ALERTS_LEN)
        self.alert_count = 0
        self.history: deque[tuple[float, tuple[int, ...]]] = deque(maxlen=HISTORY_LEN)

    # -- bookkeeping ---------------------------------------------------------------------------

    def _device(self, device_id: str) -> DeviceState:
        d = self.devices.get(device_id)
        if d is None:
            d = self.devices[device_id] = DeviceState(device_id)
            self.counts[d.category] += 1
        return d

    def _changed(self, d: DeviceState) -> None:
        category = categorize(d)
        if category != d.category:
            self.counts[d.category] -= 1
            self.counts[category] += 1
            d.category = category
        self.version += 1
        d.version = self.version

    def changed_since(self, version: int) -> list[str]:
        return sorted(d.device_id for d in self.devices.values() if d.version > version)

    # -- inputs --------------------------------------------------------------------------------

    def apply(self, topic: str, payload: bytes, now: float) -> bool:
        """One inbound MQTT message (a result, a status or an alert); others are ignored. Raises
        nothing, whatever the bytes: one bad message must not cost the rest of a batch."""
        if topic == topics.ALERTS:
            return self.apply_alert(payload)
        try:
            device_id, leaf = topics.parse(topic)
        except FormatError:
            self.ignored += 1
            return False
        if leaf == topics.RESULT:
            return self.apply_result(device_id, payload)
        if leaf == topics.STATUS:
            return self.apply_status(device_id, payload, now)
        return False

    def apply_result(self, device_id: str, payload: bytes) -> bool:
        d = self._device(device_id)
        try:
            result = _verified_result(payload, self._key, device_id)
        except StrongroomError as e:
            d.unverified = _why_unverified(e)
            self._changed(d)
            return True
        if d.result is not None and result.iat < d.result.iat:
            return False  # an older result (late or replayed) does not replace a newer one
        if d.result == result and not d.unverified:
            return False  # the retained copy again, after a reconnect
        d.unverified = ""
        if d.result != result:
            d.result = result
            if freshness(result) != "stale":
                d.appraised = result
            d.timeline.append(
                TimelineEntry(result.iat, result.status, result.reasons, freshness(result))
            )
        self._changed(d)
        return True

    def apply_status(self, device_id: str, payload: bytes, now: float) -> bool:
        if not payload:
            return False
        try:
            status = messages.Status.decode(payload)
        except Exception:  # whatever the bytes: a malformed status is dropped and counted
            self.ignored += 1
            return False
        d = self._device(device_id)
        at = status.at or now  # a last will carries 0: the broker sent it when the device left
        if (d.connection, d.report) == (status.state, status.report):
            return False
        d.connection, d.connection_at, d.report = status.state, at, status.report
        self._changed(d)
        return True

    def apply_alert(self, payload: bytes) -> bool:
        try:
            alert = messages.Alert.decode(payload)
        except Exception:  # whatever the bytes: a malformed alert is dropped and counted
            self.ignored += 1
            return False
        self.alert_count += 1
        self.alerts.append(
            AlertEntry(
                self.alert_count,
                alert.severity[:16],
                alert.device_id[:64],
                alert.reason[:500],
                alert.at,
            )
        )
        self.version += 1
        return True

    def apply_registry(self, statuses: Mapping[str, str]) -> bool:
        """The registry's device ids and their status (active, revoked), all of them."""
        changed = False
        for device_id, status in statuses.items():
            d = self._device(device_id)
            if d.registry != status:
                d.registry = status
                self._changed(d)
                changed = True
        for d in self.devices.values():
            if d.registry and d.device_id not in statuses:
                d.registry = ""
                self._changed(d)
                changed = True
        return changed

    def apply_audit(self, entries: Iterable[Mapping[str, Any]], lease_s: float) -> bool:
        """Audit log entries, oldest first: key releases give a lease end (release time plus the
        policy's lease; the exact one is sealed for the enclave alone); revocation ends it."""
        changed = False
        for entry in entries:
            event, device_id = entry.get("event"), entry.get("device")
            at, detail = entry.get("at"), entry.get("detail")
            if event != "key_released" and event not in AUDITED_ACTIONS:
                continue
            if not (isinstance(device_id, str) and DEVICE_ID_RE.fullmatch(device_id)):
                continue
            if not isinstance(at, int | float) or isinstance(at, bool):
                continue
            d = self._device(device_id)
            if event == "key_released":
                d.lease_until = max(d.lease_until or 0.0, float(at) + lease_s)
            else:
                if event == "revoked":
                    d.lease_until = None  # the enclave wipes its keys
                text = _audit_text(detail if isinstance(detail, dict) else {})
                d.audit.append(AuditNote(float(at), str(event), text))
            self._changed(d)
            changed = True
        return changed

    def record_history(self, now: float) -> None:
        """A sample of the counts for the chart, when they changed since the last sample."""
        counts = tuple(self.counts[c] for c in CATEGORIES)
        if self.history and self.history[-1][1] == counts:
            return
        if len(self.history) > 1 and now - self.history[-1][0] < COALESCE_S:
            self.history.pop()
            if self.history[-1][1] == counts:
                return
        self.history.append((now, counts))


def _verified_result(payload: bytes, key: VerifyKey, device_id: str) -> AttestationResult:
    """The result on `device_id`'s topic, verified; FormatError (or SignatureError) for anything
    else, including an exception the parser should not have raised: that one fails closed too."""
    if not payload:
        raise FormatError("the retained result was cleared by an empty message")
    try:
        result = verify_result(payload, key)
    except StrongroomError:
        raise
    except Exception as e:  # a parser bug must not leave the device trusted
        raise FormatError(f"the result could not be checked ({type(e).__name__})") from e
    if result.device_id != device_id:
        raise FormatError("the result names another device than its topic")
    return result


def _why_unverified(e: StrongroomError) -> str:
    text = str(e)
    return text if len(text) <= 200 else text[:197] + "..."


def _audit_text(detail: Mapping[str, Any]) -> str:
    parts = [f"{k}: {detail[k]}" for k in ("by", "reason", "key_id", "latency_s") if detail.get(k)]
    return "; ".join(str(p)[:200] for p in parts)
