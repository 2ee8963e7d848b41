"""The dashboard's ASGI app over a real fleet home (operator actions write its registry and audit
log): security headers, host check, the operator token, the JSON API and the update stream."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from provisioning.enroll import enroll_device
from provisioning.home import FleetHome, ensure_operator_token, read_operator_token
from provisioning.registry import Registry
from strongroom import topics
from strongroom.ear import AttestationResult, sign_result
from strongroom.errors import EnvironmentFault
from strongroom.signing import SigningKey
from verifier.audit import AuditLog
from verifier.dashboard.home_watch import HomeWatch
from verifier.dashboard.live import LiveView
from verifier.dashboard.view import FleetView
from verifier.dashboard.web import WebConfig, _updates, bearer_matches, create_app
from verifier.operator import audit_path, requests_dir, set_status

STATIC = Path(__file__).resolve().parent.parent / "verifier" / "dashboard" / "static"


def result_key(home: FleetHome) -> SigningKey:
    return SigningKey.from_pem((home.root / "verifier" / "result-signing.key").read_bytes())


@pytest.fixture
def live(fleet_home: FleetHome, tmp_path: Path) -> LiveView:
    enroll_device(fleet_home, "cam-1", tmp_path / "cam-1")
    result = AttestationResult(
        "cam-1", "affirming", {"hardware": 2}, (), "policy:v1", int(time.time()), {}
    )
    live = LiveView(FleetView(fleet_home.result_verify_key()))
    payload = sign_result(result, result_key(fleet_home))
    live.use(lambda v: v.apply(topics.device_topic("cam-1", topics.RESULT), payload, time.time()))
    live.use(lambda v: v.apply_registry({"cam-1": "active"}))
    return live


@pytest.fixture
def client(live: LiveView, fleet_home: FleetHome) -> TestClient:
    token = read_operator_token(fleet_home)
    config = WebConfig(home=fleet_home, token=token, allowed_hosts=("testserver",))
    return TestClient(create_app(live, config))


def bearer(home: FleetHome) -> dict[str, str]:
    return {"Authorization": f"Bearer {read_operator_token(home).decode()}"}


def audit_events(home: FleetHome) -> list[tuple[str, str, str]]:
    return [
        (e["event"], e["device"], e["detail"].get("by", ""))
        for e in AuditLog(audit_path(home)).entries()
    ]


# -- the page ------------------------------------------------------------------------------------


def test_every_response_carries_a_strict_content_security_policy(client: TestClient) -> None:
    for path in ("/", "/static/app.js", "/api/summary", "/api/nothing"):
        response = client.get(path)
        csp = response.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp, path
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["cache-control"] == "no-store"


def test_the_page_has_no_inline_script_or_style_and_loads_nothing_from_elsewhere(
    client: TestClient,
) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", html))
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), name
        assert "innerHTML" not in text and "eval(" not in text, name
    assert (
        client.get("/static/app.js")
        .headers["content-type"]
        .startswith(("text/javascript", "application/javascript"))
    )


def test_a_request_for_another_host_name_is_refused(client: TestClient) -> None:
    response = client.get("/api/summary", headers={"Host": "attacker.example"})
    assert response.status_code == 400


# -- reading ---------------------------------------------------------------------------------------


def test_the_api_serves_the_fleet_view(client: TestClient) -> None:
    summary = client.get("/api/summary").json()
    assert summary["total"] == 1 and summary["counts"]["affirming"] == 1
    page = client.get("/api/devices", params={"q": "cam", "sort": "device"}).json()
    assert [r["device"] for r in page["rows"]] == ["cam-1"]
    detail = client.get("/api/devices/cam-1").json()
    assert detail["result"]["status"] == "affirming" and detail["row"]["registry"] == "active"
    assert client.get("/api/devices/cam-9").status_code == 404
    assert client.get("/api/devices", params={"sort": "nope"}).status_code == 400
    assert client.get("/api/history").json()["categories"][0] == "affirming"
    assert client.get("/api/alerts").json() == {"alerts": []}


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda _token: b"garbage", id="garbage"),
        pytest.param(lambda token: token[:-7], id="truncated"),
        pytest.param(lambda token: token + b"garbage", id="trailing-garbage"),
        pytest.param(lambda _token: b"", id="cleared"),
    ],
)
def test_the_api_shows_a_device_unverified_after_anything_that_does_not_verify(
    live: LiveView, client: TestClient, fleet_home: FleetHome, spoil: Callable[[bytes], bytes]
) -> None:
    topic = topics.device_topic("cam-1", topics.RESULT)
    result = AttestationResult(
        "cam-1", "affirming", {"hardware": 2}, (), "policy:v1", int(time.time()) + 1, {}
    )
    genuine = sign_result(result, result_key(fleet_home))
    assert live.use(lambda v: v.apply(topic, genuine, time.time()))
    assert client.get("/api/summary").json()["counts"]["affirming"] == 1
    live.use(lambda v: v.apply(topic, spoil(genuine), time.time()))
    counts = client.get("/api/summary").json()["counts"]
    assert counts["unverified"] == 1 and counts["affirming"] == 0
    (row,) = client.get("/api/devices").json()["rows"]
    assert (row["status"], row["result"]) == ("unverified", "")
    assert client.get("/api/devices", params={"status": "affirming"}).json()["matched"] == 0
    detail = client.get("/api/devices/cam-1").json()
    assert detail["row"]["status"] == "unverified" and detail["unverified"]


def test_the_update_stream_sends_the_summary_and_what_changed(live: LiveView) -> None:
    config = WebConfig(home=None, token=b"x", update_interval_s=0.01)  # the stream needs no home

    async def first(n: int) -> list[str]:
        stream = _updates(live, config)
        out = [await anext(stream) for _ in range(n)]
        await stream.aclose()
        return out

    retry, update = asyncio.run(first(2))
    assert retry.startswith("retry:")
    event, data = update.strip().split("\n")
    assert event == "event: update"
    doc = json.loads(data.removeprefix("data: "))
    assert doc["summary"]["counts"]["affirming"] == 1 and doc["changed"] is None


# -- acting ----------------------------------------------------------------------------------------


def test_revoke_is_refused_without_the_operator_token(
    client: TestClient, fleet_home: FleetHome
) -> None:
    token = read_operator_token(fleet_home).decode()
    attempts = [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {token}"},
        {"Authorization": token},
    ]
    for headers in attempts:
        response = client.post("/api/devices/cam-1/revoke", headers=headers, json={"reason": "x"})
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
    in_url = client.post(f"/api/devices/cam-1/revoke?token={token}&access_token={token}")
    assert in_url.status_code == 401
    assert Registry(fleet_home.registry_dir).get("cam-1").status == "active"
    assert audit_events(fleet_home) == []


def test_revoke_reinstate_and_reattest_with_the_token_are_audited(
    client: TestClient, fleet_home: FleetHome
) -> None:
    headers = bearer(fleet_home)
    revoked = client.post("/api/devices/cam-1/revoke", headers=headers, json={"reason": "stolen"})
    assert revoked.status_code == 200
    assert revoked.json() == {"device": "cam-1", "status": "revoked", "changed": True}
    assert Registry(fleet_home.registry_dir).get("cam-1").status == "revoked"
    again = client.post("/api/devices/cam-1/revoke", headers=headers)
    assert again.json()["changed"] is False
    refused = client.post("/api/devices/cam-1/reattest", headers=headers)
    assert refused.status_code == 400 and "revoked" in refused.json()["error"]
    assert client.post("/api/devices/cam-1/reinstate", headers=headers).status_code == 200
    assert client.post("/api/devices/cam-1/reattest", headers=headers).status_code == 200
    assert (requests_dir(fleet_home) / "cam-1.json").exists()
    assert audit_events(fleet_home) == [
        ("revoked", "cam-1", "dashboard"),
        ("reinstated", "cam-1", "dashboard"),
        ("reattestation_requested", "cam-1", "dashboard"),
    ]
    entry = AuditLog(audit_path(fleet_home)).entries()[0]
    assert entry["detail"]["reason"] == "stolen"


def test_actions_on_unknown_devices_or_with_bad_bodies_are_refused(
    client: TestClient, fleet_home: FleetHome
) -> None:
    headers = bearer(fleet_home)
    assert client.post("/api/devices/cam-9/revoke", headers=headers).status_code == 404
    assert client.post("/api/devices/..%2Fx/revoke", headers=headers).status_code == 404
    assert client.post("/api/devices/cam-1/explode", headers=headers).status_code == 404
    big = client.post("/api/devices/cam-1/revoke", headers=headers, content=b"x" * 10_000)
    assert big.status_code == 400
    assert client.post("/api/devices/cam-1/revoke", headers=headers, json=[1]).status_code == 400
    assert client.get("/api/devices/cam-1/revoke", headers=headers).status_code == 405
    assert audit_events(fleet_home) == []


def test_the_token_check_endpoint(client: TestClient, fleet_home: FleetHome) -> None:
    assert client.get("/api/operator").status_code == 401
    assert client.get("/api/operator", headers=bearer(fleet_home)).status_code == 204


def test_bearer_matching() -> None:
    assert bearer_matches("Bearer abc", b"abc") and bearer_matches("bearer  abc ", b"abc")
    for header in (None, "", "Bearer", "Bearer abd", "Bearer abcd", "Basic abc", "abc"):
        assert not bearer_matches(header, b"abc"), header
    assert not bearer_matches("Bearer ", b"")


# -- the token file --------------------------------------------------------------------------------


def test_fleet_init_writes_a_private_random_operator_token(
    fleet_home: FleetHome, other_fleet_home: FleetHome
) -> None:
    path = fleet_home.operator_token_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(read_operator_token(fleet_home)) >= 32
    assert read_operator_token(fleet_home) != read_operator_token(other_fleet_home)


def test_an_older_home_gets_a_token_and_a_readable_one_is_refused(fleet_home: FleetHome) -> None:
    fleet_home.operator_token_path.unlink()
    assert ensure_operator_token(fleet_home) is True
    assert ensure_operator_token(fleet_home) is False
    os.chmod(fleet_home.operator_token_path, 0o644)
    with pytest.raises(EnvironmentFault, match="readable by other users"):
        read_operator_token(fleet_home)


# -- what the dashboard reads from the home --------------------------------------------------------


def test_the_home_watch_reads_registry_changes_and_each_audit_entry_once(
    live: LiveView, fleet_home: FleetHome
) -> None:
    watch = HomeWatch(fleet_home)
    assert watch.registry_statuses() == {"cam-1": "active"}
    assert watch.registry_statuses() is None  # unchanged
    assert watch.audit_entries() == ([], False)
    set_status(fleet_home, "cam-1", "revoked", reason="lost", by="operator")
    assert watch.registry_statuses() == {"cam-1": "revoked"}
    entries, more = watch.audit_entries()
    assert [e["event"] for e in entries] == ["revoked"] and not more
    with audit_path(fleet_home).open("a") as f:
        f.write('{"event": "key_rel')  # an entry still being written
    assert watch.audit_entries() == ([], False)
    assert watch.lease_s() == 3600
