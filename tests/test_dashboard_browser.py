"""The dashboard end to end: a real fleet (Mosquitto with TLS and ACLs, the verifier, agents), the
`strongroom dashboard` process, and the page in headless Chromium driven by Playwright.

The tests share one fleet and one page, and each leaves the fleet in a state the next ones can
work with: cam-1 (firmware 1.3.0) and cam-2 (1.1.0) start affirming, cam-3 is enrolled but never
starts; the policy's minimum firmware is then raised so cam-2 turns contraindicated on
re-attestation; cam-1 is revoked by the operator; a forged result makes cam-2 unverified.

Screenshots land in `out/test-artifacts/` (printed); with STRONGROOM_UPDATE_SCREENSHOT=1 the
overview also replaces docs/dashboard.png.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, expect, sync_playwright

from provisioning.registry import Registry
from strongroom import topics
from strongroom.ear import AttestationResult, sign_result
from strongroom.signing import SigningKey
from tests.conftest import RunCli
from tests.fleet import Fleet, Proc, cli, free_port, verifier_client, wait_until
from verifier.audit import AuditLog
from verifier.operator import audit_path
from verifier.service import verifier_db_path
from verifier.store_sqlite import SqliteStore

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "out" / "test-artifacts"
LIVE_S = 30_000  # ms: the longest a live change may take to show (appraisal, then the push)


def chromium() -> str:
    found = shutil.which("chromium") or (
        "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None
    )
    if found is None:
        if os.environ.get("CI"):
            raise AssertionError("chromium is missing; scripts/ensure-chromium.sh installs it")
        pytest.skip("chromium is not installed (make test installs it)")
    return found


@dataclass
class Site:
    fleet: Fleet
    url: str
    token: str
    dashboard: Proc
    page: Page

    def api(self, path: str) -> dict[str, object]:
        with urllib.request.urlopen(self.url + path, timeout=5) as response:  # noqa: S310 - ours
            doc: dict[str, object] = json.loads(response.read())
        return doc


def _serving(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "api/summary", timeout=1) as response:  # noqa: S310
            return bool(json.loads(response.read())["connected"])
    except (OSError, urllib.error.URLError, ValueError, KeyError):
        return False


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    executable = chromium()
    fleet = Fleet(tmp_path_factory.mktemp("dashboard"))
    dashboard: Proc | None = None
    pw = browser = None
    try:
        fleet.start()
        fleet.enroll("cam-1", firmware="1.3.0")
        fleet.enroll("cam-2", firmware="1.1.0")
        fleet.enroll("cam-3")  # never started: no result yet
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        dashboard = Proc(
            cli(
                "dashboard",
                "--home",
                str(fleet.home.root),
                "--broker",
                fleet.broker.url,
                "--port",
                str(port),
            ),
            fleet.root / "dashboard.log",
        )
        fleet.agent("cam-1")
        fleet.agent("cam-2")
        wait_until(lambda: _serving(url), 20, "the dashboard")
        fleet.observer.wait_result("cam-1", "affirming")
        fleet.observer.wait_result("cam-2", "affirming")
        pw = sync_playwright().start()
        browser = pw.chromium.launch(executable_path=executable, headless=True)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.set_default_timeout(10_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(url)
        token = fleet.home.operator_token_path.read_text().strip()
        yield Site(fleet, url, token, dashboard, page)
        assert errors == [], errors  # no script error, no CSP violation
    finally:
        if browser is not None:
            browser.close()
        if pw is not None:
            pw.stop()
        if dashboard is not None:
            assert dashboard.stop() == 0, dashboard.log()
            log = dashboard.log()
            assert "operator-token" in log  # says where the token is ...
            token_text = fleet.home.operator_token_path.read_text().strip()
            assert token_text not in log  # ... never what it is
        fleet.stop()


def save(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


def count(page: Page, category: str) -> Locator:
    return page.locator(f"#summary [data-cat={category}] .count")


def status_chip(page: Page, device_id: str) -> Locator:
    return page.locator(f"#devices tr[data-device={device_id}] .chip")


def open_device(page: Page, device_id: str) -> None:
    page.locator(f"#devices tr[data-device={device_id}]").click()
    expect(page.locator("#device-dialog")).to_be_visible()
    expect(page.locator("#detail-title")).to_contain_text(device_id)


def act(site: Site, action: str, reason: str = "") -> None:
    """Press an action in the open device view, signing in if asked, and confirm it."""
    page = site.page
    page.locator(f"#device-dialog [data-action={action}]").click()
    confirm = page.locator("#confirm-dialog")
    token_dialog = page.locator("#token-dialog")
    expect(page.locator("#confirm-dialog[open], #token-dialog[open]")).to_be_visible()
    if token_dialog.is_visible():
        page.locator("#token-input").fill(site.token)
        page.locator("#token-ok").click()
    expect(confirm).to_be_visible()
    if reason:
        page.locator("#reason-input").fill(reason)
    page.locator("#confirm-ok").click()
    expect(confirm).to_be_hidden()


def close_device(page: Page) -> None:
    page.locator("#detail-close").click()
    expect(page.locator("#device-dialog")).to_be_hidden()


def test_the_page_counts_the_fleet_and_shows_a_device_turn_contraindicated_live(
    site: Site,
) -> None:
    page = site.page
    expect(count(page, "affirming")).to_have_text("2")
    expect(count(page, "pending")).to_have_text("1")
    expect(count(page, "contraindicated")).to_have_text("0")
    page.evaluate("window.loadedOnce = true")

    site.fleet.set_policy('min_firmware = "1.0.0"', 'min_firmware = "1.2.0"')
    open_device(page, "cam-2")
    act(site, "reattest")  # the verifier challenges it; fresh evidence meets the new minimum

    expect(status_chip(page, "cam-2")).to_have_text("Contraindicated", timeout=LIVE_S)
    expect(count(page, "contraindicated")).to_have_text("1")
    expect(count(page, "affirming")).to_have_text("1")
    reasons = page.locator("#detail-reasons")
    expect(reasons).to_contain_text("firmware 1.1.0 is below the fleet minimum 1.2.0")
    expect(page.locator("#detail-vector tr[data-claim=hardware]")).to_contain_text("96")
    assert page.evaluate("window.loadedOnce") is True  # the page was not reloaded
    expect(page.locator("#alerts")).to_contain_text("revoked: firmware 1.1.0")
    save(page, "dashboard-device.png")
    close_device(page)
    expect(page.locator("#chart path").first).to_be_visible()
    page.locator("#toast").evaluate("toast => { toast.hidden = true; }")  # a clean picture
    overview = save(page, "dashboard.png")
    if os.environ.get("STRONGROOM_UPDATE_SCREENSHOT"):
        shutil.copy(overview, REPO / "docs" / "dashboard.png")
    events = [
        (e["event"], e["device"], e["detail"].get("by"))
        for e in AuditLog(audit_path(site.fleet.home)).entries()
    ]
    assert ("reattestation_requested", "cam-2", "dashboard") in events


def test_revoke_is_refused_without_the_operator_token_and_works_with_it(site: Site) -> None:
    page = site.page
    endpoint = site.url + "api/devices/cam-1/revoke"
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        refused = page.request.post(endpoint, headers=headers, data={"reason": "x"})
        assert refused.status == 401
    registry = Registry(site.fleet.home.registry_dir)
    assert registry.get("cam-1").status == "active"

    open_device(page, "cam-1")
    act(site, "revoke", reason="reported stolen")
    expect(status_chip(page, "cam-1")).to_have_text("Revoked", timeout=LIVE_S)
    expect(page.locator("#detail-audit")).to_contain_text("by: dashboard")
    close_device(page)
    assert registry.get("cam-1").status == "revoked"
    revoked = [
        e for e in AuditLog(audit_path(site.fleet.home)).entries() if e["event"] == "revoked"
    ]
    assert revoked[-1]["device"] == "cam-1"
    assert revoked[-1]["detail"] == {"by": "dashboard", "reason": "reported stolen"}
    wait_until(lambda: "revoked" in site.fleet.observer.states("cam-1"), 20, "the enclave's wipe")


def test_status_json_matches_the_verifier_state(site: Site, run_cli: RunCli) -> None:
    home = site.fleet.home
    store = SqliteStore(verifier_db_path(home))
    try:
        wait_until(
            lambda: all(store.result(d) for d in ("cam-1", "cam-2")), 10, "the stored results"
        )
        stored = {d: store.result(d) for d in ("cam-1", "cam-2", "cam-3")}
    finally:
        store.close()
    expected = {d: r.status if r else "" for d, r in stored.items()}
    code, out, err = run_cli(
        ["status", "--home", home.root, "--broker", site.fleet.broker.url, "--json"]
    )
    assert code == 0, err
    doc = json.loads(out)
    rows = {r["device"]: r for r in doc["devices"]}
    registry = Registry(home.registry_dir)
    assert set(rows) == set(registry.device_ids()) == {"cam-1", "cam-2", "cam-3"}
    for device_id, row in rows.items():
        assert row["result"] == expected[device_id], device_id
        assert row["registry"] == registry.get(device_id).status
    assert rows["cam-2"]["status"] == "contraindicated"
    assert rows["cam-3"]["status"] == "pending" and expected["cam-3"] == ""
    assert any("below the fleet minimum" in r for r in rows["cam-2"]["reasons"])
    assert doc["summary"]["counts"] == site.api("api/summary")["counts"]


def test_a_forged_result_is_shown_as_unverified(site: Site) -> None:
    home = site.fleet.home
    forger = verifier_client(home, site.fleet.broker.port)  # the wrong signing key
    try:
        forged = AttestationResult(
            "cam-2", "affirming", {"hardware": 2}, (), "policy:v99", 2_000_000_000, {}
        )
        topic = topics.device_topic("cam-2", topics.RESULT)
        forger.publish(topic, sign_result(forged, SigningKey.generate()), retain=True)
    finally:
        forger.stop()
    page = site.page
    expect(status_chip(page, "cam-2")).to_have_text("Unverified", timeout=LIVE_S)
    expect(count(page, "unverified")).to_have_text("1")
    expect(count(page, "affirming")).to_have_text("0")
    open_device(page, "cam-2")
    expect(page.locator("#unverified-banner")).to_contain_text("does not verify")
    save(page, "dashboard-unverified.png")
    close_device(page)
