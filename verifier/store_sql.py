"""The verifier's state store over SQL, written once for SQLite and PostgreSQL.

Queries are written with `?` placeholders and `{lock}` / `{greatest}` markers that a small dialect
fills in. Every freshness decision is one transaction: PostgreSQL locks the device's row
(`FOR UPDATE`), SQLite takes its database write lock (`BEGIN IMMEDIATE`); every update is
conditional. So several verifier processes stay correct: each evidence is accepted at most once and
no nonce twice. The verdicts are `verifier.freshness.decide`'s, on the rows read and locked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from provisioning.registry import DeviceRecord
from verifier.freshness import (
    WINDOW_BYTES,
    WINDOW_MASK,
    Acceptance,
    BatchState,
    Candidate,
    Challenge,
    DeviceWindow,
    Freshness,
    decide,
)
from verifier.store import MakeResults, StoredResult

NONCE_RETENTION_S = 3600
SYNC_CHUNK = 500  # devices per statement and transaction when the registry is synced


@dataclass(frozen=True)
class Dialect:
    param: str  # "?" or "%s"
    lock: str  # "" or " FOR UPDATE"
    greatest: str  # "MAX" or "GREATEST"
    blob: str  # "BLOB" or "BYTEA"
    real: str  # "REAL" or "DOUBLE PRECISION"
    boolean: str  # "INTEGER" or "BOOLEAN"
    # Bulk parameters as arrays (one short statement text, so one prepared statement whatever the
    # batch size), or as placeholder lists. `binary`: the placeholder of a parameter the driver
    # sends in binary.
    arrays: bool = False
    binary: str = ""

    def _array(self, type_: str, values: Iterable[Any]) -> tuple[str, Any]:
        """One array parameter: a byte-string array as a list the driver sends in binary (no hex
        text to build and parse); any other as one literal that the server parses (the
        driver's own conversion goes element by element in Python)."""
        if type_ == self.blob:
            return f"{self.binary}::{type_}[]", list(values)
        return f"?::{type_}[]", array_literal(type_, values)

    def any_of(self, column: str, type_: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        """`column` (of SQL type `type_`) is one of `values`: the condition and its parameters.
        On PostgreSQL a semi-join on the array, not `= ANY(array)`: the prepared statement's
        generic plan for `= ANY` with `ORDER BY ... FOR UPDATE` walks the whole index,
        comparing each key with each value."""
        if self.arrays:
            placeholder, param = self._array(type_, values)
            return f"{column} IN (SELECT unnest({placeholder}))", [param]
        return f"{column} IN ({_marks(len(values))})", list(values)

    def table(self, types: Sequence[str], rows: Sequence[Sequence[Any]]) -> tuple[str, list[Any]]:
        """Rows as a table expression (`INSERT INTO t (...) <it>`, `WITH v (...) AS (<it>)`), so
        one statement writes a whole batch: a statement per row cost PostgreSQL a round of
        parse, plan and execute each, and its driver a query conversion each."""
        if self.arrays:
            arrays = [
                self._array(t, c) for t, c in zip(types, zip(*rows, strict=True), strict=True)
            ]
            columns = ", ".join(placeholder for placeholder, _ in arrays)
            table = f"SELECT * FROM unnest({columns})"  # noqa: S608 - our type names only
            return table, [param for _, param in arrays]
        row = f"({_marks(len(types))})"
        return "VALUES " + ", ".join([row] * len(rows)), [v for r in rows for v in r]

    def schema(self) -> str:
        return f"""
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    last_seq BIGINT NOT NULL DEFAULT 0,
    last_hash {self.blob},
    seen_window {self.blob},
    accepted BIGINT NOT NULL DEFAULT 0,
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
-- issuing a challenge prunes nonces long expired: by index, not by scanning every nonce
CREATE INDEX IF NOT EXISTS nonces_expires ON nonces (expires);
CREATE TABLE IF NOT EXISTS results (
    device_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    token {self.blob} NOT NULL,
    at {self.real} NOT NULL
);
-- the last revoke command sent to each device, until the device confirms it
CREATE TABLE IF NOT EXISTS commands (
    device_id TEXT PRIMARY KEY,
    nonce {self.blob} NOT NULL,
    issued_at {self.real} NOT NULL
);
"""


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


_ELEMENT: dict[str, Callable[[Any], str]] = {
    "text": _quoted,
    "bigint": str,
    "double precision": repr,  # the shortest text that reads back as the same float
    "boolean": lambda v: "t" if v else "f",
}


def array_literal(type_: str, values: Iterable[Any]) -> str:
    """A PostgreSQL array literal of `values` (NULL for None) of SQL type `type_` (text,
    bigint, double precision or boolean)."""
    element = _ELEMENT[type_.lower()]
    return "{" + ",".join("NULL" if v is None else element(v) for v in values) + "}"


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _by_device(r: StoredResult) -> str:
    return r.device_id  # rows in device order: the lock order of every transaction here


SQLITE = Dialect("?", "", "MAX", "BLOB", "REAL", "INTEGER")
POSTGRES = Dialect(
    "%s",
    " FOR UPDATE",
    "GREATEST",
    "BYTEA",
    "DOUBLE PRECISION",
    "BOOLEAN",
    arrays=True,
    binary="%b",
)


class SqlStore:
    """The store's logic; subclasses supply the connection and the transaction."""

    dialect: Dialect

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        raise NotImplementedError

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        d = self.dialect
        return sql.format(lock=d.lock, greatest=d.greatest).replace("?", d.param)

    def _q(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._execute(self._sql(sql), params)

    def _migrate(self) -> None:
        """Bring a database written by an earlier version up to this schema (call it inside a
        transaction): the table of seen sequence numbers became a bitmap in the device's row.
        Every sequence number in an upgraded device's window counts as seen: late evidence from
        before the upgrade is refused, never accepted twice."""
        columns = {c[0] for c in self._q("SELECT * FROM devices LIMIT 0").description}
        if "seen_window" in columns:
            return
        self._q(f"ALTER TABLE devices ADD COLUMN seen_window {self.dialect.blob}")
        self._q("ALTER TABLE devices ADD COLUMN accepted BIGINT NOT NULL DEFAULT 0")
        full = WINDOW_MASK.to_bytes(WINDOW_BYTES, "big")
        self._q("UPDATE devices SET seen_window = ? WHERE last_seq > 0", (full,))
        self._q("DROP TABLE IF EXISTS seen")

    def sync_devices(self, records: Iterable[DeviceRecord]) -> None:
        """Insert or update the devices' statuses, in device order (the lock order)."""
        statuses = {r.device_id: r.status for r in records}
        rows = sorted(statuses.items())
        for start in range(0, len(rows), SYNC_CHUNK):
            table, params = self.dialect.table(("text", "text"), rows[start : start + SYNC_CHUNK])
            with self._transaction():
                self._q(
                    f"INSERT INTO devices (device_id, status) {table} "
                    "ON CONFLICT (device_id) DO UPDATE SET status = excluded.status",
                    params,
                )

    def issue_nonce(self, device_id: str, nonce: bytes, expires: float) -> None:
        with self._transaction():
            self._q(
                "INSERT INTO nonces (nonce, device_id, expires, used) VALUES (?, ?, ?, ?)",
                (nonce, device_id, expires, False),
            )
            self._q("DELETE FROM nonces WHERE expires < ?", (expires - NONCE_RETENTION_S,))

    def accept_evidence(
        self,
        device_id: str,
        nonce: bytes,
        seq: int,
        token_hash: bytes,
        now: float,
        *,
        require_fresh: bool = False,
    ) -> Freshness:
        item = Candidate(device_id, nonce, seq, token_hash, require_fresh)
        return self.accept_batch([item], now)[0].freshness

    def accept_batch(
        self, items: Sequence[Candidate], now: float, results: MakeResults | None = None
    ) -> list[Acceptance]:
        """Three reads (the devices' rows locked, in device order, so that two verifiers'
        batches cannot deadlock), the verdicts decided in order in memory, and the writes sent
        together: a handful of round trips per batch instead of six per evidence. The results
        that `results` makes of the verdicts are saved in the same transaction."""
        if not items:
            return []
        device_ids = sorted({i.device_id for i in items})
        with self._transaction():
            state = self._read_state(items, device_ids)
            verdicts = [decide(item, state, now) for item in items]
            self._write_state(state, now)
            if results is not None:
                self._save_results(results(verdicts))
        return verdicts

    def _read_state(self, items: Sequence[Candidate], device_ids: list[str]) -> BatchState:
        state, d = BatchState(), self.dialect
        is_device, device_params = d.any_of("device_id", "text", device_ids)
        for device_id, last_seq, last_hash, window in self._q(
            f"SELECT device_id, last_seq, last_hash, seen_window FROM devices WHERE {is_device} "  # noqa: S608 - placeholders only
            "ORDER BY device_id{lock}",
            device_params,
        ).fetchall():
            state.devices[device_id] = DeviceWindow.from_row(last_seq, last_hash, window)
        is_nonce, nonce_params = d.any_of("nonce", d.blob, sorted({i.nonce for i in items}))
        for nonce, device_id, used, expires in self._q(
            f"SELECT nonce, device_id, used, expires FROM nonces WHERE {is_nonce} "  # noqa: S608 - placeholders only
            "ORDER BY nonce{lock}",
            nonce_params,
        ).fetchall():
            state.nonces[bytes(nonce)] = Challenge(device_id, bool(used), float(expires))
        return state

    def _write_state(self, state: BatchState, now: float) -> None:
        """The batch's writes, a statement each (the rows they touch are locked already)."""
        d = self.dialect
        if state.used_nonces:
            is_nonce, params = d.any_of("nonce", d.blob, state.used_nonces)
            self._q(f"UPDATE nonces SET used = ? WHERE {is_nonce}", [True, *params])  # noqa: S608 - placeholders only
        rows = [
            (
                i,
                dev.last_seq,
                dev.last_hash,
                dev.window_bytes(),
                dev.accepted,
            )
            for i, dev in ((i, state.devices[i]) for i in sorted(state.changed))
        ]
        if rows:
            table, params = d.table(("text", "bigint", d.blob, d.blob, "bigint"), rows)
            self._q(
                f"WITH v (device_id, last_seq, last_hash, seen_window, accepted) AS ({table}) "  # noqa: S608 - placeholders only
                "UPDATE devices SET last_seq = v.last_seq, last_hash = v.last_hash, "
                "seen_window = v.seen_window, accepted = devices.accepted + v.accepted, "
                "seen_at = ? FROM v WHERE devices.device_id = v.device_id",
                [*params, now],
            )

    def last_seq(self, device_id: str) -> int:
        row = self._q("SELECT last_seq FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        return 0 if row is None else int(row[0])

    def save_result(self, device_id: str, status: str, token: bytes, at: float) -> None:
        self.save_results([StoredResult(device_id, status, token, at)])

    def save_results(self, results: Sequence[StoredResult]) -> None:
        with self._transaction():
            self._save_results(results)

    def _save_results(self, results: Sequence[StoredResult]) -> None:
        """Save results (for a device named twice, the later one), in one statement."""
        if not results:
            return
        latest = {r.device_id: r for r in results}
        rows = [
            (r.device_id, r.status, r.token, r.at) for r in sorted(latest.values(), key=_by_device)
        ]
        d = self.dialect
        table, params = d.table(("text", "text", d.blob, d.real), rows)
        self._q(
            f"INSERT INTO results (device_id, status, token, at) {table} "
            "ON CONFLICT (device_id) DO UPDATE SET status = excluded.status, "
            "token = excluded.token, at = excluded.at",
            params,
        )

    def record_command(self, device_id: str, nonce: bytes, issued_at: float) -> None:
        """The revoke command now outstanding for the device (it replaces any earlier one)."""
        with self._transaction():
            self._q(
                "INSERT INTO commands (device_id, nonce, issued_at) VALUES (?, ?, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET nonce = excluded.nonce, "
                "issued_at = excluded.issued_at",
                (device_id, nonce, issued_at),
            )

    def confirm_command(self, device_id: str, nonce: bytes) -> float | None:
        """When the outstanding command with this nonce was issued, and it is confirmed (so no
        longer outstanding); None if the device has no such command outstanding."""
        with self._transaction():
            row = self._q(
                "DELETE FROM commands WHERE device_id = ? AND nonce = ? RETURNING issued_at",
                (device_id, nonce),
            ).fetchall()
        return float(row[0][0]) if row else None

    def forget_command(self, device_id: str) -> None:
        with self._transaction():
            self._q("DELETE FROM commands WHERE device_id = ?", (device_id,))

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

    def due_for_challenge(self, before: float, limit: int) -> list[str]:
        rows = self._q(
            "SELECT device_id FROM devices WHERE online = ? AND challenged_at < ? "
            "ORDER BY challenged_at, device_id LIMIT ?",
            (True, before, limit),
        ).fetchall()
        return [r[0] for r in rows]

    def claim_challenge(self, device_id: str, now: float, min_gap: float) -> bool:
        with self._transaction():
            updated = self._q(
                "UPDATE devices SET challenged_at = ? WHERE device_id = ? AND challenged_at < ?",
                (now, device_id, now - min_gap),
            ).rowcount
        return bool(updated == 1)

    def unclaim_challenge(self, device_id: str, claimed_at: float) -> None:
        with self._transaction():
            self._q(
                "UPDATE devices SET challenged_at = 0 WHERE device_id = ? AND challenged_at = ?",
                (device_id, claimed_at),
            )

    def silent_devices(self, since: float) -> list[str]:
        rows = self._q(
            "SELECT d.device_id FROM devices d LEFT JOIN results r ON r.device_id = d.device_id "
            "WHERE d.seen_at > 0 AND d.seen_at < ? AND (r.status IS NULL OR r.status <> 'none')",
            (since,),
        ).fetchall()
        return [r[0] for r in rows]
