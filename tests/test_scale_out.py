"""Several verifier processes on one PostgreSQL database and a shared subscription: each evidence
is appraised exactly once and no nonce is ever accepted twice."""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from provisioning.registry import DeviceRecord
from strongroom import topics
from strongroom.signing import SigningKey
from tests.fleet import Fleet, Proc, cli, wait_until
from tests.test_remote_attestation import _device_client, _evidence_of
from verifier.store import Acceptance, Candidate, Freshness, StoredResult
from verifier.store_postgres import PostgresStore
from verifier.store_sql import POSTGRES, array_literal

PG_URL = os.environ.get("STRONGROOM_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_schema() -> Iterator[str]:
    try:
        conn = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.Error as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {str(e).splitlines()[0]}")
    schema = f"sr_test_{secrets.token_hex(6)}"
    yield schema
    conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    conn.close()


def _device(device_id: str) -> DeviceRecord:
    return DeviceRecord(device_id, SigningKey.generate().verify_key, "0" * 64, "1.0.0", False, True)


def test_two_stores_racing_accept_each_nonce_once(pg_schema: str) -> None:
    stores = [PostgresStore(PG_URL, pg_schema) for _ in range(2)]
    stores[0].sync_devices([_device("cam-1")])
    nonces = [os.urandom(32) for _ in range(100)]
    for n in nonces:
        stores[0].issue_nonce("cam-1", n, time.time() + 60)
    outcomes: list[Freshness] = []
    lock = threading.Lock()

    def answer(store: PostgresStore, offset: int) -> None:
        for i, n in enumerate(nonces):
            # both processes see the same nonce answered (as a replayed or duplicated delivery)
            verdict = store.accept_evidence(
                "cam-1", n, 2 * i + 1 + offset, os.urandom(32), time.time()
            )
            with lock:
                outcomes.append(verdict)

    threads = [threading.Thread(target=answer, args=(s, k)) for k, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fresh = [o for o in outcomes if o is Freshness.FRESH]
    assert len(outcomes) == 200 and len(fresh) == 100  # each nonce: once fresh, once refused
    assert all(o in (Freshness.FRESH, Freshness.REPLAY) for o in outcomes)
    used = stores[0]._db.execute("SELECT count(*) FROM nonces WHERE used").fetchone()
    assert used is not None and used[0] == len(fresh)  # never one nonce accepted twice
    for s in stores:
        s.close()


def test_a_batch_naming_a_device_twice_is_written_in_order(pg_schema: str) -> None:
    """The batch writes (one statement each) keep the later evidence and result of a device."""
    store = PostgresStore(PG_URL, pg_schema)
    store.sync_devices([_device("cam-1"), _device("cam-2")])
    nonce = os.urandom(32)
    store.issue_nonce("cam-1", nonce, time.time() + 60)
    items = [
        Candidate("cam-1", nonce, 1, b"a" * 32, True),
        Candidate("cam-2", os.urandom(32), 1, b"b" * 32, False),
        Candidate("cam-1", os.urandom(32), 2, b"c" * 32, False),
        Candidate("cam-1", nonce, 3, b"d" * 32, False),  # the same nonce again: a replay
    ]
    verdicts = [a.freshness for a in store.accept_batch(items, time.time())]
    assert verdicts == [Freshness.FRESH, Freshness.PERIODIC, Freshness.PERIODIC, Freshness.REPLAY]
    assert store.last_seq("cam-1") == 2 and store.last_seq("cam-2") == 1
    store.save_results(
        [
            StoredResult("cam-1", "warning", b"t1", 1.0),
            StoredResult("cam-1", "affirming", b"t2", 2.0),
        ]
    )
    assert store.result("cam-1") == StoredResult("cam-1", "affirming", b"t2", 2.0)
    again = store.accept_batch([Candidate("cam-1", os.urandom(32), 2, b"c" * 32, False)], 0)
    assert again[0].freshness is Freshness.DUPLICATE  # the seen rows were written
    store.close()


def test_array_parameters_read_back_exactly(pg_schema: str) -> None:
    """The batch writes' array parameters (literals built by us, byte strings sent in binary)
    carry every value unchanged, awkward text and floats included."""
    store = PostgresStore(PG_URL, pg_schema)
    rows = [
        ('quote"d', -(2**63), b"", 1e-300, True),
        ("back\\slash\\", 2**63 - 1, b"\x00\xff" * 300, 1_800_000_000.123456, False),
        ("{brace},comma", 0, b'"{,}\\', -0.0, True),
        ("NULL", 7, os.urandom(32), float("inf"), False),
        (" spaced \t", 1, b"x", 0.1 + 0.2, True),
        ("üñí €", 2, b"y", -1.5, False),
        ("", 3, b"z", 2.5, True),
    ]
    d = POSTGRES
    table, params = d.table(("text", "bigint", d.blob, d.real, d.boolean), rows)
    got = store._q(table, params).fetchall()
    assert [(a, b, bytes(c), e, f) for a, b, c, e, f in got] == rows
    is_text, text_params = d.any_of("t", "text", [r[0] for r in rows[:3]])
    picked = store._q(
        f"SELECT t FROM unnest(?::text[]) AS u(t) WHERE {is_text}",  # noqa: S608 - placeholders only
        [array_literal("text", [r[0] for r in rows]), *text_params],
    )
    assert sorted(r[0] for r in picked.fetchall()) == sorted(r[0] for r in rows[:3])
    nulls = store._q("SELECT * FROM unnest(?::text[])", [array_literal("text", [None, "x"])])
    assert [r[0] for r in nulls.fetchall()] == [None, "x"]
    store.close()


def test_a_batch_and_its_results_commit_or_roll_back_together(pg_schema: str) -> None:
    store = PostgresStore(PG_URL, pg_schema)
    store.sync_devices([_device("cam-1")])
    nonce = os.urandom(32)
    store.issue_nonce("cam-1", nonce, time.time() + 60)
    item = Candidate("cam-1", nonce, 4, b"a" * 32, True)

    def failing(verdicts: list[Acceptance]) -> list[StoredResult]:
        raise RuntimeError("signing failed")

    with pytest.raises(RuntimeError):
        store.accept_batch([item], time.time(), failing)
    assert store.last_seq("cam-1") == 0 and store.result("cam-1") is None
    saved = StoredResult("cam-1", "affirming", b"token", 5.0)
    verdicts = store.accept_batch([item], time.time(), lambda v: [saved] if v[0].newest else [])
    assert verdicts[0].freshness is Freshness.FRESH  # the nonce was not used by the failed one
    assert store.result("cam-1") == saved and store.last_seq("cam-1") == 4
    store.close()


def test_a_schema_of_the_seen_table_era_is_upgraded_safely(pg_schema: str) -> None:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {pg_schema}")
        conn.execute(
            f"CREATE TABLE {pg_schema}.devices (device_id TEXT PRIMARY KEY, status TEXT NOT NULL, "
            "last_seq BIGINT NOT NULL DEFAULT 0, last_hash BYTEA, online BOOLEAN NOT NULL "
            "DEFAULT FALSE, seen_at DOUBLE PRECISION NOT NULL DEFAULT 0, "
            "challenged_at DOUBLE PRECISION NOT NULL DEFAULT 0)"
        )
        conn.execute(f"CREATE TABLE {pg_schema}.seen (device_id TEXT, seq BIGINT, hash BYTEA)")
        conn.execute(f"INSERT INTO {pg_schema}.devices VALUES ('cam-1', 'active', 40)")  # noqa: S608 - test schema
    store = PostgresStore(PG_URL, pg_schema)
    verdict = store.accept_evidence("cam-1", os.urandom(32), 39, b"x" * 32, time.time())
    assert verdict is Freshness.REPLAY  # inside the window when upgraded: refused
    verdict = store.accept_evidence("cam-1", os.urandom(32), 41, b"y" * 32, time.time())
    assert verdict is Freshness.PERIODIC
    assert store._q("SELECT to_regclass('seen')").fetchone() == (None,)
    store.close()


def _appraised(procs: list[Proc]) -> list[tuple[int, str]]:
    out = []
    for k, p in enumerate(procs):
        out += [(k, line) for line in p.log().splitlines() if '"appraised"' in line]
    return out


def test_two_verifiers_on_a_shared_subscription_appraise_each_evidence_once(
    fleet: Fleet, pg_schema: str
) -> None:
    fleet.broker.start()
    verifiers = [
        Proc(
            cli(
                "verifier",
                "run",
                "--home",
                str(fleet.home.root),
                "--broker",
                fleet.broker.url,
                "--db",
                PG_URL,
                "--db-schema",
                pg_schema,
                "--shared",
                "--instance",
                str(i),
            ),
            fleet.root / f"verifier-{i}.log",
        )
        for i in (1, 2)
    ]
    try:
        for v in verifiers:
            # connected means subscribed too: subscriptions are renewed in the connect callback
            wait_until(lambda v=v: "broker_connected" in v.log(), 20, "verifier connected")
        time.sleep(0.5)  # both subscribed
        fleet.enroll("cam-1")
        fleet.enroll("cam-2")
        evidence = {d: _evidence_of(fleet, d, 12) for d in ("cam-1", "cam-2")}
        for device_id, tokens in evidence.items():
            client = _device_client(fleet, device_id)
            for token in tokens:
                client.publish(topics.device_topic(device_id, topics.EVIDENCE), token)
            client.stop()
        wait_until(lambda: len(_appraised(verifiers)) >= 24, 30, "every evidence appraised")
        time.sleep(1.0)
        appraised = _appraised(verifiers)
        assert len(appraised) == 24  # exactly once each
        assert {k for k, _line in appraised} == {0, 1}  # the work was shared
    finally:
        for v in verifiers:
            v.stop()


def test_a_store_whose_connection_the_server_dropped_connects_again(pg_schema: str) -> None:
    """A PostgreSQL restart or network fault: the failed call raises a transient error (the
    verifier keeps its batch), and the next one reaches the server afresh."""
    store = PostgresStore(PG_URL, pg_schema)
    store.sync_devices([_device("cam-1")])
    pid = store._db.info.backend_pid
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(store.transient_errors):
        store.issue_nonce("cam-1", os.urandom(32), time.time() + 60)
    store.issue_nonce("cam-1", os.urandom(32), time.time() + 60)  # connected again
    assert store._db.info.backend_pid != pid
    assert store.last_seq("cam-1") == 0
    store.close()
