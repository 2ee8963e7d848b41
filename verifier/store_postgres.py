"""PostgreSQL state store, for several verifier processes on one or many machines. The logic is
`verifier.store_sql.SqlStore`; transactions lock the device's row, so two verifiers that receive
evidence from the same device (or the same nonce twice) serialise on it."""

from __future__ import annotations

import contextlib
import re
import urllib.parse
from collections.abc import Sequence
from typing import Any

import psycopg

from strongroom.errors import EnvironmentFault, InputError
from verifier.store_sql import POSTGRES, SqlStore

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def is_postgres_url(value: str) -> bool:
    return value.startswith(("postgresql://", "postgres://"))


def postgres_location(url: str) -> str:
    """Where a PostgreSQL URL points (scheme, host, port, database), for logs: never its user,
    password or query (`?password=` is as secret as the userinfo)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "postgresql://(unparsable URL)"
    where = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{where}{f':{port}' if port else ''}{parts.path}"


class PostgresStore(SqlStore):
    dialect = POSTGRES
    transient_errors: tuple[type[Exception], ...] = (psycopg.OperationalError,)

    def __init__(self, url: str, schema: str = "strongroom") -> None:
        if not _SCHEMA_NAME.fullmatch(schema):
            raise InputError(f"invalid schema name {schema!r}")
        self._url, self._schema = url, schema
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
            self._db.execute(POSTGRES.schema().encode())
            self._migrate()

    def _connected(self) -> psycopg.Connection[Any]:
        """The connection, made again if the server dropped it (a restart, a network fault):
        the verifier retries a batch it could not commit, and each retry must reach the server
        afresh. A failure raises OperationalError, which the verifier takes as transient."""
        if self._db.closed or self._db.broken:
            self._db.close()
            self._db = psycopg.connect(self._url, autocommit=True, connect_timeout=10)
            self._db.execute(f"SET search_path TO {self._schema}".encode())
        return self._db

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._connected().execute(sql.encode(), params)  # our own SQL text, no user input

    def _transaction(self) -> contextlib.AbstractContextManager[Any]:
        return self._connected().transaction()

    def close(self) -> None:
        self._db.close()
