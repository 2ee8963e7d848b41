"""The SQLite state store: freshness verdicts, no state change on rejection, and correctness when
several verifier processes share one database file (simulated with one store object per thread)."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest

from provisioning.registry import DeviceRecord
from strongroom.signing import SigningKey
from verifier.freshness import SEQ_WINDOW
from verifier.store import Acceptance, Candidate, Freshness, StoredResult
from verifier.store_sqlite import SqliteStore

NOW = 1_800_000_000.0
TTL = 60.0
T = TypeVar("T")


def record(device_id: str, status: str = "active") -> DeviceRecord:
    return DeviceRecord(
        device_id=device_id,
        attestation_key=SigningKey(bytes(32)).verify_key,
        tls_cert_sha256="ab" * 32,
        firmware="1.0.0",
        debug=False,
        secure_boot=True,
        status=status,
    )


def token_hash(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def nonce(i: int) -> bytes:
    return i.to_bytes(4, "big") * 8


def accept(
    s: SqliteStore,
    device_id: str,
    nonce_: bytes,
    seq: int,
    label: str,
    *,
    now: float = NOW,
    require_fresh: bool = False,
) -> Freshness:
    """Offer evidence `label` (its token hash stands for the token) with this nonce and seq."""
    return s.accept_evidence(
        device_id, nonce_, seq, token_hash(label), now, require_fresh=require_fresh
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(db_path)
    s.sync_devices([record("dev-a"), record("dev-b")])
    yield s
    s.close()


def test_an_outstanding_challenge_answered_by_its_device_is_fresh(store: SqliteStore) -> None:
    store.issue_nonce("dev-a", nonce(1), NOW + TTL)
    assert accept(store, "dev-a", nonce(1), 1, "e1") is Freshness.FRESH
    assert store.last_seq("dev-a") == 1


def test_a_challenge_answered_twice_is_a_replay_even_with_a_higher_seq(store: SqliteStore) -> None:
    store.issue_nonce("dev-a", nonce(1), NOW + TTL)
    assert accept(store, "dev-a", nonce(1), 1, "e1") is Freshness.FRESH
    again = accept(store, "dev-a", nonce(1), 2, "e2", now=NOW + 1)
    assert again is Freshness.REPLAY
    assert store.last_seq("dev-a") == 1


def test_a_challenge_answered_after_it_expired_is_expired(store: SqliteStore) -> None:
    store.issue_nonce("dev-a", nonce(1), NOW + TTL)
    late = accept(store, "dev-a", nonce(1), 1, "e1", now=NOW + TTL + 0.001)
    assert late is Freshness.EXPIRED
    assert store.last_seq("dev-a") == 0


def test_evidence_with_the_devices_own_nonce_is_periodic(store: SqliteStore) -> None:
    verdict = accept(store, "dev-a", b"own-nonce" * 4, 1, "e1")
    assert verdict is Freshness.PERIODIC
    assert store.last_seq("dev-a") == 1


def test_periodic_evidence_is_not_recorded_when_a_fresh_answer_is_required(
    store: SqliteStore,
) -> None:
    verdict = accept(store, "dev-a", b"own-nonce" * 4, 5, "e5", require_fresh=True)
    assert verdict is Freshness.PERIODIC
    assert store.last_seq("dev-a") == 0
    # nothing was recorded, so the same evidence can still be accepted later
    assert accept(store, "dev-a", b"x" * 32, 5, "e5") is Freshness.PERIODIC


def test_a_redelivery_of_the_last_accepted_evidence_is_a_duplicate(store: SqliteStore) -> None:
    assert accept(store, "dev-a", nonce(9), 3, "e3") is Freshness.PERIODIC
    assert accept(store, "dev-a", nonce(9), 3, "e3", now=NOW + 5) is Freshness.DUPLICATE
    assert store.last_seq("dev-a") == 3


def test_another_token_with_an_already_accepted_seq_is_a_replay(store: SqliteStore) -> None:
    accept(store, "dev-a", nonce(9), 3, "e3")
    assert accept(store, "dev-a", nonce(10), 3, "forged") is Freshness.REPLAY


def test_an_older_accepted_evidence_sent_again_is_a_replay_not_a_duplicate(
    store: SqliteStore,
) -> None:
    accept(store, "dev-a", nonce(9), 3, "e3")
    accept(store, "dev-a", nonce(9), 4, "e4")
    assert accept(store, "dev-a", nonce(9), 3, "e3") is Freshness.REPLAY


def test_a_redelivery_of_the_highest_after_a_late_one_is_a_duplicate_not_a_replay(
    store: SqliteStore,
) -> None:
    """Accept 10, then a late 9 (another verifier's order), then 10 again (a redelivery): the
    redelivery is benign, across batches too."""
    accept(store, "dev-a", nonce(9), 10, "e10")
    assert accept(store, "dev-a", nonce(9), 9, "e9", now=NOW + 1) is Freshness.PERIODIC
    assert accept(store, "dev-a", nonce(9), 10, "e10", now=NOW + 2) is Freshness.DUPLICATE
    assert store.last_seq("dev-a") == 10


def test_a_seq_far_below_the_highest_is_a_replay(store: SqliteStore) -> None:
    high = SEQ_WINDOW + 50
    accept(store, "dev-a", nonce(9), high, "high")
    verdict = accept(store, "dev-a", nonce(9), high - SEQ_WINDOW, "old")
    assert verdict is Freshness.REPLAY
    assert accept(store, "dev-a", nonce(9), 0, "zero") is Freshness.REPLAY
    assert store.last_seq("dev-a") == high


def test_an_unseen_seq_within_the_window_is_accepted_once_out_of_order(
    store: SqliteStore,
) -> None:
    """docs/protocol.md: several verifiers may see a device's evidence out of order."""
    accept(store, "dev-a", nonce(9), 10, "e10")
    assert accept(store, "dev-a", nonce(9), 8, "e8") is Freshness.PERIODIC
    assert store.last_seq("dev-a") == 10  # a late one does not lower the highest
    assert accept(store, "dev-a", nonce(9), 8, "e8-again") is Freshness.REPLAY


def test_the_window_keeps_each_seq_it_covers_as_it_slides(store: SqliteStore) -> None:
    """The seen bitmap at its edges: the oldest seq still inside is accepted once, and what
    was accepted stays seen while the window moves on, in one jump or across batches."""
    accept(store, "dev-a", nonce(9), 5, "e5")
    accept(store, "dev-a", nonce(9), 5 + SEQ_WINDOW - 1, "top")  # e5 is now the window's last bit
    assert accept(store, "dev-a", nonce(9), 5, "e5-again") is Freshness.REPLAY
    assert accept(store, "dev-a", nonce(9), 6, "e6") is Freshness.PERIODIC
    assert accept(store, "dev-a", nonce(9), 5 + SEQ_WINDOW - 1, "top") is Freshness.DUPLICATE
    accept(store, "dev-a", nonce(9), 5 + SEQ_WINDOW, "next")  # e5 falls out: a replay by age
    assert accept(store, "dev-a", nonce(9), 5, "e5") is Freshness.REPLAY
    assert accept(store, "dev-a", nonce(9), 6, "e6-other") is Freshness.REPLAY
    assert accept(store, "dev-a", nonce(9), 7, "e7") is Freshness.PERIODIC
    far = 2**62  # a jump far beyond the window: it starts afresh (and costs no more)
    assert accept(store, "dev-a", nonce(9), far, "far") is Freshness.PERIODIC
    assert accept(store, "dev-a", nonce(9), far - 1, "far-1") is Freshness.PERIODIC
    assert accept(store, "dev-a", nonce(9), far - 1, "far-1-again") is Freshness.REPLAY


def test_a_database_of_the_seen_table_era_is_upgraded_safely(db_path: Path) -> None:
    """An earlier version kept seen sequence numbers in their own table. After the upgrade,
    nothing in an active device's window can be accepted again; newer evidence is."""
    with contextlib.closing(sqlite3.connect(db_path)) as old, old:
        old.executescript(
            """
            CREATE TABLE devices (device_id TEXT PRIMARY KEY, status TEXT NOT NULL,
                last_seq BIGINT NOT NULL DEFAULT 0, last_hash BLOB,
                online INTEGER NOT NULL DEFAULT 0, seen_at REAL NOT NULL DEFAULT 0,
                challenged_at REAL NOT NULL DEFAULT 0);
            CREATE TABLE seen (device_id TEXT NOT NULL, seq BIGINT NOT NULL, hash BLOB NOT NULL,
                PRIMARY KEY (device_id, seq));
            INSERT INTO devices (device_id, status, last_seq) VALUES ('dev-a', 'active', 40),
                ('dev-b', 'active', 0);
            INSERT INTO seen VALUES ('dev-a', 38, x'00'), ('dev-a', 40, x'01');
            """
        )
    s = SqliteStore(db_path)
    assert accept(s, "dev-a", nonce(9), 38, "e38") is Freshness.REPLAY
    assert accept(s, "dev-a", nonce(9), 39, "e39") is Freshness.REPLAY  # unknown: refused
    assert accept(s, "dev-a", nonce(9), 41, "e41") is Freshness.PERIODIC
    assert accept(s, "dev-b", nonce(9), 1, "b1") is Freshness.PERIODIC
    tables = {r[0] for r in s._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "seen" not in tables
    s.close()
    again = SqliteStore(db_path)  # an upgraded database opens as it is
    assert accept(again, "dev-a", nonce(9), 40, "e40") is Freshness.REPLAY
    assert accept(again, "dev-a", nonce(9), 41, "e41") is Freshness.DUPLICATE
    again.close()


def test_evidence_from_an_unknown_device_is_a_replay(store: SqliteStore) -> None:
    assert accept(store, "dev-z", nonce(1), 1, "e1") is Freshness.REPLAY
    assert store.last_seq("dev-z") == 0


def test_a_challenge_issued_to_one_device_is_not_fresh_for_another(store: SqliteStore) -> None:
    store.issue_nonce("dev-a", nonce(1), NOW + TTL)
    stolen = accept(store, "dev-b", nonce(1), 1, "b1")
    assert stolen is not Freshness.FRESH
    refused = accept(store, "dev-b", nonce(1), 2, "b2", require_fresh=True)
    assert refused is Freshness.PERIODIC  # a key request with it is refused
    assert store.last_seq("dev-b") == 1
    # the challenge is still dev-a's to answer
    assert accept(store, "dev-a", nonce(1), 1, "a1") is Freshness.FRESH


@pytest.mark.parametrize(
    ("setup", "attempt", "expected"),
    [
        pytest.param(
            lambda s: accept(s, "dev-a", nonce(2), 5, "first"),
            lambda s: accept(s, "dev-a", nonce(1), 5, "other"),
            Freshness.REPLAY,
            id="seen-seq-with-outstanding-nonce",
        ),
        pytest.param(
            lambda s: accept(s, "dev-a", nonce(2), 5, "first"),
            lambda s: accept(s, "dev-a", nonce(2), 5, "first"),
            Freshness.DUPLICATE,
            id="duplicate",
        ),
        pytest.param(
            lambda s: accept(s, "dev-a", nonce(2), 5, "first"),
            lambda s: accept(s, "dev-a", nonce(1), 5, "other", now=NOW + 2 * TTL),
            Freshness.REPLAY,
            id="seen-seq-with-expired-nonce",
        ),
    ],
)
def test_a_rejected_evidence_changes_no_state(
    store: SqliteStore,
    setup: Callable[[SqliteStore], Freshness],
    attempt: Callable[[SqliteStore], Freshness],
    expected: Freshness,
) -> None:
    store.issue_nonce("dev-a", nonce(1), NOW + TTL)
    setup(store)
    assert attempt(store) is expected
    assert store.last_seq("dev-a") == 5
    # the outstanding challenge was not consumed by the rejected message
    assert accept(store, "dev-a", nonce(1), 6, "e6") is Freshness.FRESH


def test_an_expired_answer_consumes_neither_the_seq_nor_the_nonce(store: SqliteStore) -> None:
    store.issue_nonce("dev-a", nonce(1), NOW + TTL)
    accept(store, "dev-a", nonce(7), 3, "e3")
    late = NOW + TTL + 1
    assert accept(store, "dev-a", nonce(1), 4, "e4", now=late) is Freshness.EXPIRED
    assert store.last_seq("dev-a") == 3
    assert accept(store, "dev-a", nonce(1), 4, "e4", now=late) is (
        Freshness.EXPIRED  # still expired: not turned into a replay or a duplicate
    )
    assert accept(store, "dev-a", nonce(7), 4, "e4", now=late) is Freshness.PERIODIC


def test_a_replayed_challenge_answer_does_not_move_the_seq(store: SqliteStore) -> None:
    store.issue_nonce("dev-a", nonce(1), NOW + TTL)
    accept(store, "dev-a", nonce(1), 3, "e3")
    assert accept(store, "dev-a", nonce(1), 900, "e900") is Freshness.REPLAY
    assert store.last_seq("dev-a") == 3


def test_state_survives_reopening_the_database(db_path: Path, store: SqliteStore) -> None:
    store.issue_nonce("dev-a", nonce(1), NOW + TTL)
    accept(store, "dev-a", nonce(1), 4, "e4")
    store.close()
    reopened = SqliteStore(db_path)
    try:
        assert reopened.last_seq("dev-a") == 4
        assert accept(reopened, "dev-a", nonce(1), 5, "e5") is Freshness.REPLAY
    finally:
        reopened.close()


# -- several verifier processes on one database file -----------------------------------------


def run_in_threads(db_path: Path, count: int, work: Callable[[SqliteStore], T]) -> list[T]:
    """Run `work` in `count` threads at once, each with its own store on the same file (as
    separate verifier processes would have), and return what each returned."""
    barrier = threading.Barrier(count)
    results: list[T | BaseException | None] = [None] * count

    def run(i: int) -> None:
        s = SqliteStore(db_path)
        try:
            barrier.wait(timeout=10)
            results[i] = work(s)
        except BaseException as e:
            results[i] = e
        finally:
            s.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


def test_two_verifiers_racing_on_one_evidence_accept_it_exactly_once(
    db_path: Path, store: SqliteStore
) -> None:
    for round_ in range(20):
        store.issue_nonce("dev-a", nonce(round_), NOW + TTL)
        verdicts = run_in_threads(
            db_path, 2, lambda s, i=round_: accept(s, "dev-a", nonce(i), i + 1, f"e{i}")
        )
        assert sorted(v.value for v in verdicts) == ["duplicate", "fresh"], f"round {round_}"
    assert store.last_seq("dev-a") == 20


def test_two_verifiers_never_accept_one_challenge_twice(db_path: Path, store: SqliteStore) -> None:
    count = 200
    for i in range(count):
        store.issue_nonce("dev-a", nonce(i), NOW + TTL)

    offsets = iter([1, 2])
    lock = threading.Lock()

    def answer_all(s: SqliteStore) -> list[tuple[int, int, Freshness]]:
        # each verifier gets its own evidence (its own, increasing seqs) for every challenge
        with lock:
            offset = next(offsets)
        out = []
        for i in range(count):
            seq = 2 * i + offset
            verdict = accept(s, "dev-a", nonce(i), seq, f"{seq}")
            out.append((i, seq, verdict))
        return out

    first, second = run_in_threads(db_path, 2, answer_all)
    verdicts = first + second
    fresh = Counter(i for i, _, v in verdicts if v is Freshness.FRESH)
    assert all(fresh[i] == 1 for i in range(count)), "a challenge accepted twice or never"
    others = Counter(v for _, _, v in verdicts if v is not Freshness.FRESH)
    assert others == Counter({Freshness.REPLAY: count})
    accepted = max(seq for _, seq, v in verdicts if v is Freshness.FRESH)
    assert store.last_seq("dev-a") == accepted


def test_a_second_verifier_opening_a_new_database_waits_for_the_first(db_path: Path) -> None:
    """Two verifiers started at once on a new state file: while one holds the write lock (here a
    plain connection, briefly), the other must wait for it (the store's 30 s busy timeout)
    instead of failing with "database is locked"."""
    first = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    try:
        first.execute("BEGIN IMMEDIATE")
        first.execute("CREATE TABLE other_setup (x INTEGER)")
        release = threading.Timer(0.3, lambda: first.execute("COMMIT"))
        release.start()
        try:
            second = SqliteStore(db_path)
        finally:
            release.join()
        second.close()
    finally:
        first.close()


# -- devices, results and presence --------------------------------------------------------------


def test_sync_devices_adds_new_devices_and_updates_their_status(
    db_path: Path, store: SqliteStore
) -> None:
    store.sync_devices([record("dev-a", "revoked"), record("dev-c")])
    assert accept(store, "dev-c", nonce(1), 1, "c1") is Freshness.PERIODIC  # now known
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        status = dict(db.execute("SELECT device_id, status FROM devices").fetchall())
    assert status == {"dev-a": "revoked", "dev-b": "active", "dev-c": "active"}


def test_sync_devices_keeps_a_devices_freshness_state(store: SqliteStore) -> None:
    accept(store, "dev-a", nonce(1), 7, "e7")
    store.sync_devices([replace(record("dev-a"), status="revoked")])
    assert store.last_seq("dev-a") == 7


def test_a_saved_result_reads_back_and_is_replaced_by_the_next(store: SqliteStore) -> None:
    assert store.result("dev-a") is None
    store.save_result("dev-a", "affirming", b"\x00token-1\xff", NOW)
    first = store.result("dev-a")
    assert first is not None
    assert (first.device_id, first.status, first.token, first.at) == (
        "dev-a",
        "affirming",
        b"\x00token-1\xff",
        NOW,
    )
    store.save_result("dev-a", "contraindicated", b"token-2", NOW + 1)
    second = store.result("dev-a")
    assert second is not None
    assert (second.status, second.token, second.at) == ("contraindicated", b"token-2", NOW + 1)
    assert store.result("dev-b") is None


def test_online_devices_lists_those_last_reported_online(store: SqliteStore) -> None:
    assert store.online_devices() == []
    store.set_online("dev-a", True, NOW)
    store.set_online("dev-b", True, NOW)
    store.set_online("dev-b", False, NOW + 1)
    assert store.online_devices() == ["dev-a"]
    store.set_online("dev-z", True, NOW)  # an unknown device is not invented
    assert store.online_devices() == ["dev-a"]


def test_the_results_made_of_a_batchs_verdicts_are_saved_in_its_transaction(
    store: SqliteStore,
) -> None:
    items = [
        Candidate("dev-a", nonce(1), 1, token_hash("a1")),
        Candidate("dev-b", nonce(2), 1, token_hash("b1")),
        Candidate("dev-a", nonce(3), 1, token_hash("a1-again")),  # a replay: no result for it
    ]
    seen: list[list[Freshness]] = []

    def results(verdicts: list[Acceptance]) -> list[StoredResult]:
        seen.append([v.freshness for v in verdicts])
        return [
            StoredResult(item.device_id, "affirming", item.token_hash, NOW)
            for item, v in zip(items, verdicts, strict=True)
            if v.freshness is Freshness.PERIODIC
        ]

    store.accept_batch(items, NOW, results)
    assert seen == [[Freshness.PERIODIC, Freshness.PERIODIC, Freshness.REPLAY]]
    assert store.result("dev-a") == StoredResult("dev-a", "affirming", token_hash("a1"), NOW)
    assert store.result("dev-b") == StoredResult("dev-b", "affirming", token_hash("b1"), NOW)


def test_a_failure_making_the_results_records_nothing(store: SqliteStore) -> None:
    store.issue_nonce("dev-a", nonce(1), NOW + TTL)

    def results(verdicts: list[Acceptance]) -> list[StoredResult]:
        raise RuntimeError("signing failed")

    with pytest.raises(RuntimeError):
        store.accept_batch([Candidate("dev-a", nonce(1), 5, token_hash("e5"))], NOW, results)
    assert store.last_seq("dev-a") == 0 and store.result("dev-a") is None
    assert accept(store, "dev-a", nonce(1), 5, "e5") is Freshness.FRESH  # nonce and seq unused
