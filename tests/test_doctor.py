"""`strongroom doctor`: a healthy device and fleet are all ok (exit 0); each fault is the right
error finding (exit 1), with what to do; `--home` on a device install is one line."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
from pathlib import Path
from typing import Any

import pytest

from agent.lock import AgentLock
from provisioning import ca
from provisioning.enroll import enroll_device
from provisioning.home import FleetHome, init_home
from strongroom import cli
from strongroom.fsutil import PUBLIC_FILE, SECRET_FILE, write_atomic
from tests.fleet import Broker
from verifier.operator import REVOKED, set_status

from .conftest import RunCli


def _enroll(home: FleetHome, device_id: str, out: Path) -> Path:
    enroll_device(home, device_id, out)
    (out / "enclave.img").write_bytes(b"an image")  # the doctor only looks for it
    return out


def _doctor(run_cli: RunCli, *argv: Any) -> tuple[int, dict[str, dict[str, Any]]]:
    code, out, err = run_cli(["doctor", *argv, "--json"])
    assert "Traceback" not in err
    findings = json.loads(out)["findings"]
    by_check: dict[str, dict[str, Any]] = {}
    for f in findings:  # the worst finding of each check
        worst = by_check.get(f["check"])
        if worst is None or worst["level"] == "ok":
            by_check[f["check"]] = f
    return code, by_check


def _errors(found: dict[str, dict[str, Any]]) -> set[str]:
    return {check for check, f in found.items() if f["level"] == "error"}


def _expired_identity(home: FleetHome, bundle: Path, device_id: str) -> None:
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=ca.LEAF_DAYS + 30)
    issued = ca.issue(home.ca_issued(), home.fleet_id, device_id, now=long_ago)
    write_atomic(bundle / "tls/client.key", issued.key_pem, SECRET_FILE)
    write_atomic(bundle / "tls/client.pem", issued.cert_pem, PUBLIC_FILE)


def test_a_healthy_bundle_against_its_broker_is_all_ok(
    run_cli: RunCli, fresh_broker: Broker, tmp_path: Path
) -> None:
    bundle = _enroll(fresh_broker.home, "cam-1", tmp_path / "cam-1")
    fresh_broker.start()
    code, found = _doctor(run_cli, "--bundle", bundle, "--broker", fresh_broker.url)
    assert code == 0
    assert {f["level"] for f in found.values()} == {"ok"}, found
    assert "broker.connection" in found and "clock.skew" in found
    assert "broker certificate" in found["clock.skew"]["what"]  # says what it compared


def test_human_output_says_what_to_do(
    run_cli: RunCli, fleet_home: FleetHome, tmp_path: Path
) -> None:
    bundle = _enroll(fleet_home, "cam-1", tmp_path / "cam-1")
    os.chmod(bundle / "tls/client.key", 0o644)
    code, out, _err = run_cli(["doctor", "--bundle", bundle])
    assert code == 1
    assert "ERROR   permissions:" in out and "-> run chmod 600" in out
    assert "1 error(s)" in out


def test_a_world_readable_key_is_an_error(
    run_cli: RunCli, fleet_home: FleetHome, tmp_path: Path
) -> None:
    bundle = _enroll(fleet_home, "cam-1", tmp_path / "cam-1")
    os.chmod(bundle / "platform/root-secret", 0o604)
    code, found = _doctor(run_cli, "--bundle", bundle)
    assert code == 1
    assert _errors(found) == {"permissions"}
    assert "root-secret" in found["permissions"]["what"]
    assert "chmod 600" in found["permissions"]["todo"]


def test_an_expired_certificate_is_an_error_locally_and_at_the_broker(
    run_cli: RunCli, fresh_broker: Broker, tmp_path: Path
) -> None:
    home = fresh_broker.home
    bundle = _enroll(home, "cam-1", tmp_path / "cam-1")
    _expired_identity(home, bundle, "cam-1")
    fresh_broker.start()
    code, found = _doctor(run_cli, "--bundle", bundle, "--broker", fresh_broker.url)
    assert code == 1
    assert _errors(found) == {"certificate.validity", "broker.connection"}
    assert "expired on" in found["certificate.validity"]["what"]
    assert found["broker.connection"]["what"].startswith("certificate_expired:")


def test_a_bundle_of_another_fleet_is_an_unknown_ca_at_the_broker(
    run_cli: RunCli, fresh_broker: Broker, tmp_path: Path
) -> None:
    other = init_home(tmp_path / "other")
    bundle = _enroll(other, "cam-1", tmp_path / "foreign")
    fresh_broker.start()
    code, found = _doctor(run_cli, "--bundle", bundle, "--broker", fresh_broker.url)
    assert code == 1
    assert _errors(found) == {"broker.connection"}
    assert found["broker.connection"]["what"].startswith("unknown_ca:")
    assert "another fleet" in found["broker.connection"]["todo"]


def test_a_damaged_platform_is_an_error(
    run_cli: RunCli, fleet_home: FleetHome, tmp_path: Path
) -> None:
    bundle = _enroll(fleet_home, "cam-1", tmp_path / "cam-1")
    write_atomic(bundle / "platform/root-secret", b"short", SECRET_FILE)
    code, found = _doctor(run_cli, "--bundle", bundle)
    assert code == 1
    assert _errors(found) == {"platform.health"}


def test_a_healthy_fleet_home_is_ok_and_a_readable_ca_key_is_an_error(
    run_cli: RunCli, fleet_home: FleetHome, tmp_path: Path
) -> None:
    _enroll(fleet_home, "cam-1", tmp_path / "cam-1")
    code, found = _doctor(run_cli, "--home", fleet_home.root)
    assert code == 0
    assert {f["level"] for f in found.values()} <= {"ok", "warning"}
    assert set(found) >= {"home.marker", "ca.validity", "crl.validity", "registry.readable"}
    os.chmod(fleet_home.ca_key, 0o640)
    code, found = _doctor(run_cli, "--home", fleet_home.root)
    assert code == 1 and _errors(found) == {"permissions"}
    assert "ca.key" in found["permissions"]["what"]


def _enroll_expiring_in_10_days(home: FleetHome, device: str, bundle: Path) -> None:
    """Enroll `device`, its registered certificate then reissued to end in 10 days."""
    _enroll(home, device, bundle)
    soon = dt.datetime.now(dt.UTC) - dt.timedelta(days=ca.LEAF_DAYS - 10)
    issued = ca.issue(home.ca_issued(), home.fleet_id, device, now=soon)
    for old in (home.root / "ca/issued" / device).glob("*.pem"):
        old.unlink()
    (home.root / "ca/issued" / device / "1.pem").write_bytes(issued.cert_pem)


def test_a_device_certificate_near_its_end_is_a_warning(
    run_cli: RunCli, fleet_home: FleetHome, tmp_path: Path
) -> None:
    _enroll_expiring_in_10_days(fleet_home, "cam-1", tmp_path / "cam-1")
    _code, found = _doctor(run_cli, "--home", fleet_home.root)
    assert found["devices.expiry"]["level"] == "warning"
    assert "cam-1" in found["devices.expiry"]["what"]


def test_not_a_fleet_home_is_an_error(run_cli: RunCli, tmp_path: Path) -> None:
    code, found = _doctor(run_cli, "--home", tmp_path)
    assert code == 1 and _errors(found) == {"home.marker"}


def test_home_checks_without_the_fleet_side_are_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = ModuleNotFoundError("No module named 'tomlkit'", name="tomlkit")
    real = cli._import
    monkeypatch.setattr(
        cli, "_import", lambda name: missing if name == "provisioning.doctor" else real(name)
    )
    code = cli.main(["doctor", "--home", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_ENVIRONMENT
    assert err.count("\n") == 1 and "strongroom[fleet]" in err


def test_doctor_needs_something_to_check(run_cli: RunCli) -> None:
    code, _out, err = run_cli(["doctor"])
    assert code == cli.EXIT_USAGE and err.count("\n") == 1


def test_doctor_names_a_running_agent_without_taking_its_lock(
    run_cli: RunCli, fleet_home: FleetHome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = _enroll(fleet_home, "cam-1", tmp_path / "cam-1")
    (bundle / "state").mkdir()
    (bundle / "state" / "agent.lock").write_text("1\n")  # what an agent of yesterday left
    with AgentLock.acquire(bundle):
        taken: list[int] = []
        real_flock = fcntl.flock

        def flock(fd: int, operation: int) -> None:
            taken.append(operation)
            real_flock(fd, operation)

        monkeypatch.setattr(fcntl, "flock", flock)
        _code, found = _doctor(run_cli, "--bundle", bundle)
        assert taken == []  # a starting agent's LOCK_EX|LOCK_NB would have failed meanwhile
        assert (
            found["agent.running"]["what"]
            == f"an agent (PID {os.getpid()}) is running with {bundle}"
        )
    _code, found = _doctor(run_cli, "--bundle", bundle)
    assert found["agent.running"]["level"] == "ok"
    assert found["agent.running"]["what"] == f"no agent is running with {bundle}"


def test_an_unreadable_state_directory_is_a_warning_not_no_agent(
    run_cli: RunCli, fleet_home: FleetHome, tmp_path: Path
) -> None:
    bundle = _enroll(fleet_home, "cam-1", tmp_path / "cam-1")
    (tmp_path / "not-a-dir").write_text("")
    _code, found = _doctor(run_cli, "--bundle", bundle, "--state", tmp_path / "not-a-dir")
    assert found["agent.running"]["level"] == "warning", found["agent.running"]
    assert "cannot be read" in found["agent.running"]["what"]


def test_a_bad_broker_url_is_a_usage_error_before_any_check(
    run_cli: RunCli, tmp_path: Path
) -> None:
    code, out, err = run_cli(["doctor", "--bundle", tmp_path / "missing", "--broker", "nope"])
    assert code == cli.EXIT_USAGE
    assert out == "" and err.count("\n") == 1 and "invalid broker URL 'nope'" in err


def test_a_revoked_device_is_not_told_to_re_enroll(
    run_cli: RunCli, fleet_home: FleetHome, tmp_path: Path
) -> None:
    _enroll_expiring_in_10_days(fleet_home, "cam-1", tmp_path / "cam-1")
    set_status(fleet_home, "cam-1", REVOKED, reason="stolen", by="test")
    _code, found = _doctor(run_cli, "--home", fleet_home.root)
    assert found["devices.expiry"]["level"] == "ok", found["devices.expiry"]
