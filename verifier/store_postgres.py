"""PostgreSQL implementation of the verifier's state store, for several verifier processes.

Same schema and semantics as the SQLite store. Freshness is decided inside one transaction that
locks the device's row (`SELECT ... FOR UPDATE`), and every update is conditional, so two verifiers
that receive evidence from the same device (or the same nonce twice) serialise on that row: each
evidence is accepted at most once and no nonce is ever accepted twice.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import psycopg

from provisioning.registry import DeviceRecord
from strongroom.errors import EnvironmentFault, InputError
from verifier.store import Freshness, StoredResult

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    last_seq BIGINT NOT NULL DEFAULT 0,
    last_hash BYTEA,
    online BOOLEAN NOT NULL DEFAULT FALSE,
    seen_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    challenged_at DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS nonces (
    nonce BYTEA PRIMARY KEY,
    device_id TEXT NOT NULL,
    expires DOUBLE PRECISION NOT NULL,
    used BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE TABLE IF NOT EXISTS seen (
    device_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    hash BYTEA NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE TABLE IF NOT EXISTS results (
    device_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    token BYTEA NOT NULL,
    at DOUBLE PRECISION NOT NULL
);
"""
NONCE_RETENTION_S = 3600
SEQ_WINDOW = 1024  # as in the SQLite store
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def is_postgres_url(value: str) -> bool:
    return value.startswith(("postgresql://", "postgres://"))


class PostgresStore:
    def __init__(self, url: str, schema: str = "strongroom") -> None:
        if not _SCHEMA_NAME.fullmatch(schema):
            raise InputError(f"invalid schema name {schema!r}")
        try:
            self._db = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as e:
            raise EnvironmentFault(
                f"cannot connect to PostgreSQL: {str(e).splitlines()[0]}",
                hint="check the database URL and that the server accepts connections",
            ) from e
        with self._db.transaction():
            # verifiers starting together: serialise the creation of schema and tables
            self._db.execute("SELECT pg_advisory_xact_lock(7400710)")
            self._db.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            self._db.execute(f"SET search_path TO {schema}")
            self._db.execute(_SCHEMA)

    def sync_devices(self, records: Iterable[DeviceRecord]) -> None:
        rows = [(r.device_id, r.status) for r in records]
        with self._db.transaction(), self._db.cursor() as cur:
            cur.executemany(
                "INSERT INTO devices (device_id, status) VALUES (%s, %s) "
                "ON CONFLICT (device_id) DO UPDATE SET status = excluded.status "
                "WHERE devices.status IS DISTINCT FROM excluded.status",
                rows,
            )

    def issue_nonce(self, device_id: str, nonce: bytes, expires: float) -> None:
        with self._db.transaction():
            self._db.execute(
                "INSERT INTO nonces (nonce, device_id, expires) VALUES (%s, %s, %s)",
                (nonce, device_id, expires),
            )
            self._db.execute(
                "DELETE FROM nonces WHERE expires < %s", (expires - NONCE_RETENTION_S,)
            )

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
        with self._db.transaction():
            row = self._db.execute(
                "SELECT last_seq, last_hash FROM devices WHERE device_id = %s FOR UPDATE",
                (device_id,),
            ).fetchone()
            if row is None:
                return Freshness.REPLAY
            last_seq, last_hash = row
            seen = self._db.execute(
                "SELECT hash FROM seen WHERE device_id = %s AND seq = %s", (device_id, seq)
            ).fetchone()
            if seen is not None:  # a redelivery of the latest is benign; anything older, a replay
                latest = last_hash is not None and bytes(last_hash) == token_hash
                return Freshness.DUPLICATE if latest else Freshness.REPLAY
            if seq <= last_seq - SEQ_WINDOW:
                return Freshness.REPLAY
            found = self._db.execute(
                "SELECT used, expires FROM nonces WHERE nonce = %s AND device_id = %s FOR UPDATE",
                (nonce, device_id),
            ).fetchone()
            freshness = Freshness.PERIODIC
            if found is None and require_fresh:
                return freshness
            if found is not None:
                used, expires = found
                if used:
                    return Freshness.REPLAY
                if expires < now:
                    return Freshness.EXPIRED
                self._db.execute("UPDATE nonces SET used = TRUE WHERE nonce = %s", (nonce,))
                freshness = Freshness.FRESH
            self._db.execute(
                "INSERT INTO seen (device_id, seq, hash) VALUES (%s, %s, %s)",
                (device_id, seq, token_hash),
            )
            self._db.execute(
                "UPDATE devices SET last_seq = GREATEST(last_seq, %s), last_hash = %s, "
                "seen_at = %s WHERE device_id = %s",
                (seq, token_hash, now, device_id),
            )
            self._db.execute(
                "DELETE FROM seen WHERE device_id = %s AND seq <= %s",
                (device_id, max(last_seq, seq) - SEQ_WINDOW),
            )
            return freshness

    def last_seq(self, device_id: str) -> int:
        row = self._db.execute(
            "SELECT last_seq FROM devices WHERE device_id = %s", (device_id,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def save_result(self, device_id: str, status: str, token: bytes, at: float) -> None:
        self._db.execute(
            "INSERT INTO results (device_id, status, token, at) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (device_id) DO UPDATE SET status = excluded.status, "
            "token = excluded.token, at = excluded.at",
            (device_id, status, token, at),
        )

    def result(self, device_id: str) -> StoredResult | None:
        row = self._db.execute(
            "SELECT status, token, at FROM results WHERE device_id = %s", (device_id,)
        ).fetchone()
        return None if row is None else StoredResult(device_id, row[0], bytes(row[1]), row[2])

    def set_online(self, device_id: str, online: bool, at: float) -> None:
        self._db.execute(
            "UPDATE devices SET online = %s, seen_at = GREATEST(seen_at, %s) WHERE device_id = %s",
            (online, at, device_id),
        )

    def online_devices(self) -> list[str]:
        rows = self._db.execute("SELECT device_id FROM devices WHERE online").fetchall()
        return [r[0] for r in rows]

    def claim_challenge(self, device_id: str, now: float, min_gap: float) -> bool:
        updated = self._db.execute(
            "UPDATE devices SET challenged_at = %s WHERE device_id = %s AND challenged_at < %s",
            (now, device_id, now - min_gap),
        ).rowcount
        return updated == 1

    def silent_devices(self, since: float) -> list[str]:
        rows = self._db.execute(
            "SELECT d.device_id FROM devices d LEFT JOIN results r ON r.device_id = d.device_id "
            "WHERE d.seen_at > 0 AND d.seen_at < %s AND (r.status IS NULL OR r.status <> 'none')",
            (since,),
        ).fetchall()
        return [r[0] for r in rows]

    def close(self) -> None:
        self._db.close()
