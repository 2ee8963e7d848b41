"""The audit log: hash-chained, signed, append-only; `audit verify` finds the first broken entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from strongroom.signing import SigningKey
from verifier.audit import AuditLog, _hash, verify


@pytest.fixture
def log(tmp_path: Path) -> tuple[AuditLog, SigningKey]:
    key = SigningKey.generate()
    audit = AuditLog(tmp_path / "audit.log", key)
    for i in range(5):
        audit.append("key_released", f"dev-{i}", key_id=f"k{i}")
    return audit, key


def _lines(audit: AuditLog) -> list[str]:
    return list(audit.lines())


def test_an_intact_chain_verifies(log: tuple[AuditLog, SigningKey]) -> None:
    audit, key = log
    assert verify(_lines(audit), key.verify_key) == (5, None)
    assert [e["seq"] for e in audit.entries()] == [1, 2, 3, 4, 5]


def test_an_edited_entry_is_found(log: tuple[AuditLog, SigningKey]) -> None:
    audit, key = log
    lines = _lines(audit)
    entry = json.loads(lines[2])
    entry["detail"]["key_id"] = "other"
    lines[2] = json.dumps(entry)
    count, broken = verify(lines, key.verify_key)
    assert count == 2 and broken is not None and broken.line == 3 and "edited" in broken.reason


def test_an_edited_entry_with_a_recomputed_hash_fails_the_signature(
    log: tuple[AuditLog, SigningKey],
) -> None:
    audit, key = log
    lines = _lines(audit)
    entry = json.loads(lines[1])
    entry["device"] = "someone-else"
    entry["hash"] = _hash(entry)
    lines[1] = json.dumps(entry)
    _count, broken = verify(lines, key.verify_key)
    assert broken is not None and broken.line == 2  # either the signature or the next link


@pytest.mark.parametrize(
    "change",
    [
        lambda lines: lines[:1] + lines[2:],  # deleted
        lambda lines: [lines[0], lines[2], lines[1], *lines[3:]],  # reordered
        lambda lines: [*lines[:3], lines[2], *lines[3:]],  # duplicated
    ],
    ids=["deleted", "reordered", "duplicated"],
)
def test_deleted_reordered_or_duplicated_entries_are_found(
    log: tuple[AuditLog, SigningKey], change: object
) -> None:
    audit, key = log
    lines = change(_lines(audit))  # type: ignore[operator]
    count, broken = verify(lines, key.verify_key)
    assert broken is not None and broken.line in (2, 3, 4) and count < 5


def test_a_log_signed_by_another_key_does_not_verify(log: tuple[AuditLog, SigningKey]) -> None:
    audit, _key = log
    _count, broken = verify(_lines(audit), SigningKey.generate().verify_key)
    assert broken is not None and broken.line == 1


def test_appends_continue_the_chain_across_instances(log: tuple[AuditLog, SigningKey]) -> None:
    audit, key = log
    again = AuditLog(audit.path, key)
    again.append("revoked", "dev-9", reason="test")
    assert verify(_lines(again), key.verify_key) == (6, None)
    assert audit.path.stat().st_mode & 0o777 == 0o600
