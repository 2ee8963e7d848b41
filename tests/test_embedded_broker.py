"""The embedded (amqtt, MQTT 3.1.1) broker runs the same protocol and enforces the same ACL."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from strongroom import topics
from strongroom.mqtt import MqttClient, MqttError
from tests.fleet import Fleet, bundle_client, wait_until
from tests.test_remote_attestation import _evidence_of


@pytest.fixture
def embedded_fleet(tmp_path: Path):  # type: ignore[no-untyped-def]
    f = Fleet(tmp_path, embedded=True)
    yield f
    f.stop()


def _client(fleet: Fleet, bundle: Path, client_id: str) -> MqttClient:
    return bundle_client(fleet.broker.port, bundle, client_id, protocol=311)


def test_a_device_is_affirmed_and_keyed_through_the_embedded_broker(embedded_fleet: Fleet) -> None:
    fleet = embedded_fleet.start()
    fleet.enroll("cam-e")
    fleet.agent("cam-e")
    fleet.observer.wait_result("cam-e", "affirming")
    done = wait_until(
        lambda: (r := fleet.invoke("cam-e", "vendor:echo", "7")).returncode == 0 and r,
        20,
        "protected code to answer",
    )
    assert json.loads(done.stdout) == {"echo": 7}


def test_the_embedded_broker_enforces_identity_and_the_acl(embedded_fleet: Fleet) -> None:
    fleet = embedded_fleet.start()
    a, b = fleet.enroll("cam-a"), fleet.enroll("cam-b")
    impostor = _client(fleet, a, "cam-b")  # cam-a's certificate, cam-b's client id
    with pytest.raises(MqttError):
        impostor.wait_connected(3)
    impostor.stop()
    spy = _client(fleet, a, "cam-a")
    spy.wait_connected(10)
    try:
        spy.subscribe(topics.device_topic("cam-b", topics.RESULT))
        with contextlib.suppress(MqttError):
            spy.publish(topics.device_topic("cam-b", topics.STATUS), b"\xa0", timeout=2)
        owner = _client(fleet, b, "cam-b")
        owner.wait_connected(10)
        (evidence,) = _evidence_of(fleet, "cam-b", 1)
        owner.publish(topics.device_topic("cam-b", topics.EVIDENCE), evidence)
        fleet.observer.wait_result("cam-b", "affirming")
        owner.stop()
        assert [m.topic for m in iter(lambda: spy.receive(0.3), None)] == []
        assert "rejected fleet/cam-b/status" not in fleet.verifier.log()
    finally:
        spy.stop()
