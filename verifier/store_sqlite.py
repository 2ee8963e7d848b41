"""SQLite (WAL) implementation of the verifier's state store."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

from provisioning.registry import DeviceRecord
from verifier.store import Freshness, StoredResult

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0,
    last_hash BLOB,
    online INTEGER NOT NULL DEFAULT 0,
    seen_at REAL NOT NULL DEFAULT 0,
    challenged_at REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS nonces (
    nonce BLOB PRIMARY KEY,
    device_id TEXT NOT NULL,
    expires REAL NOT NULL,
    used INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS seen (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE TABLE IF NOT EXISTS results (
    device_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    token BLOB NOT NULL,
    at REAL NOT NULL
);
"""
NONCE_RETENTION_S = 3600
# Evidence may arrive out of order when several verifiers share the work: any sequence number not
# seen before and above (highest - SEQ_WINDOW) is accepted once; anything else is a replay.
SEQ_WINDOW = 1024


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def sync_devices(self, records: Iterable[DeviceRecord]) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for r in records:
                self._db.execute(
                    "INSERT INTO devices (device_id, status) VALUES (?, ?) "
                    "ON CONFLICT (device_id) DO UPDATE SET status = excluded.status",
                    (r.device_id, r.status),
                )

    def issue_nonce(self, device_id: str, nonce: bytes, expires: float) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO nonces (nonce, device_id, expires) VALUES (?, ?, ?)",
                (nonce, device_id, expires),
            )
            self._db.execute("DELETE FROM nonces WHERE expires < ?", (expires - NONCE_RETENTION_S,))

    def accept_evidence(  # noqa: PLR0911 - one return per freshness verdict
        self,
        device_id: str,
        nonce: bytes,
        seq: int,
        token_hash: bytes,
        now: float,
        *,
        require_fresh: bool = False,
    ) -> Freshness:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(
                "SELECT last_seq, last_hash FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            if row is None:
                return Freshness.REPLAY
            last_seq, last_hash = row
            seen = self._db.execute(
                "SELECT hash FROM seen WHERE device_id = ? AND seq = ?", (device_id, seq)
            ).fetchone()
            if seen is not None:  # a redelivery of the latest is benign; anything older, a replay
                return Freshness.DUPLICATE if last_hash == token_hash else Freshness.REPLAY
            if seq <= last_seq - SEQ_WINDOW:
                return Freshness.REPLAY
            found = self._db.execute(
                "SELECT used, expires FROM nonces WHERE nonce = ? AND device_id = ?",
                (nonce, device_id),
            ).fetchone()
            freshness = Freshness.PERIODIC
            if found is None and require_fresh:
                return freshness  # the caller refuses it; nothing is recorded
            if found is not None:
                used, expires = found
                if used:
                    return Freshness.REPLAY
                if expires < now:
                    return Freshness.EXPIRED
                self._db.execute("UPDATE nonces SET used = 1 WHERE nonce = ?", (nonce,))
                freshness = Freshness.FRESH
            self._db.execute(
                "INSERT INTO seen (device_id, seq, hash) VALUES (?, ?, ?)",
                (device_id, seq, token_hash),
            )
            self._db.execute(
                "UPDATE devices SET last_seq = MAX(last_seq, ?), last_hash = ?, seen_at = ? "
                "WHERE device_id = ?",
                (seq, token_hash, now, device_id),
            )
            self._db.execute(
                "DELETE FROM seen WHERE device_id = ? AND seq <= ?",
                (device_id, max(last_seq, seq) - SEQ_WINDOW),
            )
            return freshness

    def last_seq(self, device_id: str) -> int:
        row = self._db.execute(
            "SELECT last_seq FROM devices WHERE device_id = ?", (device_id,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def save_result(self, device_id: str, status: str, token: bytes, at: float) -> None:
        with self._db:
            self._db.execute(
                "INSERT INTO results (device_id, status, token, at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET status = excluded.status, "
                "token = excluded.token, at = excluded.at",
                (device_id, status, token, at),
            )

    def result(self, device_id: str) -> StoredResult | None:
        row = self._db.execute(
            "SELECT status, token, at FROM results WHERE device_id = ?", (device_id,)
        ).fetchone()
        return None if row is None else StoredResult(device_id, row[0], bytes(row[1]), row[2])

    def set_online(self, device_id: str, online: bool, at: float) -> None:
        with self._db:
            self._db.execute(
                "UPDATE devices SET online = ?, seen_at = MAX(seen_at, ?) WHERE device_id = ?",
                (int(online), at, device_id),
            )

    def online_devices(self) -> list[str]:
        rows = self._db.execute("SELECT device_id FROM devices WHERE online = 1").fetchall()
        return [r[0] for r in rows]

    def claim_challenge(self, device_id: str, now: float, min_gap: float) -> bool:
        with self._db:
            updated = self._db.execute(
                "UPDATE devices SET challenged_at = ? WHERE device_id = ? AND challenged_at < ?",
                (now, device_id, now - min_gap),
            ).rowcount
        return bool(updated == 1)

    def silent_devices(self, since: float) -> list[str]:
        rows = self._db.execute(
            "SELECT d.device_id FROM devices d LEFT JOIN results r ON r.device_id = d.device_id "
            "WHERE d.seen_at > 0 AND d.seen_at < ? AND (r.status IS NULL OR r.status != 'none')",
            (since,),
        ).fetchall()
        return [r[0] for r in rows]

    def close(self) -> None:
        self._db.close()
