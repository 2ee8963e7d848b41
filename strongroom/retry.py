"""Retry timing as a small immutable object: exponential back-off with a cap and full jitter.

Jitter spreads a fleet's reconnects after a broker restart instead of having every device knock at
the same instant (paho's own back-off has none).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 0.5
    factor: float = 2.0
    cap_s: float = 30.0
    jitter: float = 0.5  # fraction of the delay drawn at random: 0 none, 1 "full jitter"

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait before retry number `attempt` (0-based). Without jitter, no random number
        is drawn (from `rng` or the global generator): the delay is a pure function."""
        base = min(self.cap_s, self.initial_s * self.factor ** min(attempt, 64))
        if not self.jitter:
            return base
        spread = base * self.jitter
        return base - spread + (rng or random).uniform(0, spread)
