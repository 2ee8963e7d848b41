"""`strongroom status --json` against a real Mosquitto (TLS, ACLs) fails closed: whatever is on a
device's result topic, if it does not verify as a result for that device, the device is
`unverified` and nothing in the document says it is trusted. Bad bytes are published with a
verifier identity, which the ACL lets write result topics, as an attacker holding one would."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from provisioning.enroll import enroll_device
from provisioning.home import FleetHome, init_home
from strongroom import topics
from strongroom.ear import AttestationResult, sign_result
from strongroom.mqtt import MqttClient
from strongroom.signing import SigningKey
from tests.conftest import RunCli
from tests.fleet import Broker, cli, free_port, require_mosquitto, verifier_client

TOPIC = topics.device_topic("cam-1", topics.RESULT)
SPOILED: dict[str, Callable[[bytes], bytes]] = {
    "garbage": lambda _token: b"garbage",
    "truncated": lambda token: token[:-7],
    "trailing-garbage": lambda token: token + b"garbage",
}
# An empty retained message clears the topic: a consumer subscribing later gets nothing at all,
# one already subscribed gets the empty payload.
WITHDRAWN: dict[str, Callable[[bytes], bytes]] = {**SPOILED, "cleared": lambda _token: b""}


@dataclass
class Rig:
    home: FleetHome
    broker: Broker
    writer: MqttClient  # a verifier identity: may publish on result topics
    key: SigningKey  # the verifier's real result key

    def genuine(self, iat: int) -> bytes:
        result = AttestationResult("cam-1", "affirming", {"hardware": 2}, (), "policy:v1", iat, {})
        return sign_result(result, self.key)

    def publish(self, payload: bytes) -> None:
        self.writer.publish(TOPIC, payload, retain=True, wait=True)

    def status(self, run_cli: RunCli) -> dict[str, Any]:
        code, out, err = run_cli(
            ["status", "--home", self.home.root, "--broker", self.broker.url, "--json"]
        )
        assert code == 0, err
        doc: dict[str, Any] = json.loads(out)
        return doc


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    require_mosquitto()
    home = init_home(tmp_path / "home")
    enroll_device(home, "cam-1", tmp_path / "cam-1")
    broker = Broker(home, free_port(), tmp_path)
    broker.start()
    try:
        writer = verifier_client(home, broker.port)
        try:
            signing = SigningKey.from_pem(
                (home.root / "verifier" / "result-signing.key").read_bytes()
            )
            yield Rig(home, broker, writer, signing)
        finally:
            writer.stop()
    finally:
        broker.stop()


def trusted_anywhere(doc: dict[str, Any]) -> bool:
    (row,) = doc["devices"]
    counts = doc["summary"]["counts"]
    return bool(row["result"]) or row["status"] != "unverified" or counts["affirming"] != 0


def test_status_json_shows_a_retained_result_that_does_not_verify_as_unverified(
    rig: Rig, run_cli: RunCli
) -> None:
    genuine = rig.genuine(int(time.time()))
    rig.publish(genuine)
    doc = rig.status(run_cli)
    assert [(r["status"], r["result"]) for r in doc["devices"]] == [("affirming", "affirming")]
    for name, spoil in SPOILED.items():
        rig.publish(spoil(genuine))
        doc = rig.status(run_cli)
        assert not trusted_anywhere(doc), (name, doc)
        assert doc["summary"]["counts"]["unverified"] == 1, name
        assert doc["devices"][0]["reasons"][0].startswith("unverified result:"), name


class Watch:
    """`strongroom status --watch --json`: one JSON document per line whenever the view changes."""

    def __init__(self, rig: Rig, log: Path) -> None:
        argv = cli("status", "--home", str(rig.home.root), "--broker", rig.broker.url)
        self._log = log.open("wb")
        self.p = subprocess.Popen(
            [*argv, "--watch", "--json"], stdout=subprocess.PIPE, stderr=self._log
        )
        self.docs: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.docs.put(json.loads(line))

    def wait_for(self, what: str, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + 20
        while (left := deadline - time.monotonic()) > 0:
            try:
                doc = self.docs.get(timeout=left)
            except queue.Empty:
                break
            if predicate(doc):
                return doc
        raise AssertionError(f"status --watch never showed {what}")

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self._reader.join(5)
        self._log.close()


def affirming(doc: dict[str, Any]) -> bool:
    rows = doc["devices"]
    return [(r["status"], r["result"]) for r in rows] == [("affirming", "affirming")]


def test_status_watch_stops_trusting_a_device_whatever_replaces_its_result(
    rig: Rig, tmp_path: Path
) -> None:
    """A consumer that already trusts the device: each bad payload, the empty one that clears the
    retained result included, turns it unverified; the verifier's genuine result restores it."""
    watch = Watch(rig, tmp_path / "status.log")
    try:
        iat = int(time.time())
        rig.publish(rig.genuine(iat))
        watch.wait_for("the genuine result", affirming)
        for name, spoil in WITHDRAWN.items():
            rig.publish(spoil(rig.genuine(iat)))
            doc = watch.wait_for(
                f"cam-1 unverified after {name}",
                lambda d: d["devices"][0]["status"] == "unverified",
            )
            assert not trusted_anywhere(doc), (name, doc)
            iat += 1
            rig.publish(rig.genuine(iat))
            watch.wait_for(f"cam-1 affirming again after {name}", affirming)
    finally:
        watch.stop()
