"""The audit log: every key release, refusal, revocation and reinstatement, append-only and
hash-chained.

One JSON line per entry: `{"seq", "at", "event", "device", "detail", "prev", "hash", "sig"}`, where
`hash` = SHA-256 over the canonical JSON of the entry without `hash` and `sig` (so it covers `prev`,
the previous entry's hash), and `sig` is the verifier's Ed25519 signature over `hash`: an edited,
deleted, inserted or reordered entry breaks the chain, and rewriting the rest of the chain needs the
verifier's key. Appends take an exclusive lock (several verifier processes on one machine) and are
fsynced. `verify` is pure: lines in, the first broken entry out.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strongroom import canonical
from strongroom.errors import FormatError, SignatureError
from strongroom.signing import SigningKey, VerifyKey

GENESIS = "0" * 64
AUDIT_DOMAIN = b"strongroom/audit-entry/v1"
EVENTS = (
    "key_released",
    "key_response_not_published",  # after key_released: the response did not reach the broker
    "key_refused",
    "revoked",
    "reinstated",
    "revocation_confirmed",
)


@dataclass(frozen=True)
class Broken:
    line: int  # 1-based
    reason: str


def _hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k not in ("hash", "sig")}
    return hashlib.sha256(canonical.dumps(body)).hexdigest()


def verify(lines: Iterable[str], key: VerifyKey) -> tuple[int, Broken | None]:
    """Check the chain; return the number of good entries and the first broken one, if any."""
    prev, count = GENESIS, 0
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not an object")
        except ValueError:
            return count, Broken(number, "not a JSON object")
        if entry.get("seq") != number:
            return count, Broken(number, f"sequence {entry.get('seq')} where {number} belongs")
        if entry.get("prev") != prev:
            return count, Broken(number, "does not follow the previous entry")
        if entry.get("hash") != _hash(entry):
            return count, Broken(number, "content does not match its hash (edited)")
        try:
            key.verify(AUDIT_DOMAIN, str(entry["hash"]).encode(), bytes.fromhex(str(entry["sig"])))
        except (SignatureError, ValueError, KeyError):
            return count, Broken(number, "signature does not verify with the verifier's key")
        prev, count = entry["hash"], count + 1
    return count, None


class AuditLog:
    def __init__(self, path: Path, key: SigningKey | None = None) -> None:
        self.path, self._key = path, key

    def append(self, event: str, device: str, **detail: Any) -> dict[str, Any]:
        if self._key is None:
            raise FormatError("this audit log was opened read-only")
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND
        fd = os.open(self.path, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            seq, prev = self._tail(fd)
            entry: dict[str, Any] = {
                "seq": seq + 1,
                "at": round(time.time(), 3),
                "event": event,
                "device": device,
                "detail": detail,
                "prev": prev,
            }
            entry["hash"] = _hash(entry)
            entry["sig"] = self._key.sign(AUDIT_DOMAIN, entry["hash"].encode()).hex()
            os.write(fd, json.dumps(entry, sort_keys=True).encode() + b"\n")
            os.fsync(fd)
            return entry
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _tail(fd: int) -> tuple[int, str]:
        """Sequence number and hash of the last entry (reads backwards from the end)."""
        size = os.lseek(fd, 0, os.SEEK_END)
        if size == 0:
            return 0, GENESIS
        chunk = min(size, 64 * 1024)
        data = os.pread(fd, chunk, size - chunk)
        last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        try:
            entry = json.loads(last)
            return int(entry["seq"]), str(entry["hash"])
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(
                "the audit log's last entry is damaged; run `strongroom audit verify`"
            ) from e

    def lines(self) -> Iterator[str]:
        if not self.path.exists():
            return iter(())
        with self.path.open() as f:
            return iter([line.rstrip("\n") for line in f if line.strip()])

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]
