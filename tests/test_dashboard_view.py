"""The dashboard's fleet view and its queries (pure): what it believes, how it counts, searches,
sorts and pages."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strongroom import messages, topics
from strongroom.ear import AttestationResult, sign_result
from strongroom.errors import InputError
from strongroom.signing import SigningKey
from verifier.dashboard import queries as fq
from verifier.dashboard.queries import Query
from verifier.dashboard.view import CATEGORIES, FleetView, categorize

KEY = SigningKey.generate()
FORGER = SigningKey.generate()
NOW = float(int(time.time()))
MR = bytes(range(32)).hex()


def token(
    device_id: str,
    status: str = "affirming",
    *,
    iat: float = NOW,
    reasons: tuple[str, ...] = (),
    key: SigningKey = KEY,
    **details: Any,
) -> bytes:
    vector = {"hardware": 96} if status == "contraindicated" else {"hardware": 2}
    details = {
        "firmware": "1.2.0",
        "svn": 1,
        "mrenclave": MR,
        "artifacts": {"scorer": 1},
        "seq": 1,
        "freshness": "fresh",
        **details,
    }
    result = AttestationResult(device_id, status, vector, reasons, "policy:v1", int(iat), details)
    return sign_result(result, key)


def result_topic(device_id: str) -> str:
    return topics.device_topic(device_id, topics.RESULT)


def status_topic(device_id: str) -> str:
    return topics.device_topic(device_id, topics.STATUS)


def fresh_view() -> FleetView:
    return FleetView(KEY.verify_key)


def the_row(view: FleetView, device_id: str) -> fq.Row:
    return fq.row(view.devices[device_id])


def counted(view: FleetView) -> dict[str, int]:
    return {k: v for k, v in view.counts.items() if v}


# -- what the view believes ----------------------------------------------------------------------


def test_a_verified_result_is_shown_with_its_claims() -> None:
    view = fresh_view()
    assert view.apply(result_topic("cam-1"), token("cam-1"), NOW)
    row = the_row(view, "cam-1")
    assert row.status == row.result == "affirming"
    assert (row.firmware, row.svn, row.measurement) == ("1.2.0", 1, MR)
    assert row.artifacts == (("scorer", 1),)
    assert row.to_json_dict(NOW + 30)["evidence_age_s"] == 30
    assert counted(view) == {"affirming": 1}


def test_a_result_signed_with_another_key_is_unverified_and_nothing_of_it_is_shown() -> None:
    view = fresh_view()
    view.apply(result_topic("cam-1"), token("cam-1", key=FORGER), NOW)
    row = the_row(view, "cam-1")
    assert row.status == "unverified" and row.result == ""
    assert row.firmware == "" and row.measurement == "" and row.artifacts == ()
    assert row.reasons[0].startswith("unverified result:") and "signature" in row.reasons[0]
    doc = fq.detail(view, "cam-1", NOW)
    assert doc is not None and doc["result"] is None and doc["unverified"]
    assert counted(view) == {"unverified": 1}


@pytest.mark.parametrize("payload", [b"garbage", b"\xd2\x84", bytes(70_000)])
def test_garbage_on_a_result_topic_is_unverified(payload: bytes) -> None:
    view = fresh_view()
    view.apply(result_topic("cam-1"), payload, NOW)
    assert the_row(view, "cam-1").status == "unverified"


GENUINE = token("cam-1")
NOT_A_RESULT = {
    "garbage": b"garbage",
    "truncated": GENUINE[:-7],
    "trailing-garbage": GENUINE + b"garbage",
    "cleared": b"",  # an empty retained message: the MQTT way to withdraw a retained result
}


@pytest.mark.parametrize("payload", NOT_A_RESULT.values(), ids=NOT_A_RESULT.keys())
def test_whatever_follows_a_trusted_result_if_it_does_not_verify_the_device_is_unverified(
    payload: bytes,
) -> None:
    view = fresh_view()
    view.apply(result_topic("cam-1"), GENUINE, NOW)
    view.record_history(NOW)
    assert view.apply(result_topic("cam-1"), payload, NOW + 1)
    view.record_history(NOW + 5)
    row = the_row(view, "cam-1")
    assert row.status == "unverified" and row.result == ""  # nothing says "affirming" any more
    assert row.reasons[0].startswith("unverified result:")
    assert counted(view) == {"unverified": 1}
    assert fq.summary(view, NOW)["counts"]["affirming"] == 0
    assert fq.history(view)["samples"][-1][1][CATEGORIES.index("unverified")] == 1
    doc = json.loads(json.dumps(fq.snapshot(view, NOW)))
    assert [(r["status"], r["result"]) for r in doc["devices"]] == [("unverified", "")]
    assert (doc["summary"]["counts"]["unverified"], doc["summary"]["counts"]["affirming"]) == (1, 0)
    detail = fq.detail(view, "cam-1", NOW)
    assert detail is not None and detail["unverified"] and detail["row"]["status"] == "unverified"


@pytest.mark.parametrize("payload", NOT_A_RESULT.values(), ids=NOT_A_RESULT.keys())
def test_only_a_genuine_result_at_least_as_new_ends_the_doubt(payload: bytes) -> None:
    view = fresh_view()
    view.apply(result_topic("cam-1"), GENUINE, NOW)
    view.apply(result_topic("cam-1"), payload, NOW)
    assert not view.apply(result_topic("cam-1"), token("cam-1", iat=NOW - 60), NOW)
    assert the_row(view, "cam-1").status == "unverified"  # an older genuine result is a replay
    assert view.apply(result_topic("cam-1"), GENUINE, NOW)  # the verifier's latest, again
    assert the_row(view, "cam-1").status == "affirming"


def test_a_result_the_parser_chokes_on_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    view = fresh_view()
    view.apply(result_topic("cam-1"), GENUINE, NOW)

    def choke(_payload: bytes, _key: object) -> None:
        raise TypeError("a bug in parsing")

    monkeypatch.setattr("verifier.dashboard.view.verify_result", choke)
    assert view.apply(result_topic("cam-1"), GENUINE, NOW)  # raises nothing
    row = the_row(view, "cam-1")
    assert row.status == "unverified" and "TypeError" in row.reasons[0]


def test_a_forgery_hides_the_trusted_status_until_the_verifier_speaks_again() -> None:
    view = fresh_view()
    view.apply(result_topic("cam-1"), token("cam-1", "contraindicated"), NOW)
    view.apply(result_topic("cam-1"), token("cam-1", "affirming", iat=NOW + 5, key=FORGER), NOW)
    assert the_row(view, "cam-1").status == "unverified"
    doc = fq.detail(view, "cam-1", NOW)
    assert doc is not None and doc["result"]["status"] == "contraindicated"  # the last verified
    view.apply(result_topic("cam-1"), token("cam-1", "affirming", iat=NOW + 9), NOW)
    assert the_row(view, "cam-1").status == "affirming"
    assert counted(view) == {"affirming": 1}


def test_a_genuine_result_of_another_device_is_not_believed_on_this_topic() -> None:
    view = fresh_view()
    view.apply(result_topic("cam-2"), token("cam-1"), NOW)
    row = the_row(view, "cam-2")
    assert row.status == "unverified" and "another device" in row.reasons[0]


def test_an_older_result_does_not_replace_a_newer_one() -> None:
    view = fresh_view()
    view.apply(result_topic("cam-1"), token("cam-1", "contraindicated", iat=NOW), NOW)
    assert not view.apply(result_topic("cam-1"), token("cam-1", iat=NOW - 60), NOW)
    assert the_row(view, "cam-1").status == "contraindicated"


def test_the_retained_copy_again_changes_nothing() -> None:
    view = fresh_view()
    payload = token("cam-1")
    view.apply(result_topic("cam-1"), payload, NOW)
    version = view.version
    assert not view.apply(result_topic("cam-1"), payload, NOW + 1)
    assert view.version == version
    assert len(view.devices["cam-1"].timeline) == 1


def test_a_stale_result_counts_as_stale_and_keeps_the_last_evidence() -> None:
    view = fresh_view()
    view.apply(result_topic("cam-1"), token("cam-1", iat=NOW - 900), NOW)
    stale_only = sign_result(
        AttestationResult(
            "cam-1",
            "none",
            {},
            ("stale: no evidence",),
            "policy:v1",
            int(NOW),
            {"freshness": "stale"},
        ),
        KEY,
    )
    view.apply(result_topic("cam-1"), stale_only, NOW)
    row = the_row(view, "cam-1")
    assert row.status == "stale" and row.result == "none"
    assert row.firmware == "1.2.0"  # from the last appraised evidence
    assert row.to_json_dict(NOW)["evidence_age_s"] == 900
    other = fresh_view()  # a "none" result that is not stale is merely pending
    other.apply(result_topic("cam-9"), token("cam-9", "none"), NOW)
    assert the_row(other, "cam-9").status == "pending"


def test_connection_states_and_which_status_wins() -> None:
    view = fresh_view()
    view.apply(result_topic("cam-1"), token("cam-1"), NOW)
    view.apply(status_topic("cam-1"), messages.Status("offline", 0).encode(), NOW + 3)
    assert the_row(view, "cam-1").status == "offline"
    assert view.devices["cam-1"].connection_at == NOW + 3  # a last will carries no time
    view.apply(status_topic("cam-1"), messages.Status("online", NOW + 4).encode(), NOW + 4)
    assert the_row(view, "cam-1").status == "affirming"
    view.apply_registry({"cam-1": "revoked"})  # an operator revoked it
    assert the_row(view, "cam-1").status == "revoked"
    view.apply(result_topic("cam-1"), token("cam-1", "contraindicated", iat=NOW + 5), NOW)
    assert the_row(view, "cam-1").status == "contraindicated"  # its trust status says more


def test_the_registry_decides_revocation_over_a_retained_revoked_status() -> None:
    view = fresh_view()
    view.apply(result_topic("cam-1"), token("cam-1"), NOW)
    view.apply(status_topic("cam-1"), messages.Status("revoked", NOW).encode(), NOW)
    assert the_row(view, "cam-1").status == "revoked"  # no registry known: the device said so
    view.apply_registry({"cam-1": "active"})  # reinstated since
    assert the_row(view, "cam-1").status == "affirming"


def test_enrolled_devices_without_results_are_pending_and_leave_with_the_registry() -> None:
    view = fresh_view()
    view.apply_registry({"cam-1": "active", "cam-2": "active"})
    assert counted(view) == {"pending": 2}
    view.apply_registry({"cam-1": "active"})
    assert view.devices["cam-2"].registry == ""


def test_audit_entries_give_lease_ends_and_operator_actions() -> None:
    view = fresh_view()
    view.apply(result_topic("cam-1"), token("cam-1"), NOW)
    entries = [
        {"event": "key_released", "device": "cam-1", "at": NOW - 10, "detail": {"key_id": "k"}},
        {"event": "revoked", "device": "cam-1", "at": NOW, "detail": {"by": "dashboard"}},
        {"event": "nonsense", "device": "../x", "at": "soon"},
    ]
    view.apply_audit(entries[:1], lease_s=3600)
    assert the_row(view, "cam-1").lease_until == NOW - 10 + 3600
    view.apply_audit(entries[1:], lease_s=3600)
    assert the_row(view, "cam-1").lease_until is None
    doc = fq.detail(view, "cam-1", NOW)
    assert doc is not None and doc["audit"][0]["text"] == "by: dashboard"
    assert set(view.devices) == {"cam-1"}


def test_alerts_are_kept_newest_first_and_malformed_ones_are_ignored() -> None:
    view = fresh_view()
    for i in range(3):
        view.apply(
            topics.ALERTS, messages.Alert("warning", f"cam-{i}", "<b>x</b>", NOW).encode(), NOW
        )
    assert not view.apply(topics.ALERTS, b"\x00", NOW)
    alerts = fq.recent_alerts(view, 2)
    assert [a["device"] for a in alerts] == ["cam-2", "cam-1"]
    assert alerts[0]["reason"] == "<b>x</b>"  # text, escaped by whoever displays it
    assert view.ignored == 1


def test_history_records_changes_and_merges_bursts() -> None:
    view = fresh_view()
    view.apply_registry({"cam-1": "active"})
    view.record_history(NOW)
    view.record_history(NOW + 10)  # nothing changed
    view.apply(result_topic("cam-1"), token("cam-1"), NOW)
    view.record_history(NOW + 20)
    view.apply(result_topic("cam-1"), token("cam-1", "warning", iat=NOW + 1), NOW)
    view.record_history(NOW + 20.5)  # within a second of the last sample: replaces it
    samples = fq.history(view)["samples"]
    warning = CATEGORIES.index("warning")
    assert [s[0] for s in samples] == [NOW, NOW + 20.5]
    assert samples[-1][1][warning] == 1


# -- counting, searching, sorting, paging ----------------------------------------------------------


OPS = st.lists(
    st.tuples(
        st.sampled_from(["cam-1", "cam-2", "cam-3"]),
        st.sampled_from(
            [
                "affirming",
                "warning",
                "contraindicated",
                "forged",
                "online",
                "offline",
                "revoked-status",
                "active",
                "revoked",
            ]
        ),
    ),
    max_size=20,
)
TOKENS = {
    (d, s): token(d, s, iat=NOW + i)
    for i, (d, s) in enumerate(
        (d, s)
        for d in ("cam-1", "cam-2", "cam-3")
        for s in ("affirming", "warning", "contraindicated")
    )
}


@settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(OPS)
def test_counts_always_match_the_devices(ops: list[tuple[str, str]]) -> None:
    view = fresh_view()
    registry: dict[str, str] = {}
    for device, op in ops:
        if op in ("affirming", "warning", "contraindicated"):
            view.apply(result_topic(device), TOKENS[(device, op)], NOW)
        elif op == "forged":
            view.apply(result_topic(device), b"forged", NOW)
        elif op in ("online", "offline"):
            view.apply(status_topic(device), messages.Status(op, NOW).encode(), NOW)
        elif op == "revoked-status":
            view.apply(status_topic(device), messages.Status("revoked", NOW).encode(), NOW)
        else:
            registry[device] = op
            view.apply_registry(registry)
        expected = Counter(categorize(d) for d in view.devices.values())
        assert counted(view) == dict(expected)
        assert sum(view.counts.values()) == len(view.devices)


def small_fleet() -> FleetView:
    view = fresh_view()
    view.apply(result_topic("cam-a"), token("cam-a", iat=NOW - 50, firmware="1.10.0"), NOW)
    view.apply(
        result_topic("cam-b"),
        token(
            "cam-b",
            "contraindicated",
            iat=NOW - 5,
            reasons=("firmware 1.0.0 is below",),
            firmware="1.0.0",
            svn=2,
        ),
        NOW,
    )
    view.apply(
        result_topic("cam-c"), token("cam-c", "warning", iat=NOW - 20, firmware="1.9.1"), NOW
    )
    view.apply_registry(
        {"cam-a": "active", "cam-b": "revoked", "cam-c": "active", "cam-d": "active"}
    )
    view.apply_audit([{"event": "key_released", "device": "cam-a", "at": NOW, "detail": {}}], 60)
    return view


def ids(page: fq.Page) -> list[str]:
    return [r.device_id for r in page.rows]


def test_search_matches_ids_firmware_and_reasons() -> None:
    view = small_fleet()
    assert ids(fq.query(view, Query(search="CAM-B"))) == ["cam-b"]
    assert ids(fq.query(view, Query(search="below"))) == ["cam-b"]
    assert ids(fq.query(view, Query(search="1.9.1"))) == ["cam-c"]
    assert fq.query(view, Query(search="nothing")).matched == 0


def test_filter_by_status() -> None:
    view = small_fleet()
    assert ids(fq.query(view, Query(status="pending"))) == ["cam-d"]
    page = fq.query(view, Query(status="affirming"))
    assert ids(page) == ["cam-a"] and page.total == 4 and page.matched == 1


def test_sorting_puts_unknown_values_last_either_way() -> None:
    view = small_fleet()
    assert ids(fq.query(view, Query(sort="status"))) == ["cam-b", "cam-c", "cam-a", "cam-d"]
    assert ids(fq.query(view, Query(sort="firmware"))) == ["cam-b", "cam-c", "cam-a", "cam-d"]
    assert ids(fq.query(view, Query(sort="firmware", descending=True))) == [
        "cam-a",
        "cam-c",
        "cam-b",
        "cam-d",
    ]
    assert ids(fq.query(view, Query(sort="age"))) == ["cam-b", "cam-c", "cam-a", "cam-d"]
    assert ids(fq.query(view, Query(sort="lease"))) == ["cam-a", "cam-b", "cam-c", "cam-d"]
    assert ids(fq.query(view, Query(sort="device", descending=True)))[0] == "cam-d"


def test_thousands_of_devices_page_quickly() -> None:
    view = fresh_view()
    for i in range(3000):
        device = f"dev-{i:04d}"
        status = "contraindicated" if i % 100 == 0 else "affirming"
        view.apply(result_topic(device), token(device, status, seq=i), NOW)
    started = time.process_time()  # this process's CPU time: what other processes do is not counted
    page = fq.query(view, Query(sort="status", offset=0, limit=50))
    last = fq.query(view, Query(sort="device", offset=2950, limit=100))
    elapsed = time.process_time() - started
    assert page.matched == 3000 and len(page.rows) == 50
    assert {r.status for r in page.rows[:30]} == {"contraindicated"}
    assert len(last.rows) == 50 and last.rows[-1].device_id == "dev-2999"
    assert counted(view) == {"affirming": 2970, "contraindicated": 30}
    assert elapsed < 2.0, elapsed  # two pages of 3,000 devices take about 0.1 s of CPU


@pytest.mark.parametrize(
    "params",
    [
        {"status": "bogus"},
        {"sort": "secret"},
        {"limit": "0"},
        {"limit": "501"},
        {"offset": "-1"},
        {"offset": "x"},
    ],
)
def test_bad_query_parameters_are_refused(params: dict[str, str]) -> None:
    with pytest.raises(InputError):
        Query.from_params(params)


def test_query_parameters_are_read() -> None:
    q = Query.from_params(
        {"q": "cam", "status": "warning", "sort": "age", "desc": "1", "offset": "50", "limit": "25"}
    )
    assert q == Query("cam", "warning", "age", True, 50, 25)


def test_the_snapshot_is_plain_json() -> None:
    view = small_fleet()
    doc = json.loads(json.dumps(fq.snapshot(view, NOW)))
    assert doc["summary"]["total"] == 4
    assert [d["device"] for d in doc["devices"]] == ["cam-a", "cam-b", "cam-c", "cam-d"]
    detail = fq.detail(view, "cam-b", NOW)
    assert detail is not None
    json.dumps(detail)
    assert [c["claim"] for c in detail["result"]["vector"]][4] == "hardware"
    assert detail["result"]["vector"][4]["tier"] == "contraindicated"
