"""Remote attestation end to end, against a real Mosquitto with the generated TLS + ACL config,
a real verifier process and real agent processes."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time

import pytest

from agent.enclave_source import write_enclave_source
from agent.host import EnclaveHost, HostConfig
from provisioning.build import build_enclave
from provisioning.seal import seal_artifact
from strongroom import topics
from strongroom.ear import AttestationResult, sign_result, verify_result
from strongroom.errors import SignatureError
from strongroom.mqtt import MqttClient, MqttError
from strongroom.signing import SigningKey
from tests.fleet import Fleet, Observer, bundle_client, cli, wait_until


def test_a_healthy_device_is_affirmed_gets_its_keys_and_answers_invoke(fleet: Fleet) -> None:
    fleet.start()
    fleet.enroll("cam-1")
    fleet.agent("cam-1")
    result = fleet.observer.wait_result("cam-1", "affirming")  # signature checked on the way
    assert result.reasons == () and result.details["svn"] == 1
    done = wait_until(
        lambda: (r := fleet.invoke("cam-1", "vendor:echo", '{"a": 1}')).returncode == 0 and r,
        20,
        "protected code to answer",
    )
    assert json.loads(done.stdout) == {"echo": {"a": 1}}
    assert "key_released" in fleet.verifier.log()


def _no_key_was_released(fleet: Fleet, device_id: str) -> None:
    answer = fleet.invoke(device_id, "vendor:echo", "1")
    assert answer.returncode != 0
    assert "not in any loaded code artifact" in answer.stderr or "revoked" in answer.stderr
    assert "key_released" not in fleet.verifier.log()


def test_firmware_below_the_fleet_minimum_is_contraindicated_and_gets_no_key(
    fleet: Fleet,
) -> None:
    fleet.set_policy('min_firmware = "1.0.0"', 'min_firmware = "2.0.0"')
    fleet.start()
    fleet.enroll("old-fw", firmware="1.5.0")
    fleet.agent("old-fw")
    result = fleet.observer.wait_result("old-fw", "contraindicated")
    assert any("firmware 1.5.0" in r for r in result.reasons)
    assert result.vector["hardware"] == 96
    wait_until(lambda: "key_refused" in fleet.verifier.log(), 10, "the refusal")
    _no_key_was_released(fleet, "old-fw")
    alerts = fleet.observer.alerts()
    assert any(a.device_id == "old-fw" and a.severity == "critical" for a in alerts)


def test_a_debug_platform_running_a_debug_enclave_is_contraindicated(fleet: Fleet) -> None:
    src = fleet.root / "dbg-src"
    write_enclave_source(src, fleet.home.verify_key("artifact"), fleet.home.result_verify_key())
    debug_image = fleet.root / "debug.img"
    build_enclave(fleet.home, src, debug_image, svn=1, debug=True)
    fleet.start()
    fleet.enroll("dbg", debug_platform=True, image=debug_image)
    fleet.agent("dbg", dev=True)
    result = fleet.observer.wait_result("dbg", "contraindicated")
    assert "platform is in debug mode" in result.reasons
    assert "debug enclave image" in result.reasons
    _no_key_was_released(fleet, "dbg")


def test_a_production_enclave_refuses_a_debug_platform_before_attesting(fleet: Fleet) -> None:
    fleet.start()
    fleet.enroll("dbg-prod", debug_platform=True)
    agent = fleet.agent("dbg-prod")
    assert agent.p.wait(30) != 0
    assert "platform is in debug mode" in agent.log()
    assert "Traceback" not in agent.log()


def test_an_enclave_below_the_fleet_minimum_svn_is_contraindicated(fleet: Fleet) -> None:
    fleet.set_policy("min_svn = 1", "min_svn = 2")
    fleet.start()
    fleet.enroll("low-svn")
    fleet.agent("low-svn")
    result = fleet.observer.wait_result("low-svn", "contraindicated")
    assert any("below the fleet minimum 2" in r for r in result.reasons)
    _no_key_was_released(fleet, "low-svn")


def test_a_tampered_image_is_refused_and_nothing_is_released(fleet: Fleet) -> None:
    fleet.start()
    image = bytearray(fleet.image.read_bytes())
    image[-10] ^= 0x01
    tampered = fleet.root / "tampered.img"
    tampered.write_bytes(bytes(image))
    fleet.enroll("tampered", image=tampered)
    agent = fleet.agent("tampered")
    assert agent.p.wait(30) != 0
    assert "MRENCLAVE" in agent.log() and "Traceback" not in agent.log()
    assert fleet.observer.results("tampered") == []


def test_a_rolled_back_artifact_gets_no_key(fleet: Fleet) -> None:
    newer = fleet.root / "vendor2.py"
    newer.write_text("def echo(x):\n    return {'v2': x}\n")
    seal_artifact(
        fleet.home, newer, fleet.root / "vendor-v2.sra", name="vendor", version=2, kind="code"
    )
    fleet.set_policy("vendor = 1", "vendor = 2")  # the operator retires v1
    fleet.start()
    fleet.enroll("rollback")  # the device still carries v1
    fleet.agent("rollback")
    wait_until(lambda: "below the floor v2" in fleet.verifier.log(), 20, "the refusal")
    _no_key_was_released(fleet, "rollback")


def _device_client(fleet: Fleet, device_id: str) -> MqttClient:
    client = bundle_client(fleet.broker.port, fleet.root / device_id, device_id)
    client.wait_connected(10)
    return client


def _evidence_of(fleet: Fleet, device_id: str, count: int) -> list[bytes]:
    """Genuine evidence from the device's own platform and enclave (no agent running)."""
    config = HostConfig(
        bundle=fleet.root / device_id, state_dir=fleet.root / "tap", separation_required=False
    )
    host = EnclaveHost(config)
    with host:
        host.start(fleet.image)
        return [host.evidence(os.urandom(32)) for _ in range(count)]


