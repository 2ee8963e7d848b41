"""The verifier's periodic work stays cheap for large fleets: challenges are spread over the
attestation interval (each tick challenges a slice of the devices that are due, longest-waiting
first), and a registry reload parses only the entries that changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioning.enroll import enroll_device
from provisioning.registry import DeviceRecord
from strongroom import messages, topics
from strongroom.mqtt import MqttError
from tests.verifier_rig import Rig
from verifier.operator import REVOKED, set_status

NOW = 1_800_000_000.0


def _challenged(rig: Rig) -> list[str]:
    out = [t.split("/")[1] for t, _p, _r in rig.mqtt.published if t.endswith("/challenge")]
    rig.mqtt.published.clear()
    return out


def test_due_devices_are_challenged_a_slice_per_tick(rig: Rig) -> None:
    for device_id in ("cam-a", "cam-b"):
        rig.store.set_online(device_id, True, NOW)
    interval = 10.0  # two devices, ticks of 0.2 s: one challenge per tick covers them in time
    rig.verifier.challenges.due(NOW, interval)
    first = _challenged(rig)
    rig.verifier.challenges.due(NOW + 0.2, interval)
    second = _challenged(rig)
    assert len(first) == 1 and len(second) == 1 and set(first + second) == {"cam-a", "cam-b"}
    rig.verifier.challenges.due(NOW + 0.4, interval)
    assert _challenged(rig) == []  # both challenged less than an interval ago
    rig.verifier.challenges.due(NOW + interval + 0.1, interval)
    assert _challenged(rig) == first  # the one challenged first is due first again


def test_offline_devices_are_not_challenged(rig: Rig) -> None:
    rig.store.set_online("cam-a", False, NOW)
    rig.verifier.challenges.due(NOW, 10.0)
    assert _challenged(rig) == []


def test_a_device_coming_online_is_challenged_at_once_and_then_not_again_until_due(
    rig: Rig,
) -> None:
    status = messages.Status("online", NOW).encode()
    rig.verifier.handle_status("cam-a", status)
    assert _challenged(rig) == ["cam-a"]
    rig.verifier.challenges.due(rig.verifier.clock() + 1.0, 10.0)
    assert _challenged(rig) == []


def test_a_periodic_challenge_that_could_not_be_sent_is_tried_again_at_the_next_tick(
    rig: Rig,
) -> None:
    rig.store.set_online("cam-a", True, NOW)
    rig.mqtt.fail_on = topics.CHALLENGE  # the broker refuses it (paho's queue, a lost link)
    rig.verifier.challenges.due(NOW, 10.0)
    rig.mqtt.fail_on = ""
    rig.verifier.challenges.due(NOW + 0.2, 10.0)  # not an interval away
    assert _challenged(rig) == ["cam-a"]


def test_a_challenge_asked_for_while_the_broker_is_away_costs_the_device_nothing(
    rig: Rig,
) -> None:
    """Neither a challenge token nor the periodic slot: the next one comes when it can go out."""
    rig.mqtt.connected.clear()
    status = messages.Status("online", NOW).encode()
    for _ in range(int(rig.verifier.config.limits.challenges.burst) + 1):
        with pytest.raises(MqttError):
            rig.verifier.challenge("cam-a", asked_by_device=True)
    with pytest.raises(MqttError):
        rig.verifier.handle_status("cam-a", status)
    assert rig.store.due_for_challenge(rig.verifier.clock(), 10) == ["cam-a"]
    rig.mqtt.connected.set()
    rig.verifier.challenge("cam-a", asked_by_device=True)
    assert _challenged(rig) == ["cam-a"]
    assert rig.verifier.counts.get("challenges_suppressed", 0) == 0


def test_reload_parses_only_registry_entries_new_or_replaced(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[str] = []
    get = rig.verifier.registry.get

    def counting_get(device_id: str) -> DeviceRecord:
        parsed.append(device_id)
        return get(device_id)

    monkeypatch.setattr(rig.verifier.registry, "get", counting_get)
    rig.verifier.reload()
    assert parsed == []  # nothing changed since the verifier started
    enroll_device(rig.home, "cam-c", tmp_path / "cam-c")
    set_status(rig.home, "cam-a", REVOKED, reason="lost", by="operator")
    rig.verifier.reload()
    assert sorted(parsed) == ["cam-a", "cam-c"]
    assert rig.verifier.devices["cam-a"].status == "revoked"
    commands = [t for t, _p, _r in rig.mqtt.published if t.endswith("cam-a/command")]
    assert commands == ["fleet/cam-a/command"]  # the operator's revocation acted on once
    rig.verifier.reload()
    assert sorted(parsed) == ["cam-a", "cam-c"]
