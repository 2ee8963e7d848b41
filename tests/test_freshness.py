"""The freshness rules on their own: rows in memory, the time passed in, no database."""

from __future__ import annotations

import pytest

from verifier.freshness import (
    SEQ_WINDOW,
    BatchState,
    Candidate,
    Challenge,
    DeviceWindow,
    Freshness,
    NotFresh,
    admit,
    decide,
)

NOW = 1_800_000_000.0
OURS = b"c" * 32  # a nonce the verifier issued to dev-a
OWN = b"o" * 32  # a device's own nonce


def _state(last_seq: int = 0, *, used: bool = False, expires: float = NOW + 60) -> BatchState:
    state = BatchState()
    state.devices["dev-a"] = DeviceWindow(last_seq, None, 1 if last_seq else 0)
    state.nonces[OURS] = Challenge("dev-a", used, expires)
    return state


def _item(seq: int, nonce: bytes = OWN, token: bytes = b"t", **kw: bool) -> Candidate:
    return Candidate("dev-a", nonce, seq, token, **kw)


def test_an_answer_to_our_outstanding_challenge_is_fresh_and_uses_the_nonce() -> None:
    state = _state()
    acceptance = decide(_item(1, OURS), state, NOW)
    assert (acceptance.freshness, acceptance.newest) == (Freshness.FRESH, True)
    assert state.nonces[OURS].used and state.used_nonces == [OURS]
    assert state.changed == {"dev-a"} and state.devices["dev-a"].last_seq == 1


def test_a_second_answer_to_one_challenge_in_the_same_batch_is_a_replay() -> None:
    state = _state()
    decide(_item(1, OURS), state, NOW)
    assert decide(_item(2, OURS, b"u"), state, NOW).freshness is Freshness.REPLAY


def test_an_answer_after_the_challenge_expired_is_expired_and_records_nothing() -> None:
    state = _state(expires=NOW - 0.001)
    assert decide(_item(1, OURS), state, NOW).freshness is Freshness.EXPIRED
    assert state.changed == set() and not state.nonces[OURS].used


def test_another_devices_challenge_is_no_challenge() -> None:
    state = _state()
    state.nonces[OURS] = Challenge("dev-b", False, NOW + 60)
    assert decide(_item(1, OURS), state, NOW).freshness is Freshness.PERIODIC
    assert decide(_item(2, OURS, require_fresh=True), state, NOW).newest is False


def test_a_key_request_without_a_challenge_records_nothing() -> None:
    state = _state()
    acceptance = decide(_item(5, require_fresh=True), state, NOW)
    assert (acceptance.freshness, acceptance.newest) == (Freshness.PERIODIC, False)
    assert state.changed == set() and state.devices["dev-a"].last_seq == 0


def test_the_same_token_again_is_a_duplicate_and_another_with_its_seq_a_replay() -> None:
    state = _state()
    decide(_item(3, token=b"e3"), state, NOW)
    assert decide(_item(3, token=b"e3"), state, NOW).freshness is Freshness.DUPLICATE
    assert decide(_item(3, token=b"forged"), state, NOW).freshness is Freshness.REPLAY


def test_an_unknown_device_is_a_replay() -> None:
    assert decide(Candidate("dev-x", OWN, 1, b"t"), _state(), NOW).freshness is Freshness.REPLAY


def test_late_evidence_within_the_window_is_accepted_once_but_not_newest() -> None:
    state = _state(last_seq=10)
    late = decide(_item(7), state, NOW)
    assert (late.freshness, late.newest) == (Freshness.PERIODIC, False)
    assert decide(_item(7, token=b"again"), state, NOW).freshness is Freshness.REPLAY
    assert state.devices["dev-a"].last_seq == 10


def test_a_redelivery_of_the_highest_after_a_late_one_is_still_a_duplicate() -> None:
    """Late evidence does not take the place of the highest: its redelivery stays benign."""
    state = _state()
    decide(_item(10, token=b"e10"), state, NOW)
    assert decide(_item(9, token=b"e9"), state, NOW).freshness is Freshness.PERIODIC
    assert decide(_item(10, token=b"e10"), state, NOW).freshness is Freshness.DUPLICATE
    assert state.devices["dev-a"].last_hash == b"e10"


def test_evidence_below_the_window_is_a_replay() -> None:
    state = _state(last_seq=SEQ_WINDOW + 5)
    assert decide(_item(5), state, NOW).freshness is Freshness.REPLAY
    assert decide(_item(6), state, NOW).freshness is Freshness.PERIODIC


def test_a_jump_past_the_window_keeps_only_the_new_number() -> None:
    window = DeviceWindow(3, b"x", 1)
    window.record(3 + 5 * SEQ_WINDOW, b"y")
    assert window.seen(3 + 5 * SEQ_WINDOW) and not window.seen(3)
    assert DeviceWindow.from_row(window.last_seq, b"y", window.window_bytes()) == DeviceWindow(
        window.last_seq, b"y", window.window
    )


def test_admit_ignores_duplicates_and_refuses_replays_and_unchallenged_key_requests() -> None:
    assert admit(Freshness.DUPLICATE, 3, require_fresh=False) is None
    assert admit(Freshness.PERIODIC, 3, require_fresh=False) is Freshness.PERIODIC
    assert admit(Freshness.FRESH, 3, require_fresh=True) is Freshness.FRESH
    with pytest.raises(NotFresh, match="replay evidence \\(sequence 3\\)"):
        admit(Freshness.REPLAY, 3, require_fresh=False)
    with pytest.raises(NotFresh, match="expired"):
        admit(Freshness.EXPIRED, 3, require_fresh=False)
    with pytest.raises(NotFresh, match="must answer an outstanding challenge"):
        admit(Freshness.PERIODIC, 3, require_fresh=True)
