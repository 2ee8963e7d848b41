"""A verifier with real evidence, store and crypto, whose MQTT adapter is an in-memory recorder
(our own seam): the `rig` fixture of tests/conftest.py."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

from agent.enclave_source import write_enclave_source
from device_sim.inline import InlineEnclave, image_identity
from provisioning.build import build_enclave
from provisioning.enroll import enroll_device
from provisioning.home import FleetHome
from strongroom import topics
from strongroom.ear import verify_result
from strongroom.mqtt import Inbound, MqttError
from verifier.service import Verifier, VerifierConfig
from verifier.store_sqlite import SqliteStore


def _connected() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


@dataclass
class Recorder:
    published: list[tuple[str, bytes, bool]] = field(default_factory=list)
    inbox: queue.Queue[Inbound] = field(default_factory=queue.Queue)
    acked: list[Inbound] = field(default_factory=list)
    subscribed: dict[str, bool] = field(default_factory=dict)  # topic: retain as published
    connected: threading.Event = field(default_factory=_connected)
    fail_on: str = ""  # publishing to a topic ending so raises MqttError (the broker refuses it)
    waited: list[str] = field(default_factory=list)  # topics published with wait=True

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, wait: bool = True
    ) -> None:
        if not self.connected.is_set():  # as the adapter does
            raise MqttError(f"not connected; cannot publish to {topic}")
        if self.fail_on and topic.endswith(self.fail_on):
            raise MqttError(f"cannot publish to {topic}: the broker went away")
        self.published.append((topic, payload, retain))
        if wait:
            self.waited.append(topic)

    def subscribe(
        self, topic: str, qos: int = 1, *, retain_as_published: bool = False
    ) -> list[int]:
        self.subscribed[topic] = retain_as_published
        return [qos]

    def ack(self, msg: Inbound) -> None:
        self.acked.append(msg)

    def idle(self, timeout: float) -> None:
        pass

    def receive(self, timeout: float) -> Inbound | None:
        """The next message put in `inbox`, or None at once (the loop's tests do not wait)."""
        try:
            return self.inbox.get_nowait()
        except queue.Empty:
            return None

    def on(self, leaf: str) -> list[tuple[bytes, bool]]:
        """(payload, retain) of what was published on topics ending in `leaf`."""
        return [(p, r) for t, p, r in self.published if t.endswith(leaf)]

    def results(self, home: FleetHome) -> list[tuple[str, int]]:
        """(device, evidence seq) of each published result, in order."""
        out = []
        for topic, payload, _retain in self.published:
            if topic.endswith("/result"):
                r = verify_result(payload, home.result_verify_key())
                out.append((r.device_id, int(r.details["seq"])))
        return out


@dataclass
class Rig:
    home: FleetHome
    verifier: Verifier
    mqtt: Recorder
    enclaves: dict[str, InlineEnclave]
    store: SqliteStore
    root: Path

    def evidence(self, device_id: str, nonce: bytes | None = None) -> Inbound:
        token = self.enclaves[device_id].evidence(nonce)
        return Inbound(topics.device_topic(device_id, topics.EVIDENCE), token, False)

    def bundle(self, device_id: str) -> Path:
        return self.root / device_id


def make_rig(tmp_path: Path, fleet_home: FleetHome) -> Rig:
    write_enclave_source(
        tmp_path / "src", fleet_home.verify_key("artifact"), fleet_home.result_verify_key()
    )
    build_enclave(fleet_home, tmp_path / "src", tmp_path / "enclave.img", svn=1)
    identity = image_identity((tmp_path / "enclave.img").read_bytes())
    enclaves = {}
    for device_id in ("cam-a", "cam-b"):
        enroll_device(fleet_home, device_id, tmp_path / device_id)
        enclaves[device_id] = InlineEnclave.load(tmp_path / device_id, identity)
    mqtt = Recorder()
    store = SqliteStore(tmp_path / "state.sqlite")
    verifier = Verifier(VerifierConfig(fleet_home), store, mqtt)  # type: ignore[arg-type]
    return Rig(fleet_home, verifier, mqtt, enclaves, store, tmp_path)
