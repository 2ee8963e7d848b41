"""The verifier's state store over SQL, written once for SQLite and PostgreSQL.

Queries are written with `?` placeholders and `{lock}` / `{greatest}` markers that a small dialect
fills in. Every freshness decision is one transaction: PostgreSQL locks the device's row
(`FOR UPDATE`), SQLite takes its database write lock (`BEGIN IMMEDIATE`); every update is
conditional. So several verifier processes stay correct: each evidence is accepted at most once and
no nonce twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from provisioning.registry import DeviceRecord
from verifier.store import Freshness, StoredResult

NONCE_RETENTION_S = 3600
# Evidence may arrive out of order when several verifiers share the work: any sequence number not
# seen before and above (highest - SEQ_WINDOW) is accepted once; anything else is a replay.
SEQ_WINDOW = 1024


@dataclass(frozen=True)
class Dialect:
    param: str  # "?" or "%s"
    lock: str  # "" or " FOR UPDATE"
    greatest: str  # "MAX" or "GREATEST"
    blob: str  # "BLOB" or "BYTEA"
    real: str  # "REAL" or "DOUBLE PRECISION"
    boolean: str  # "INTEGER" or "BOOLEAN"

    def schema(self) -> str:
        return f"""
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    last_seq BIGINT NOT NULL DEFAULT 0,
    last_hash {self.blob},
    online {self.boolean} NOT NULL DEFAULT {"FALSE" if self.boolean == "BOOLEAN" else 0},
    seen_at {self.real} NOT NULL DEFAULT 0,
    challenged_at {self.real} NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS nonces (
    nonce {self.blob} PRIMARY KEY,
    device_id TEXT NOT NULL,
    expires {self.real} NOT NULL,
    used {self.boolean} NOT NULL DEFAULT {"FALSE" if self.boolean == "BOOLEAN" else 0}
);
CREATE TABLE IF NOT EXISTS seen (
    device_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    hash {self.blob} NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE TABLE IF NOT EXISTS results (
    device_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    token {self.blob} NOT NULL,
    at {self.real} NOT NULL
);
"""


SQLITE = Dialect("?", "", "MAX", "BLOB", "REAL", "INTEGER")
POSTGRES = Dialect("%s", " FOR UPDATE", "GREATEST", "BYTEA", "DOUBLE PRECISION", "BOOLEAN")


class SqlStore:
    """The store's logic; subclasses supply the connection and the transaction."""

    dialect: Dialect

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        raise NotImplementedError

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def _q(self, sql: str, params: Sequence[Any] = ()) -> Any:
        d = self.dialect
        text = sql.format(lock=d.lock, greatest=d.greatest).replace("?", d.param)
        return self._execute(text, params)

    def sync_devices(self, records: Iterable[DeviceRecord]) -> None:
        with self._transaction():
            for r in records:
                self._q(
                    "INSERT INTO devices (device_id, status) VALUES (?, ?) "
                    "ON CONFLICT (device_id) DO UPDATE SET status = excluded.status",
                    (r.device_id, r.status),
                )

    def issue_nonce(self, device_id: str, nonce: bytes, expires: float) -> None:
        with self._transaction():
            self._q(
                "INSERT INTO nonces (nonce, device_id, expires, used) VALUES (?, ?, ?, ?)",
                (nonce, device_id, expires, False),
            )
            self._q("DELETE FROM nonces WHERE expires < ?", (expires - NONCE_RETENTION_S,))

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
        with self._transaction():
            row = self._q(
                "SELECT last_seq, last_hash FROM devices WHERE device_id = ?{lock}", (device_id,)
            ).fetchone()
            if row is None:
                return Freshness.REPLAY
            last_seq, last_hash = row[0], None if row[1] is None else bytes(row[1])
            seen = self._q(
                "SELECT hash FROM seen WHERE device_id = ? AND seq = ?", (device_id, seq)
            ).fetchone()
            if seen is not None:  # a redelivery of the latest is benign; anything older, a replay
                return Freshness.DUPLICATE if last_hash == token_hash else Freshness.REPLAY
            if seq <= last_seq - SEQ_WINDOW:
                return Freshness.REPLAY
            found = self._q(
                "SELECT used, expires FROM nonces WHERE nonce = ? AND device_id = ?{lock}",
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
                self._q("UPDATE nonces SET used = ? WHERE nonce = ?", (True, nonce))
                freshness = Freshness.FRESH
            self._q(
                "INSERT INTO seen (device_id, seq, hash) VALUES (?, ?, ?)",
                (device_id, seq, token_hash),
            )
            self._q(
                "UPDATE devices SET last_seq = {greatest}(last_seq, ?), last_hash = ?, "
                "seen_at = ? WHERE device_id = ?",
                (seq, token_hash, now, device_id),
            )
            self._q(
                "DELETE FROM seen WHERE device_id = ? AND seq <= ?",
                (device_id, max(last_seq, seq) - SEQ_WINDOW),
            )
            return freshness

    def last_seq(self, device_id: str) -> int:
        row = self._q("SELECT last_seq FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        return 0 if row is None else int(row[0])

    def save_result(self, device_id: str, status: str, token: bytes, at: float) -> None:
        with self._transaction():
            self._q(
                "INSERT INTO results (device_id, status, token, at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET status = excluded.status, "
                "token = excluded.token, at = excluded.at",
                (device_id, status, token, at),
            )

    def result(self, device_id: str) -> StoredResult | None:
        row = self._q(
            "SELECT status, token, at FROM results WHERE device_id = ?", (device_id,)
        ).fetchone()
        return None if row is None else StoredResult(device_id, row[0], bytes(row[1]), row[2])

    def set_online(self, device_id: str, online: bool, at: float) -> None:
        with self._transaction():
            self._q(
                "UPDATE devices SET online = ?, seen_at = {greatest}(seen_at, ?) "
                "WHERE device_id = ?",
                (online, at, device_id),
            )

    def online_devices(self) -> list[str]:
        rows = self._q("SELECT device_id FROM devices WHERE online = ?", (True,)).fetchall()
        return [r[0] for r in rows]

    def claim_challenge(self, device_id: str, now: float, min_gap: float) -> bool:
        with self._transaction():
            updated = self._q(
                "UPDATE devices SET challenged_at = ? WHERE device_id = ? AND challenged_at < ?",
                (now, device_id, now - min_gap),
            ).rowcount
        return bool(updated == 1)

    def silent_devices(self, since: float) -> list[str]:
        rows = self._q(
            "SELECT d.device_id FROM devices d LEFT JOIN results r ON r.device_id = d.device_id "
            "WHERE d.seen_at > 0 AND d.seen_at < ? AND (r.status IS NULL OR r.status <> 'none')",
            (since,),
        ).fetchall()
        return [r[0] for r in rows]
