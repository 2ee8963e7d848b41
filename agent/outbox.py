"""A bounded on-disk queue of messages waiting for the broker: nothing is lost across a broker
outage or an agent restart.

One file per message (`<sequence>.msg`, CBOR {topic, payload}), written atomically before any
attempt to send and removed only after the broker acknowledged it (QoS 1), so delivery is at least
once and in order. When full, the oldest message is dropped with a warning (evidence is periodic;
the newest says most).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cbor2
import structlog

from strongroom.fsutil import SECRET_FILE, make_private_dir, write_atomic

log = structlog.get_logger()
DEFAULT_CAPACITY = 1000


@dataclass(frozen=True)
class Pending:
    path: Path
    topic: str
    payload: bytes


class Outbox:
    def __init__(self, directory: Path, capacity: int = DEFAULT_CAPACITY) -> None:
        make_private_dir(directory)
        self._dir, self._capacity = directory, capacity
        existing = self._files()
        self._next = int(existing[-1].stem) + 1 if existing else 0

    def _files(self) -> list[Path]:
        return sorted(
            (p for p in self._dir.glob("*.msg") if p.stem.isdigit()), key=lambda p: int(p.stem)
        )

    def __len__(self) -> int:
        return len(self._files())

    def put(self, topic: str, payload: bytes) -> None:
        files = self._files()
        while len(files) >= self._capacity:
            oldest = files.pop(0)
            oldest.unlink(missing_ok=True)
            log.warning("outbox_full_dropped_oldest", dropped=oldest.name)
        path = self._dir / f"{self._next:012d}.msg"
        self._next += 1
        write_atomic(path, cbor2.dumps({"topic": topic, "payload": payload}), SECRET_FILE)

    def pending(self) -> list[Pending]:
        out = []
        for path in self._files():
            try:
                doc = cbor2.loads(path.read_bytes())
                out.append(Pending(path, str(doc["topic"]), bytes(doc["payload"])))
            except Exception as e:
                log.error("outbox_entry_unreadable_dropped", entry=path.name, error=str(e))
                path.unlink(missing_ok=True)
        return out

    def done(self, item: Pending) -> None:
        item.path.unlink(missing_ok=True)
