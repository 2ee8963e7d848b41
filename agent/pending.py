"""The outbox's queue as the device protocol sees it: entries waiting for the broker, and the
storage seam (`OutboxStore`) the protocol is given. Pure: no files, no sockets, no clock.

`MemoryOutbox` is that queue in memory, for the simulator's thousands of devices (a device that
stops loses it); the agent's, on disk, is `agent.outbox.Outbox`. When full, either drops the
oldest message with a warning (evidence is periodic; the newest says most).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

import structlog

log = structlog.get_logger()
DEFAULT_CAPACITY = 1000


@dataclass(frozen=True)
class Pending:
    entry: int  # its place in the queue (increasing)
    topic: str
    payload: bytes


class OutboxStore(Protocol):
    """What the protocol needs of an outbox's storage."""

    def __len__(self) -> int: ...

    def put(self, topic: str, payload: bytes) -> None: ...

    def first(self) -> Pending | None: ...

    def done(self, item: Pending) -> None: ...


class MemoryOutbox:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._items: deque[Pending] = deque()
        self._capacity, self._next = capacity, 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, topic: str, payload: bytes) -> None:
        while len(self._items) >= self._capacity:
            dropped = self._items.popleft()
            log.warning("outbox_full_dropped_oldest", dropped=dropped.entry)
        self._items.append(Pending(self._next, topic, payload))
        self._next += 1

    def pending(self) -> list[Pending]:
        return list(self._items)

    def first(self) -> Pending | None:
        return self._items[0] if self._items else None

    def done(self, item: Pending) -> None:
        if self._items and self._items[0].entry == item.entry:
            self._items.popleft()
        else:  # out of order, or acknowledged twice (harmless)
            self._items = deque(i for i in self._items if i.entry != item.entry)