def test_replayed_evidence_is_rejected_with_an_alert(fleet: Fleet) -> None:
    fleet.start()
    fleet.enroll("cam-r")
    first, second = _evidence_of(fleet, "cam-r", 2)
    client = _device_client(fleet, "cam-r")
    topic = topics.device_topic("cam-r", topics.EVIDENCE)
    try:
        client.publish(topic, first)
        client.publish(topic, second)
        fleet.observer.wait_result("cam-r", "affirming")
        wait_until(lambda: len(fleet.observer.results("cam-r")) == 2, 10, "two results")
        client.publish(topic, first)  # captured earlier, sent again
        wait_until(lambda: any("replay" in a.reason for a in fleet.observer.alerts()), 10, "alert")
        assert len(fleet.observer.results("cam-r")) == 2  # no state change, no new result
    finally:
        client.stop()


def test_evidence_signed_by_another_devices_key_is_rejected(fleet: Fleet) -> None:
    fleet.start()
    fleet.enroll("cam-a")
    fleet.enroll("cam-b")
    (foreign,) = _evidence_of(fleet, "cam-b", 1)
    client = _device_client(fleet, "cam-a")
    try:
        client.publish(topics.device_topic("cam-a", topics.EVIDENCE), foreign)
        wait_until(
            lambda: any("another device" in a.reason for a in fleet.observer.alerts()),
            10,
            "impersonation alert",
        )
        assert fleet.observer.results("cam-a") == [] and fleet.observer.results("cam-b") == []
    finally:
        client.stop()


def test_a_device_cannot_publish_or_read_under_another_devices_topics(fleet: Fleet) -> None:
    fleet.start()
    fleet.enroll("cam-a")
    fleet.enroll("cam-b")
    stolen, genuine = _evidence_of(fleet, "cam-b", 2)
    spy = _device_client(fleet, "cam-a")
    try:
        spy.subscribe(topics.device_topic("cam-b", topics.RESULT))
        spy.subscribe(topics.device_topic("cam-b", topics.CHALLENGE))
        spy.subscribe("fleet/#")
        # cam-a publishes cam-b's genuine evidence on cam-b's topic: the broker drops it
        with contextlib.suppress(MqttError):
            spy.publish(topics.device_topic("cam-b", topics.EVIDENCE), stolen)
        # cam-b's own result, published by the fleet, reaches the dashboard but not cam-a
        owner = _device_client(fleet, "cam-b")
        owner.publish(topics.device_topic("cam-b", topics.EVIDENCE), genuine)
        fleet.observer.wait_result("cam-b", "affirming")
        owner.stop()
        time.sleep(0.5)
        leaked = [m.topic for m in iter(lambda: spy.receive(0.05), None)]
        assert [t for t in leaked if "/cam-b/" in t] == []
        assert fleet.verifier.log().count('"appraised"') == 1  # the spy's publish never arrived
    finally:
        spy.stop()


def test_the_retained_result_verifies_with_the_verifiers_public_key(fleet: Fleet) -> None:
    fleet.start()
    fleet.enroll("cam-1")
    fleet.agent("cam-1")
    fleet.observer.wait_result("cam-1", "affirming")
    late = Observer(fleet.home, fleet.broker.port).start()  # connects after the fact
    try:
        retained = wait_until(lambda: late.results("cam-1"), 10, "the retained result")
        assert retained[-1].status == "affirming"
        forged = AttestationResult("cam-1", "affirming", {}, (), "policy:v1", 0)
        with pytest.raises(SignatureError):
            verify_result(
                sign_result(forged, SigningKey.generate()), fleet.home.result_verify_key()
            )
    finally:
        late.stop()


