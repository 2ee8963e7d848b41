"""Per-device rate limits: token buckets keyed by device id. Pure: the caller passes the time.

A device may publish only on its own topics, but as often as it likes: without a limit, a burst of
`status {online}` made the verifier issue (and store) a challenge each, and every rejected message
raised an alert. Each kind of work a device can trigger has its own bucket; what is over the limit
is dropped, and the verifier says once that the device is flooding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_TRACKED = 100_000  # buckets kept; past that, the full ones (idle devices) are forgotten


@dataclass(frozen=True)
class Rate:
    """`burst` at once, then `per_s` a second on average."""

    burst: float
    per_s: float


@dataclass(frozen=True)
class RateLimits:
    status: Rate = Rate(burst=10, per_s=0.2)  # handled status messages
    challenges: Rate = Rate(burst=10, per_s=1 / 6)  # challenges issued to one device
    alerts: Rate = Rate(burst=20, per_s=1 / 30)  # alerts raised about one device
    flood_alert_every_s: float = 60.0  # at most one "flooding" alert per device and kind


@dataclass
class DeviceLimiter:
    """One token bucket per device."""

    rate: Rate
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # tokens, at

    def allow(self, device_id: str, now: float) -> bool:
        """Take a token for the device if it has one."""
        tokens, at = self._buckets.get(device_id, (self.rate.burst, now))
        tokens = min(self.rate.burst, tokens + max(0.0, now - at) * self.rate.per_s)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        if len(self._buckets) >= MAX_TRACKED and device_id not in self._buckets:
            self._forget_full(now)
        self._buckets[device_id] = (tokens, now)
        return allowed

    def _forget_full(self, now: float) -> None:
        rate = self.rate
        self._buckets = {
            d: (t, at)
            for d, (t, at) in self._buckets.items()
            if t + (now - at) * rate.per_s < rate.burst
        }


@dataclass
class FloodNotices:
    """When to say that a device floods: once per device and kind per `every_s`."""

    every_s: float
    _last: dict[tuple[str, str], float] = field(default_factory=dict)

    def due(self, device_id: str, kind: str, now: float) -> bool:
        key = (device_id, kind)
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            return False
        if len(self._last) >= MAX_TRACKED:
            self._last = {k: t for k, t in self._last.items() if now - t < self.every_s}
        self._last[key] = now
        return True
