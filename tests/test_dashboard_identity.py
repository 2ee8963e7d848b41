"""Read-only consumer identities against a real Mosquitto: several dashboards at once, none of
which may publish."""

from __future__ import annotations

import time
from pathlib import Path

from provisioning.home import FleetHome, init_home
from strongroom import topics
from strongroom.mqtt import MqttClient
from tests.fleet import Broker, free_port, require_mosquitto
from verifier.dashboard.feed import SUBSCRIPTIONS, FeedConfig, consumer_client


def _consumer(home: FleetHome, broker: Broker, instance: int) -> MqttClient:
    client = consumer_client(FeedConfig(home=home, broker=broker.url, instance=instance)).start()
    client.wait_connected(10)
    for topic in SUBSCRIPTIONS:
        client.subscribe(topic)
    return client


def test_dashboards_with_their_own_identities_stay_connected_together_and_only_read(
    tmp_path: Path,
) -> None:
    require_mosquitto()
    home = init_home(tmp_path / "home")
    broker = Broker(home, free_port(), tmp_path)
    broker.start()
    clients = []
    try:
        clients = [_consumer(home, broker, i) for i in (0, 1, 2)]
        assert home.dashboard_identity(2)[0] == "_dashboard-2"
        time.sleep(1.0)  # a take-over (same client id) would disconnect one of them by now
        assert all(c.connected.is_set() for c in clients)
        writer = clients[1]
        writer.publish(topics.device_topic("cam-1", topics.RESULT), b"forged", retain=True)
        writer.publish(topics.ALERTS, b"forged")
        time.sleep(0.5)
        assert clients[0].receive(0.2) is None  # the ACL dropped both
        assert all(c.connected.is_set() for c in clients)
    finally:
        for c in clients:
            c.stop()
        broker.stop()
