"""The one fleet view a dashboard process holds, shared between the thread that feeds it and the
front ends that read it (web requests, the terminal's refresh). Every access takes the lock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from verifier.dashboard.view import FleetView

T = TypeVar("T")


class LiveView:
    def __init__(self, view: FleetView, clock: Callable[[], float] = time.time) -> None:
        self._view = view
        self._lock = threading.Lock()
        self.clock = clock
        self.connected = False  # whether the feed is connected to the broker (set by the feed)

    def use(self, fn: Callable[[FleetView], T]) -> T:
        """Run `fn` on the view under the lock (to read or to change it); keep `fn` short."""
        with self._lock:
            return fn(self._view)

    @property
    def version(self) -> int:
        with self._lock:
            return self._view.version
