"""The agent's outbox, on disk: messages waiting for the broker, kept in order until it
acknowledged them. The protocol (`agent.protocol`) decides what goes in and when an entry is
done; this module only keeps them (the queue's types and the simulator's in-memory queue are in
the pure `agent.pending`).

Nothing is lost across a broker outage or an agent restart: one file per message
(`<sequence>.msg`, CBOR {topic, payload}), written atomically before any attempt to send and
removed only after the broker acknowledged it (QoS 1), so delivery is at least once and in order.
When full, it drops the oldest message with a warning (evidence is periodic; the newest says most).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import cbor2
import structlog

from agent.pending import DEFAULT_CAPACITY, Pending
from strongroom.fsutil import SECRET_FILE, make_private_dir, write_atomic

log = structlog.get_logger()


class Outbox:
    """The queue on disk, with an index of its entries in memory (read from the directory once,
    at start), so a drain of n entries reads n files and lists the directory never."""

    def __init__(self, directory: Path, capacity: int = DEFAULT_CAPACITY) -> None:
        make_private_dir(directory)
        self._dir, self._capacity = directory, capacity
        self._index: deque[Path] = deque(self._files())  # oldest first
        self._next = int(self._index[-1].stem) + 1 if self._index else 0

    def _files(self) -> list[Path]:
        return sorted(
            (p for p in self._dir.glob("*.msg") if p.stem.isdigit()), key=lambda p: int(p.stem)
        )

    def _path(self, entry: int) -> Path:
        return self._dir / f"{entry:012d}.msg"

    def __len__(self) -> int:
        return len(self._index)

    def put(self, topic: str, payload: bytes) -> None:
        while len(self._index) >= self._capacity:
            oldest = self._index.popleft()
            oldest.unlink(missing_ok=True)
            log.warning("outbox_full_dropped_oldest", dropped=oldest.name)
        path = self._path(self._next)
        self._next += 1
        write_atomic(path, cbor2.dumps({"topic": topic, "payload": payload}), SECRET_FILE)
        self._index.append(path)

    def _read(self, path: Path) -> Pending | None:
        try:
            doc = cbor2.loads(path.read_bytes())
            return Pending(int(path.stem), str(doc["topic"]), bytes(doc["payload"]))
        except Exception as e:
            log.error("outbox_entry_unreadable_dropped", entry=path.name, error=str(e))
            path.unlink(missing_ok=True)
            return None

    def pending(self) -> list[Pending]:
        """Every readable entry, oldest first (unreadable ones are dropped)."""
        items = []
        for path in list(self._index):
            item = self._read(path)
            if item is None:
                self._index.remove(path)
            else:
                items.append(item)
        return items

    def first(self) -> Pending | None:
        """The oldest readable entry (unreadable ones before it are dropped)."""
        while self._index:
            item = self._read(self._index[0])
            if item is not None:
                return item
            self._index.popleft()
        return None

    def done(self, item: Pending) -> None:
        path = self._path(item.entry)
        if self._index and self._index[0] == path:
            self._index.popleft()
        elif path in self._index:  # out of order (harmless)
            self._index.remove(path)
        path.unlink(missing_ok=True)
