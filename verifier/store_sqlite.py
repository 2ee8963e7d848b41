"""SQLite (WAL) state store: the default, for one verifier process (or several on one machine)."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from verifier.store_sql import SQLITE, SqlStore


class SqliteStore(SqlStore):
    dialect = SQLITE
    transient_errors: tuple[type[Exception], ...] = (sqlite3.OperationalError,)

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self._enable_wal()
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SQLITE.schema())
        with self._transaction():
            self._migrate()

    def _enable_wal(self, timeout_s: float = 30.0) -> None:
        """Switching to WAL needs the database to itself, and SQLite does not wait for that (the
        busy timeout does not apply): retry while another process is setting up the same file."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._db.execute(sql, params)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._db:  # commits, or rolls back on an exception
            self._db.execute("BEGIN IMMEDIATE")  # the write lock first: no lost updates
            yield

    def close(self) -> None:
        self._db.close()
