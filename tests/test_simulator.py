"""The simulator's small-fleet scorecard: every scenario at least once, with enclaves as real
processes, against its own Mosquitto and verifier; zero mismatches and zero lost messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device_sim.scenarios import SCENARIOS
from strongroom.cli import main
from tests.fleet import require_mosquitto


@pytest.mark.timeout(240)
def test_a_small_fleet_scorecard_has_no_mismatch_and_no_loss(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_mosquitto()
    report = tmp_path / "scorecard.json"
    argv = ["sim", "run", "--home", str(tmp_path / "home"), "--devices", str(len(SCENARIOS))]
    argv += ["--duration", "30", "--interval", "2", "--grace", "2", "--report", str(report)]
    code = main(argv)
    out = capsys.readouterr().out
    card = json.loads(report.read_text())
    assert card["mismatched_devices"] == [], out
    assert code == 0, out
    assert card["enclave"] == "process"
    assert set(card["scenarios"]) == set(SCENARIOS)
    for name, row in card["scenarios"].items():
        assert row["observed"] == {SCENARIOS[name].expected: 1}, name
    attacks = [n for n, s in SCENARIOS.items() if s.attack]
    assert all(card["scenarios"][n]["detections"] == 1 for n in attacks)
    assert card["evidence"]["lost"] == 0
    assert card["evidence"]["results_received"] > 0
    assert "PASSED" in out


def test_an_unknown_scenario_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["sim", "run", "--home", str(tmp_path / "h"), "--scenarios", "healthy,bogus"])
    assert code == 2
    assert "unknown scenario 'bogus'" in capsys.readouterr().err


def test_a_home_not_made_by_the_simulator_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mine").mkdir()
    code = main(["sim", "run", "--home", str(tmp_path / "mine"), "--devices", "2"])
    assert code == 2
    assert "not a fleet home made by the simulator" in capsys.readouterr().err
