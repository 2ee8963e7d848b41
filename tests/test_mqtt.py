"""The MQTT adapter against a real Mosquitto with the fleet's TLS + ACL configuration: buffered
socket I/O loses, splits or reorders nothing, in both threaded and driven mode; a driven client
reconnects on its own; a clean stop gets its DISCONNECT out."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioning.enroll import enroll_device
from provisioning.home import FleetHome, init_home
from strongroom import topics
from strongroom.mqtt import Inbound, MqttClient, MqttSettings, Will
from tests.fleet import Broker, Observer, bundle_client, free_port, require_mosquitto


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    require_mosquitto()
    b = Broker(init_home(tmp_path / "home"), free_port(), tmp_path)
    b.start()
    yield b
    b.stop()


def _verifier_settings(home: FleetHome, port: int, **options: Any) -> MqttSettings:
    cn, cert, key = home.verifier_identity(0)
    return MqttSettings("localhost", port, home.ca_cert, cert, key, cn, **options)


def _verifier_client(home: FleetHome, port: int, *, driven: bool) -> MqttClient:
    return MqttClient(_verifier_settings(home, port), driven=driven).start()


def _receive_all(client: MqttClient, n: int, timeout: float = 30) -> list[Inbound]:
    got: list[Inbound] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        if (m := client.receive(0.1)) is not None:
            got.append(m)
    return got


@pytest.mark.parametrize("driven", [False, True], ids=["threaded", "driven"])
def test_every_message_arrives_whole_and_in_order(
    broker: Broker, tmp_path: Path, driven: bool
) -> None:
    home = broker.home
    enroll_device(home, "cam-1", tmp_path / "cam-1")
    verifier = _verifier_client(home, broker.port, driven=driven)
    device = bundle_client(broker.port, tmp_path / "cam-1", "cam-1")
    observer = Observer(home, broker.port).start()
    try:
        verifier.wait_connected(10)
        verifier.subscribe(topics.any_device(topics.EVIDENCE))
        device.wait_connected(10)
        # many small messages (several per TLS record) and large ones (several records each)
        sizes = [1 + (i * 37) % 700 for i in range(400)] + [60_000, 20_000, 5]
        sent = [os.urandom(size) for size in sizes]
        for payload in sent:
            device.publish(topics.device_topic("cam-1", topics.EVIDENCE), payload, wait=False)
        got = _receive_all(verifier, len(sent))
        assert [m.payload for m in got] == sent
        # and the other way: results queued without waiting, then one waited for
        result_topic = topics.device_topic("cam-1", topics.RESULT)
        for i in range(200):
            verifier.publish(result_topic, f"result {i}".encode(), wait=False)
        verifier.publish(result_topic, b"last", retain=True)
        assert observer.client is not None
        results = [m.payload for m in _receive_all(observer.client, 201) if m.topic == result_topic]
        assert results == [f"result {i}".encode() for i in range(200)] + [b"last"]
    finally:
        for c in (verifier, device):
            c.stop()
        observer.stop()


def test_a_driven_client_reconnects_and_keeps_its_session(broker: Broker, tmp_path: Path) -> None:
    home = broker.home
    enroll_device(home, "cam-1", tmp_path / "cam-1")
    verifier = _verifier_client(home, broker.port, driven=True)
    try:
        verifier.wait_connected(10)
        verifier.subscribe(topics.any_device(topics.EVIDENCE))
        broker.stop()
        for _ in range(10):  # pumping while the broker is away raises nothing
            assert verifier.receive(0.05) is None
        assert not verifier.connected.is_set()
        broker.start()
        verifier.wait_connected(30)  # pumps: the back-off is short at first
        device = bundle_client(broker.port, tmp_path / "cam-1", "cam-1")
        device.wait_connected(10)
        device.publish(topics.device_topic("cam-1", topics.EVIDENCE), b"after the restart")
        device.stop()
        assert [m.payload for m in _receive_all(verifier, 1)] == [b"after the restart"]
    finally:
        verifier.stop()


@pytest.mark.parametrize("driven", [False, True], ids=["threaded", "driven"])
def test_a_clean_stop_sends_its_disconnect_so_the_will_stays_unpublished(
    broker: Broker, tmp_path: Path, driven: bool
) -> None:
    home = broker.home
    bundle = tmp_path / "cam-1"
    enroll_device(home, "cam-1", bundle)
    status = topics.device_topic("cam-1", topics.STATUS)
    observer = Observer(home, broker.port).start()
    tls = bundle / "tls"
    settings = MqttSettings(
        "localhost",
        broker.port,
        tls / "ca.pem",
        tls / "client.pem",
        tls / "client.key",
        "cam-1",
        will=Will(status, b"gone", retain=False),
    )
    device = MqttClient(settings, driven=driven).start()
    device.wait_connected(10)
    device.stop()  # a DISCONNECT left in a buffer would make the broker publish the will
    try:
        assert observer.client is not None
        time.sleep(1.0)
        seen = [m for m in _receive_all(observer.client, 1, timeout=1) if m.topic == status]
        assert seen == []
    finally:
        observer.stop()


@pytest.mark.parametrize("driven", [False, True], ids=["threaded", "driven"])
def test_a_backlog_larger_than_the_inbox_arrives_whole(
    broker: Broker, tmp_path: Path, driven: bool
) -> None:
    """Coming back to a queued backlog many times its inbox, which the broker sends at once
    (here: a Receive Maximum above the backlog; Mosquitto restoring a saved session does the
    same whatever it is): the client reads no more than its inbox holds, so a slow consumer
    loses nothing (a message read into a full inbox would be acknowledged and dropped)."""
    home = broker.home
    enroll_device(home, "cam-1", tmp_path / "cam-1")
    settings = _verifier_settings(home, broker.port, inbox_size=20, max_inflight=1000)
    verifier = MqttClient(settings, driven=driven).start()
    verifier.wait_connected(10)
    verifier.subscribe(topics.any_device(topics.EVIDENCE))
    verifier.stop()
    device = bundle_client(broker.port, tmp_path / "cam-1", "cam-1")
    device.wait_connected(10)
    sent = [f"evidence {i}".encode() * 20 for i in range(600)]
    for payload in sent:
        device.publish(topics.device_topic("cam-1", topics.EVIDENCE), payload, wait=False)
    device.publish(topics.device_topic("cam-1", topics.STATUS), b"", wait=True)
    device.stop()
    verifier = MqttClient(settings, driven=driven).start()
    try:
        verifier.wait_connected(10)
        time.sleep(0.5)  # the broker sends what it may at once
        got = _receive_all(verifier, len(sent))
        assert verifier.dropped == 0
        assert [m.payload for m in got] == sent
    finally:
        verifier.stop()


def _publish_packet(topic: bytes, payload: bytes, qos: int, props: bytes) -> bytes:
    mid = b"\x12\x34" if qos else b""
    return len(topic).to_bytes(2, "big") + topic + mid + props + payload


@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize(
    "props", [b"\x00", b"\x02\x01\x01", b"\x8c\x01" + b"\x26\x00\x01k\x00\x01v" * 20]
)
def test_a_publish_read_directly_is_what_paho_decodes(qos: int, props: bytes) -> None:
    """The adapter reads a PUBLISH to its inbox itself (`_BufferedPaho._handle_publish`): the
    topic, payload, retain flag, packet id and QoS paho's own decoder finds; a packet it cannot
    read goes to paho, which refuses it."""
    from paho.mqtt import _packet  # noqa: PLC0415 - only here: paho stays in the adapter
    from paho.mqtt.client import MQTTv5  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415
    from paho.mqtt.exception import MalformedPacket  # noqa: PLC0415

    from strongroom.mqtt import _BufferedPaho  # noqa: PLC0415

    client = _BufferedPaho(CallbackAPIVersion.VERSION2, manual_ack=True, protocol=MQTTv5)
    got: list[tuple[Any, ...]] = []
    client.on_inbound = lambda *args: got.append(args)
    for topic, payload in (
        (b"fleet/cam-1/evidence", b"\x00\xff" * 300),
        ("fleet/ü/x".encode(), b""),
    ):
        header = 0x30 | qos << 1 | 1
        packet = _publish_packet(topic, payload, qos, props)
        client._in_packet.update({"command": header, "packet": bytearray(packet)})
        client._handle_publish()
        want = _packet.decode_publish(header, packet, MQTTv5)
        assert got.pop() == (want.topic.decode(), want.payload, True, want.mid, want.qos)
    client._in_packet.update({"command": 0x32, "packet": bytearray(b"\x00\x09fleet/x")})
    with pytest.raises(MalformedPacket):
        client._handle_publish()
    assert not got
