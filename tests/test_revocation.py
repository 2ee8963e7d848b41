"""Revocation with zeroisation, reinstatement, forged commands, and the audit trail, end to end;
revoked and replaced certificates refused by the broker at TLS once it reloads the fleet CRL."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from provisioning import ca
from provisioning.enroll import enroll_device
from provisioning.home import VERIFIER_CN, FleetHome
from strongroom import topics
from strongroom.commands import Command, sign_command
from strongroom.mqtt import MqttClient, MqttSettings
from strongroom.signing import SigningKey
from tests.fleet import Broker, Fleet, Observer, cli, wait_until
from tests.mqtt_probe import ACCEPTED, connect_once


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
    reloads = _reloads(fleet.broker)
    assert _run("device", "revoke", "cam-1", "--home", home, "--reason", "stolen").returncode == 0
    # the broker drops no established connection when it reloads the CRL: the command arrives
    wait_until(lambda: "revoked" in fleet.observer.states("cam-1"), 20, "the wipe's confirmation")
    _wait_reloaded(fleet.broker, reloads)
    assert connect_once(fleet.broker.port, bundle).startswith("tls:")  # no new connection
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
    bundle = fleet.enroll("old", firmware="1.5.0")
    reloads = _reloads(fleet.broker)
    fleet.agent("old")
    fleet.observer.wait_result("old", "contraindicated")
    wait_until(lambda: "revoked" in fleet.observer.states("old"), 20, "the enclave's confirmation")
    alerts = fleet.observer.alerts()
    assert any(a.severity == "critical" and a.reason.startswith("revoked:") for a in alerts)
    record = json.loads((fleet.home.registry_dir / "old.json").read_text())
    assert record["status"] == "revoked"
    _wait_reloaded(fleet.broker, reloads)  # the verifier put its certificate on hold
    assert connect_once(fleet.broker.port, bundle).startswith("tls:")


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


# --- the broker refuses revoked and replaced certificates ---------------------------------------


def _reloads(broker: Broker) -> int:
    """How many times Mosquitto itself has reloaded (logged as it starts the reload, which ends
    before it accepts another connection: it is single-threaded)."""
    assert broker.proc is not None
    return broker.proc.log().count("Reloading config.")


def _wait_reloaded(broker: Broker, before: int) -> None:
    """Wait until the broker has reloaded since `before` (a newer CRL handed over)."""
    wait_until(lambda: _reloads(broker) > before, 10, "the broker to reload the CRL")


@pytest.fixture
def broker(fresh_broker: Broker) -> Broker:
    return fresh_broker


def _enroll(
    home: FleetHome, tmp_path: Path, device_id: str, name: str = "", force: bool = False
) -> Path:
    bundle = tmp_path / (name or device_id)
    enroll_device(home, device_id, bundle, force=force)
    return bundle


def test_a_revoked_certificate_is_refused_at_tls_and_a_reinstated_one_connects_again(
    broker: Broker, tmp_path: Path
) -> None:
    cam1 = _enroll(broker.home, tmp_path, "cam-1")
    cam2 = _enroll(broker.home, tmp_path, "cam-2")
    broker.start()
    assert connect_once(broker.port, cam1) == ACCEPTED
    home = str(broker.home.root)

    reloads = _reloads(broker)
    assert _run("device", "revoke", "cam-1", "--home", home, "--reason", "lost").returncode == 0
    _wait_reloaded(broker, reloads)
    refused = connect_once(broker.port, cam1)
    assert refused.startswith("tls:"), refused
    assert connect_once(broker.port, cam2) == ACCEPTED  # only that certificate

    reloads = _reloads(broker)
    assert _run("device", "reinstate", "cam-1", "--home", home).returncode == 0
    _wait_reloaded(broker, reloads)
    assert connect_once(broker.port, cam1) == ACCEPTED


def test_a_re_enrolled_device_old_certificate_is_refused_and_its_new_one_accepted(
    broker: Broker, tmp_path: Path
) -> None:
    old = _enroll(broker.home, tmp_path, "cam-1", "old")
    broker.start()
    assert connect_once(broker.port, old) == ACCEPTED

    reloads = _reloads(broker)
    new = tmp_path / "new"
    enrolled = _run(
        "device", "enroll", "cam-1", "--home", str(broker.home.root), "--out", str(new), "--force"
    )
    assert enrolled.returncode == 0, enrolled.stderr
    _wait_reloaded(broker, reloads)
    assert connect_once(broker.port, old).startswith("tls:")
    assert connect_once(broker.port, new) == ACCEPTED

    home = str(broker.home.root)  # lifting a hold never brings a replaced certificate back
    for command in (("revoke", "--reason", "lost"), ("reinstate",)):
        reloads = _reloads(broker)
        assert _run("device", command[0], "cam-1", "--home", home, *command[1:]).returncode == 0
        _wait_reloaded(broker, reloads)
    assert connect_once(broker.port, old).startswith("tls:")
    assert connect_once(broker.port, new) == ACCEPTED


def test_a_crl_that_does_not_verify_never_reaches_the_broker(
    broker: Broker, tmp_path: Path
) -> None:
    """Mosquitto 2.0.11 reloading a bad `crlfile` accepts every certificate: a CRL not signed by
    the fleet CA (here an empty one from another CA, which would lift every revocation) is
    refused by `broker run`, and the broker keeps the last list that verified."""
    cam1 = _enroll(broker.home, tmp_path, "cam-1")
    broker.start()
    home = str(broker.home.root)
    reloads = _reloads(broker)
    assert _run("device", "revoke", "cam-1", "--home", home, "--reason", "lost").returncode == 0
    _wait_reloaded(broker, reloads)

    other = ca.make_ca("other")
    broker.home.crl_path.write_bytes(ca.make_crl(other, 99, ()))
    proc = broker.proc
    assert proc is not None
    wait_until(lambda: '"crl_not_reloaded"' in proc.log(), 10, "the CRL to be refused")
    assert connect_once(broker.port, cam1).startswith("tls:")
    assert _reloads(broker) == reloads + 1
