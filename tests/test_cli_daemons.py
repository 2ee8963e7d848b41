"""The on-device and fleet commands as a user runs them: `enclave source`, `enclave run`,
`broker run`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from provisioning.home import FleetHome
from strongroom.mqtt import MqttClient, MqttSettings
from tests.fleet import Broker, Proc, cli, free_port, require_mosquitto, wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), capture_output=True, text=True, timeout=120, check=False)


def test_enclave_source_build_and_run_answer_with_a_protected_model(
    fleet_home: FleetHome, tmp_path: Path
) -> None:
    home = str(fleet_home.root)
    assert (
        _run("device", "enroll", "cam-1", "--home", home, "--out", str(tmp_path / "b")).returncode
        == 0
    )
    src = tmp_path / "src"
    made = _run("enclave", "source", str(src), "--home", home)
    assert made.returncode == 0 and "enclave_policy.py" in json.loads(made.stdout)["files"]
    image = tmp_path / "enclave.img"
    assert (
        _run(
            "enclave",
            "build",
            str(src),
            "--home",
            home,
            "--svn",
            "1",
            "--debug",
            "--out",
            str(image),
        ).returncode
        == 0
    )
    model = tmp_path / "model.onnx"
    subprocess.run([sys.executable, str(EXAMPLES / "build_model.py"), str(model)], check=True)
    sealed = [tmp_path / "model.sra", tmp_path / "scorer.sra"]
    assert (
        _run(
            "artifact",
            "seal",
            str(model),
            "--home",
            home,
            "--name",
            "demo-model",
            "--version",
            "1",
            "--kind",
            "model",
            "--out",
            str(sealed[0]),
        ).returncode
        == 0
    )
    assert (
        _run(
            "artifact",
            "seal",
            str(EXAMPLES / "protected_scorer"),
            "--home",
            home,
            "--name",
            "scorer",
            "--version",
            "1",
            "--kind",
            "code",
            "--out",
            str(sealed[1]),
        ).returncode
        == 0
    )
    features = json.dumps({"features": list(range(16))})
    common = [
        "--bundle",
        str(tmp_path / "b"),
        "--image",
        str(image),
        "--state",
        str(tmp_path / "state"),
        "--artifact",
        str(sealed[0]),
        "--artifact",
        str(sealed[1]),
        "--no-privilege-separation",  # the separated mode: tests/test_privilege_separation.py
    ]
    first = _run(
        "enclave", "run", "scorer:predict", features, *common, "--dev", "--dev-keys-from", home
    )
    assert first.returncode == 0, first.stderr
    answer = json.loads(first.stdout)
    assert set(answer) == {"class", "probabilities"} and len(answer["probabilities"]) == 3
    again = _run("enclave", "run", "scorer:predict", features, *common, "--dev")  # sealed keys
    assert again.returncode == 0 and json.loads(again.stdout) == answer
    production = _run("enclave", "run", "scorer:predict", features, *common)
    assert production.returncode != 0 and "debug enclave image refused" in production.stderr
    no_dev = _run("enclave", "run", "scorer:predict", features, *common, "--dev-keys-from", home)
    assert no_dev.returncode == 2 and "--dev-keys-from needs --dev" in no_dev.stderr


def test_broker_run_serves_the_fleet_with_its_generated_config(
    fleet_home: FleetHome, tmp_path: Path
) -> None:
    require_mosquitto()
    port = free_port()
    place = Broker(fleet_home, port, tmp_path)  # its state directory outlives the test's use
    state = place.state_dir  # reachable by the broker's user, unlike tmp_path
    broker = Proc(
        cli(
            "broker",
            "run",
            "--home",
            str(fleet_home.root),
            "--port",
            str(port),
            "--state-dir",
            str(state),
        ),
        tmp_path / "broker.log",
    )
    try:
        v = MqttClient(
            MqttSettings(
                "localhost",
                port,
                fleet_home.ca_cert,
                fleet_home.root / "verifier/client.pem",
                fleet_home.root / "verifier/client.key",
                "_verifier",
                session_expiry_s=0,
                clean_start=True,
            )
        ).start()
        wait_until(v.connected.is_set, 20, "a connection with the verifier's identity")
        v.stop()
        conf = (state / "mosquitto.conf").read_text()
        assert "require_certificate true" in conf and "allow_anonymous false" in conf
        assert "\ncrlfile " in conf and "\nuser root\n" not in conf
    finally:
        assert broker.stop() in (0, -15)
