"""Read-only consumer identities against a real Mosquitto: several dashboards at once, none of
which may publish."""

from __future__ import annotations

import time
from pathlib import Path

from provisioning.home import FleetHome, init_home
from strongroom import messages, topics
from strongroom.mqtt import Inbound, MqttClient
from tests.fleet import Broker, free_port, require_mosquitto, verifier_client
from verifier.dashboard.feed import SUBSCRIPTIONS, FeedConfig, consumer_client


def _consumer(home: FleetHome, broker: Broker, instance: int) -> MqttClient:
    client = consumer_client(FeedConfig(home=home, broker=broker.url, instance=instance)).start()
    client.wait_connected(10)
    for topic in SUBSCRIPTIONS:
        client.subscribe(topic)
    return client


def _verifier(home: FleetHome, broker: Broker) -> MqttClient:
    return verifier_client(home, broker.port)


def _until_marker(client: MqttClient, marker: bytes, timeout: float = 20) -> list[Inbound]:
    """What `client` receives up to the marker alert. The broker handles messages in order, so
    anything it let through before the marker has arrived by then."""
    got: list[Inbound] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = client.receive(0.2)
        if msg is None:
            continue
        if msg.payload == marker:
            return got
        got.append(msg)
    raise AssertionError("the marker alert never arrived")


def test_dashboards_with_their_own_identities_stay_connected_together_and_only_read(
    tmp_path: Path,
) -> None:
    require_mosquitto()
    home = init_home(tmp_path / "home")
    broker = Broker(home, free_port(), tmp_path)
    broker.start()
    clients: list[MqttClient] = []
    try:
        clients = [_consumer(home, broker, i) for i in (0, 1, 2)]
        clients.append(_verifier(home, broker))
        *dashboards, verifier = clients
        assert home.dashboard_identity(2)[0] == "_dashboard-2"
        writer = dashboards[1]
        writer.publish(topics.device_topic("cam-1", topics.RESULT), b"forged", retain=True)
        writer.publish(topics.ALERTS, b"forged", wait=True)  # the broker has handled both
        marker = messages.Alert("warning", "cam-1", "marker", time.time()).encode()
        verifier.publish(topics.ALERTS, marker, wait=True)
        for dashboard in dashboards:  # each sees the marker and nothing before it
            assert _until_marker(dashboard, marker) == []  # the ACL dropped both
        # a take-over (two clients with one id) would have disconnected one of them by now: the
        # broker does it when the second connects, before the marker was published
        assert all(c.connected.is_set() for c in clients)
    finally:
        for c in clients:
            c.stop()
        broker.stop()
