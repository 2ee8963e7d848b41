"""No message stops the agent: whatever a handler raises while handling one message is logged and
the daemon goes on. The daemon is built on a real enrolled bundle; its MQTT client is never
started. (The protocol's own handling of bad input is in tests/test_device_protocol.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.daemon import AgentDaemon
from provisioning.enroll import enroll_device
from provisioning.home import FleetHome
from strongroom import messages, topics
from strongroom.mqtt import Inbound
from tests.fleet import offline_agent_config


def _daemon(tmp_path: Path, fleet_home: FleetHome) -> AgentDaemon:
    bundle = tmp_path / "cam-a"
    enroll_device(fleet_home, "cam-a", bundle)
    return AgentDaemon(offline_agent_config(tmp_path, bundle))


def test_a_defect_met_by_one_message_is_logged_and_the_agent_goes_on(
    tmp_path: Path, fleet_home: FleetHome, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = _daemon(tmp_path, fleet_home)

    def broken(payload: bytes, now: float) -> None:
        raise KeyError("a defect in the handler")

    monkeypatch.setattr(daemon.protocol, "_on_keys", broken)
    response = messages.KeyResponse(b"n" * 32, (), ()).encode()
    msg = Inbound(topics.device_topic("cam-a", topics.KEYS_RESPONSE), response, False)
    with capture_logs() as logs:
        daemon.handle(msg)  # does not raise
        daemon.handle(Inbound(topics.device_topic("cam-a", topics.CHALLENGE), b"\xff", False))
    events = [(e["event"], e.get("error")) for e in logs]
    assert ("message_failed", "KeyError") in events
    assert ("message_rejected", None) in events  # the malformed challenge, an input error
