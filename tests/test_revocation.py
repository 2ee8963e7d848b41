"""Revocation with zeroisation, reinstatement, forged commands, and the audit trail, end to end."""

from __future__ import annotations

import json
import subprocess

from provisioning.home import VERIFIER_CN
from strongroom import topics
from strongroom.commands import Command, sign_command
from strongroom.mqtt import MqttClient, MqttSettings
from strongroom.signing import SigningKey
from tests.fleet import Fleet, Observer, cli, wait_until


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), capture_output=True, text=True, timeout=60, check=False)


def _invoke_ok(fleet: Fleet, device_id: str) -> bool:
    return fleet.invoke(device_id, "vendor:echo", "1").returncode == 0


def test_revoke_wipes_the_enclave_and_reinstate_needs_fresh_attestation(fleet: Fleet) -> None:
    fleet.start()
    bundle = fleet.enroll("cam-1")
    fleet.agent("cam-1")
    fleet.observer.wait_result("cam-1", "affirming")
    wait_until(lambda: _invoke_ok(fleet, "cam-1"), 20, "the first answer")
    sealed = bundle / "state" / "sealed"
    assert list(sealed.glob("*.blob"))

    home = str(fleet.home.root)
    assert _run("device", "revoke", "cam-1", "--home", home, "--reason", "stolen").returncode == 0
    wait_until(lambda: "revoked" in fleet.observer.states("cam-1"), 20, "the wipe's confirmation")
    refused = fleet.invoke("cam-1", "vendor:echo", "1")
    assert refused.returncode != 0 and "revoked" in refused.stderr
    assert list(sealed.glob("*.blob")) == []  # nothing to restart from
    assert "revocation_confirmed" in fleet.verifier.log()

    assert _run("device", "reinstate", "cam-1", "--home", home).returncode == 0
    wait_until(lambda: _invoke_ok(fleet, "cam-1"), 30, "service after a fresh attestation")
    log = fleet.verifier.log()
    assert log.rindex('"key_released"') > log.index('"revocation_confirmed"')

    audit = _run("audit", "verify", "--home", home)
    assert audit.returncode == 0 and json.loads(audit.stdout)["intact"] is True
    events = [
        json.loads(line)["event"]
        for line in _run("audit", "show", "--home", home).stdout.splitlines()
    ]
    assert events.count("key_released") >= 2
    for event in ("revoked", "revocation_confirmed", "reinstated"):
        assert event in events


def test_a_contraindicated_device_is_revoked_automatically(fleet: Fleet) -> None:
    fleet.set_policy('min_firmware = "1.0.0"', 'min_firmware = "2.0.0"')
    fleet.start()
    fleet.enroll("old", firmware="1.5.0")
    fleet.agent("old")
    fleet.observer.wait_result("old", "contraindicated")
    wait_until(lambda: "revoked" in fleet.observer.states("old"), 20, "the enclave's confirmation")
    alerts = fleet.observer.alerts()
    assert any(a.severity == "critical" and a.reason.startswith("revoked:") for a in alerts)
    record = json.loads((fleet.home.registry_dir / "old.json").read_text())
    assert record["status"] == "revoked"


def test_a_forged_command_is_ignored_and_reported(fleet: Fleet) -> None:
    fleet.broker.start()
    forger = MqttClient(
        MqttSettings(
            "localhost",
            fleet.broker.port,
            fleet.home.ca_cert,
            fleet.home.root / "verifier" / "client.pem",
            fleet.home.root / "verifier" / "client.key",
            VERIFIER_CN,
            session_expiry_s=0,
            clean_start=True,
        )
    ).start()
    forger.wait_connected(10)
    forged = sign_command(Command.revoke("cam-f", "forged", 0), SigningKey.generate())
    forger.publish(topics.device_topic("cam-f", topics.COMMAND), forged, retain=True)
    forger.stop()
    fleet.start_verifier()
    fleet.observer = Observer(fleet.home, fleet.broker.port).start()
    fleet.enroll("cam-f")
    fleet.agent("cam-f")
    wait_until(
        lambda: any("ignored a command" in a.reason for a in fleet.observer.alerts()),
        20,
        "the device's report",
    )
    fleet.observer.wait_result("cam-f", "affirming")
    wait_until(lambda: _invoke_ok(fleet, "cam-f"), 20, "service despite the forged command")
    assert "revoked" not in fleet.observer.states("cam-f")