def _seqs_appraised(fleet: Fleet, device_id: str) -> list[int]:
    out = []
    for line in fleet.verifier.log().splitlines():
        if '"appraised"' in line and f'"device": "{device_id}"' in line:
            out.append(json.loads(line)["seq"])
    return out


def _platform_seq(fleet: Fleet, device_id: str) -> int:
    doc = json.loads((fleet.root / device_id / "platform" / "counters.json").read_bytes())
    return int(doc["values"]["evidence-seq"])


def test_no_evidence_is_lost_across_a_broker_restart_and_an_agent_restart(fleet: Fleet) -> None:
    fleet.start()
    fleet.enroll("cam-1")
    fleet.agent("cam-1", interval=0.5)
    fleet.observer.wait_result("cam-1", "affirming")
    wait_until(lambda: len(_seqs_appraised(fleet, "cam-1")) >= 3, 20, "periodic evidence")
    fleet.observer.stop()
    fleet.broker.stop()  # evidence keeps coming and waits in the agent's outbox
    time.sleep(2.0)
    fleet.agents["cam-1"].stop()  # the agent restarts while the broker is still away
    fleet.agent("cam-1", interval=0.5)
    time.sleep(1.0)
    fleet.broker.start()
    fleet.observer = Observer(fleet.home, fleet.broker.port).start()
    time.sleep(2.0)
    fleet.agents["cam-1"].stop()
    produced = _platform_seq(fleet, "cam-1")
    wait_until(lambda: max(_seqs_appraised(fleet, "cam-1")) >= produced, 20, "the backlog")
    seqs = _seqs_appraised(fleet, "cam-1")
    assert sorted(seqs) == list(range(1, produced + 1))  # every one, once, none lost
    assert fleet.observer.results("cam-1")[-1].status == "affirming"


def test_malformed_messages_are_rejected_with_alerts_and_the_verifier_carries_on(
    fleet: Fleet,
) -> None:
    fleet.start()
    fleet.enroll("fuzzy")
    (genuine,) = _evidence_of(fleet, "fuzzy", 1)
    client = _device_client(fleet, "fuzzy")
    try:
        garbage = {
            topics.EVIDENCE: [b"", b"\xff" * 100, genuine[:-7], b"\xd2\x84" + os.urandom(50)],
            topics.KEYS_REQUEST: [b"not cbor", b"\xa1\x63key\x01"],
            topics.STATUS: [b"\x00\x01", b"\xa1\x65state\x65weird"],
        }
        sent = 0
        for leaf, payloads in garbage.items():
            for payload in payloads:
                client.publish(topics.device_topic("fuzzy", leaf), payload)
                sent += 1
        wait_until(lambda: len(fleet.observer.alerts()) >= sent, 15, "an alert per message")
        assert fleet.verifier.p.poll() is None
        client.publish(topics.device_topic("fuzzy", topics.EVIDENCE), genuine)
        fleet.observer.wait_result("fuzzy", "affirming")
    finally:
        client.stop()
    # an oversized packet is refused by the broker itself (max_packet_size)
    big = _device_client(fleet, "fuzzy")
    try:
        with pytest.raises(MqttError):
            big.publish(
                topics.device_topic("fuzzy", topics.EVIDENCE), os.urandom(200_000), timeout=3
            )
    finally:
        big.stop()
    assert fleet.verifier.p.poll() is None


def test_the_last_will_marks_a_vanished_agent_offline(fleet: Fleet) -> None:
    fleet.start()
    fleet.enroll("cam-w")
    agent = fleet.agent("cam-w")
    wait_until(lambda: "online" in fleet.observer.states("cam-w"), 20, "online status")
    agent.p.kill()  # no goodbye: the broker publishes the will when the connection drops
    wait_until(lambda: fleet.observer.states("cam-w")[-1:] == ["offline"], 60, "offline status")


def test_a_clean_stop_says_offline_and_wipes_the_enclave(fleet: Fleet) -> None:
    fleet.start()
    fleet.enroll("cam-s")
    agent = fleet.agent("cam-s")
    fleet.observer.wait_result("cam-s", "affirming")
    assert agent.stop() == 0
    wait_until(lambda: fleet.observer.states("cam-s")[-1:] == ["offline"], 10, "offline status")
    assert "agent_stopped" in agent.log()


def test_agent_run_with_a_wrong_bundle_fails_with_one_clear_line(fleet: Fleet) -> None:
    argv = cli("agent", "run", "--bundle", str(fleet.root / "nope"), "--broker", "mqtts://x:1")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert (
        done.stderr.strip().startswith("strongroom: error:")
        and "not a device bundle" in done.stderr
    )
    assert "Traceback" not in done.stderr
    bundle = fleet.enroll("cam-u")
    bad_url = cli("agent", "run", "--bundle", str(bundle), "--broker", "http://x")
    done = subprocess.run(bad_url, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2 and "broker URL" in done.stderr
