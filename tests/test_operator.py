"""Operator actions from the CLI: re-attestation requests are written for the verifier, claimed by
exactly one verifier process, refused for revoked or unknown devices, and audited."""

from __future__ import annotations

import json
from pathlib import Path

from provisioning.enroll import enroll_device
from provisioning.home import FleetHome
from tests.conftest import RunCli
from verifier.audit import AuditLog
from verifier.operator import audit_path, claim_requests, requests_dir


def _events(home: FleetHome) -> list[tuple[str, str]]:
    return [(e["event"], e["device"]) for e in AuditLog(audit_path(home)).entries()]


def test_reattest_writes_a_request_that_one_verifier_claims(
    tmp_path: Path, fleet_home: FleetHome, run_cli: RunCli
) -> None:
    enroll_device(fleet_home, "cam-1", tmp_path / "cam-1")
    code, out, _err = run_cli(["device", "reattest", "cam-1", "--home", fleet_home.root])
    assert code == 0
    assert json.loads(out) == {"device": "cam-1", "status": "active", "changed": True}
    assert (requests_dir(fleet_home) / "cam-1.json").exists()
    assert ("reattestation_requested", "cam-1") in _events(fleet_home)
    assert claim_requests(fleet_home) == ["cam-1"]
    assert claim_requests(fleet_home) == []  # claimed once: another verifier finds nothing
    assert list(requests_dir(fleet_home).iterdir()) == []


def test_reattest_of_a_revoked_or_unknown_device_is_a_one_line_error(
    tmp_path: Path, fleet_home: FleetHome, run_cli: RunCli
) -> None:
    enroll_device(fleet_home, "cam-1", tmp_path / "cam-1")
    home = fleet_home.root
    assert run_cli(["device", "revoke", "cam-1", "--home", home, "--reason", "lost"])[0] == 0
    code, _out, err = run_cli(["device", "reattest", "cam-1", "--home", home])
    assert code == 2
    assert "cam-1 is revoked" in err and "reinstate it first" in err
    assert claim_requests(fleet_home) == []
    code, _out, err = run_cli(["device", "reattest", "cam-9", "--home", home])
    assert code == 2
    assert "not enrolled" in err
