"""`strongroom demo`: a small fleet, end to end, in under a minute.

Creates a fleet in a temporary home, starts a broker (Mosquitto when installed, else the embedded
one), the verifier, the web dashboard and four devices — two healthy, one with outdated firmware,
one with a tampered enclave image — shows each device's trust status as it changes (in the terminal
and, live, on the dashboard), runs a protected model's prediction through `agent invoke` on a
healthy device, shows the outdated one refused its keys and revoked, and stops everything cleanly
(or, with `stay`, keeps the fleet and its dashboard running until interrupted). Every part is the
real code: processes, TLS, ACLs, enclaves.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from agent.enclave_source import write_enclave_source
from device_sim.ports import free_port, wait_listening
from provisioning.broker import broker_user, find_mosquitto, scratch_state_dir
from provisioning.build import build_enclave
from provisioning.enroll import enroll_device
from provisioning.home import DASHBOARD_CN, FleetHome, init_home
from provisioning.seal import seal_artifact
from strongroom import messages, topics
from strongroom.ear import verify_result
from strongroom.errors import EnvironmentFault, FormatError, StrongroomError
from strongroom.mqtt import MqttClient, MqttSettings
from strongroom.signals import stop_event

FEATURES = [0.5, 1, -2, 3, 0, 0.1, 4, -1, 2, 2, 0, 1, -0.5, 3, 1, 0]
# device id -> (firmware, enclave image tampered with on the device)
DEVICES: dict[str, tuple[str, bool]] = {
    "cam-001": ("1.2.0", False),
    "cam-002": ("1.3.1", False),
    "cam-003": ("1.0.0", False),  # below the fleet minimum: contraindicated, revoked
    "cam-004": ("1.2.0", True),  # its image was modified on the device
}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "strongroom.cli", *args]


class Demo:
    def __init__(self, out: TextIO, keep: bool, stay: bool = False) -> None:
        self.out, self.keep, self.stay = out, keep, stay
        self.root = Path(tempfile.mkdtemp(prefix="strongroom-demo-"))
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.mqtt: list[str] = []
        self.observer: MqttClient | None = None
        self.home: FleetHome | None = None
        self.broker_state: Path | None = None

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append((name, proc))
        return proc

    # -- set-up --------------------------------------------------------------------------------

    def provision(self) -> FleetHome:
        home = init_home(self.root / "fleet")
        policy = home.policy_path.read_text().replace(
            'min_firmware = "1.0.0"', 'min_firmware = "1.2.0"'
        )
        home.policy_path.write_text(policy)
        src = self.root / "enclave-src"
        write_enclave_source(src, home.verify_key("artifact"), home.result_verify_key())
        image = self.root / "enclave.img"
        build_enclave(home, src, image, svn=1)
        examples = Path(__file__).resolve().parent.parent / "examples"
        model = self.root / "model.onnx"
        subprocess.run([sys.executable, str(examples / "build_model.py"), str(model)], check=True)
        artifacts = [self.root / "model.sra", self.root / "scorer.sra"]
        seal_artifact(home, model, artifacts[0], name="demo-model", version=1, kind="model")
        seal_artifact(
            home, examples / "protected_scorer", artifacts[1], name="scorer", version=1, kind="code"
        )
        for device_id, (firmware, tampered) in DEVICES.items():
            bundle = self.root / device_id
            enroll_device(home, device_id, bundle, firmware=firmware)
            data = bytearray(image.read_bytes())
            if tampered:
                data[-20] ^= 0x01
            (bundle / "enclave.img").write_bytes(bytes(data))
            (bundle / "artifacts").mkdir()
            for a in artifacts:
                shutil.copy(a, bundle / "artifacts" / a.name)
        self.say(
            f"  fleet home, 4 enrolled devices, a signed enclave image and two sealed "
            f"artifacts in {self.root}"
        )
        self.say(
            "  fleet policy: firmware 1.2.0 or newer; cam-004's enclave image was "
            "modified on the device"
        )
        return home

    def start_broker(self, home: FleetHome) -> int:
        port = free_port()
        try:
            find_mosquitto()
            broker_user()  # started by root without a `mosquitto` user: the embedded broker
            self.broker_state = scratch_state_dir("strongroom-demo-broker-")
            argv = ["--home", str(home.root), "--port", str(port)]
            argv += ["--state-dir", str(self.broker_state)]  # the home is closed to its user
            self.spawn("broker", _cli("--log-level", "warning", "broker", "run", *argv))
            kind = "Mosquitto (mutual TLS, per-device ACL, the fleet CRL)"
        except EnvironmentFault:
            self.spawn(
                "broker",
                _cli("broker", "run", "--embedded", "--home", str(home.root), "--port", str(port)),
            )
            self.mqtt = ["--mqtt", "3.1.1"]
            kind = "the embedded broker (Mosquitto is not installed; MQTT 3.1.1)"
        wait_listening(port, 20, "the broker")
        self.say(f"  broker: {kind} on port {port}")
        return port

    def start_dashboard(self, home: FleetHome, url: str) -> int:
        """The web dashboard (its own read-only identity, `_dashboard-1`); returns its port."""
        port = free_port()
        self.spawn(
            "dashboard",
            _cli(
                "--log-level",
                "info",
                "dashboard",
                "--home",
                str(home.root),
                "--broker",
                url,
                "--port",
                str(port),
                *self.mqtt,
            ),
        )
        return port

    def watch(self, home: FleetHome, port: int) -> None:
        self.observer = MqttClient(
            MqttSettings(
                "localhost",
                port,
                home.ca_cert,
                home.root / "dashboard" / "client.pem",
                home.root / "dashboard" / "client.key",
                DASHBOARD_CN,
                protocol=311 if self.mqtt else 5,
                session_expiry_s=0,
                clean_start=True,
            )
        ).start()
        self.observer.wait_connected(10)
        for leaf in (topics.RESULT, topics.STATUS):
            self.observer.subscribe(topics.any_device(leaf))
        self.observer.subscribe(topics.ALERTS)

    # -- the run -------------------------------------------------------------------------------

    def show_updates(
        self, seconds: float, until: Callable[[dict[str, str]], bool]
    ) -> dict[str, str]:
        """Print trust changes as they arrive; return the latest status per device."""
        if self.observer is None or self.home is None:
            raise EnvironmentFault("the demo's observer is not running")
        key, latest = self.home.result_verify_key(), dict[str, str]()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not until(latest):
            msg = self.observer.receive(0.2)
            if msg is None:
                continue
            try:
                device, leaf = topics.parse(msg.topic) if msg.topic != topics.ALERTS else ("", "")
            except StrongroomError:
                continue
            try:
                if leaf == topics.RESULT:
                    r = verify_result(msg.payload, key)
                    if r.device_id != device:
                        raise FormatError("the result names another device than its topic")
                    why = f": {'; '.join(r.reasons)}" if r.reasons else ""
                    self.say(f"  {device:8} result  {r.status:16} (signed by the verifier){why}")
                    if not (latest.get(device) == "revoked" and r.status == "contraindicated"):
                        latest[device] = r.status  # a revoked device's results say so: revoked
                elif leaf == topics.STATUS:
                    state = messages.Status.decode(msg.payload).state
                    if state == "revoked":
                        self.say(
                            f"  {device:8} status  revoked: its enclave wiped keys and "
                            "plaintext and confirmed"
                        )
                        latest[device] = "revoked"
            except StrongroomError as e:
                if leaf == topics.RESULT:  # not believed, and the device is trusted no longer
                    self.say(f"  {device:8} result  unverified: {str(e)[:120]}")
                    latest[device] = "unverified"
        return latest

    def run(self) -> int:
        self.say(
            "Strongroom demo: keeping a vendor's model secret on devices it does not control\n"
        )
        self.say("1. Provisioning")
        self.home = home = self.provision()
        self.say("\n2. Fleet services")
        port = self.start_broker(home)
        url = f"mqtts://localhost:{port}"
        self.spawn(
            "verifier",
            _cli(
                "--log-level",
                "info",
                "verifier",
                "run",
                "--home",
                str(home.root),
                "--broker",
                url,
                *self.mqtt,
            ),
        )
        dashboard_port = self.start_dashboard(home, url)
        dashboard = f"http://127.0.0.1:{dashboard_port}/"
        self.watch(home, port)
        self.say(
            "  verifier and key broker running; watching results with the read-only "
            "dashboard identity"
        )
        wait_listening(dashboard_port, 20, "the dashboard")
        self.say(f"  dashboard: {dashboard}  (open it now: trust changes show live)")
        self.say(f"  operator token for its actions: {home.operator_token_path}")
        self.say("\n3. Devices start their agents (trust status as it changes)")
        agents = {}
        for device_id in DEVICES:
            agents[device_id] = self.spawn(
                f"agent-{device_id}",
                _cli(
                    "--log-level",
                    "info",
                    "agent",
                    "run",
                    "--bundle",
                    str(self.root / device_id),
                    "--broker",
                    url,
                    "--socket",
                    str(self.root / f"{device_id}.sock"),
                    *self.mqtt,
                    "--no-privilege-separation",  # the demo runs every role as its user
                ),
            )
        latest = self.show_updates(
            45,
            lambda s: (
                s.get("cam-001") == s.get("cam-002") == "affirming"
                and s.get("cam-003") == "revoked"
            ),
        )
        time.sleep(0.5)
        if agents["cam-004"].poll() is not None:
            log = (self.root / "agent-cam-004.log").read_text(errors="replace")
            reason = "MRENCLAVE mismatch" if "MRENCLAVE" in log else "refused"
            self.say(
                f"  cam-004  refused at launch by its own platform ({reason}): no evidence, no key"
            )
        self.say("\n4. A prediction inside cam-001's enclave (only the result leaves it)")
        answer = self.invoke("cam-001")
        self.say(
            f"  $ strongroom agent invoke --bundle cam-001 scorer:predict '{{...}}'\n  {answer}"
        )
        self.say("\n5. cam-003 was refused its keys and revoked")
        refused = self.invoke("cam-003")
        self.say(
            f"  $ strongroom agent invoke --bundle cam-003 scorer:predict '{{...}}'\n  {refused}"
        )
        ok = (
            latest.get("cam-001") == "affirming"
            and latest.get("cam-003") == "revoked"
            and answer.startswith("{")
        )
        self.say("\nWhere to look next")
        self.say(
            f"  logs (JSON lines): {self.root}/verifier.log, dashboard.log, agent-cam-*.log, "
            "broker.log"
        )
        self.say(f"  audit trail:       strongroom audit show --home {home.root}")
        self.say(f"  fleet policy:      {home.policy_path}")
        self.say("  protocol:          docs/protocol.md; threat model: docs/threat-model.md")
        if not self.stay:
            self.say(
                "  keep it running:   strongroom demo --stay (fleet and dashboard until Ctrl-C)"
            )
        else:
            status = f"strongroom status --home {home.root} --broker {url} {' '.join(self.mqtt)}"
            self.say(f"  fleet status:      {status.rstrip()}")
            self.say(
                f"\nThe fleet and its dashboard ({dashboard}) keep running; Ctrl-C stops them."
            )
            stop = stop_event()
            while not stop.wait(0.5):
                pass
        return 0 if ok else 1

    def invoke(self, device_id: str) -> str:
        done = subprocess.run(
            _cli(
                "agent",
                "invoke",
                "--bundle",
                str(self.root / device_id),
                "--socket",
                str(self.root / f"{device_id}.sock"),
                "scorer:predict",
                json.dumps({"features": FEATURES}),
            ),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return (done.stdout or done.stderr).strip()

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for _name, proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
            if self.broker_state is not None:
                shutil.rmtree(self.broker_state.parent, ignore_errors=True)
        self.say(
            "\nstopped cleanly" + (f"; everything is kept in {self.root}" if self.keep else "")
        )


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise EnvironmentFault(f"{what} did not start within {timeout:g} s")


def run_demo(out: TextIO | None = None, keep: bool = True, stay: bool = False) -> int:
    demo = Demo(out if out is not None else sys.stdout, keep, stay)
    try:
        return demo.run()
    finally:
        demo.stop()
