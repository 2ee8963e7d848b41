"""The platform's quoting function: signed EAT evidence bound to a nonce and the enclave key."""

from __future__ import annotations

import os

import pytest

from agent.errors import EnclaveError
from provisioning.registry import Registry
from strongroom.errors import FormatError, SignatureError
from strongroom.evidence import evidence_kid, verify_evidence
from strongroom.report import key_binding
from tests.enclave_env import DeviceEnv


def test_evidence_is_signed_by_the_device_and_binds_nonce_key_and_artifacts(
    device_env: DeviceEnv,
) -> None:
    registry = Registry(device_env.home.registry_dir)
    code = device_env.artifacts["vendor@1"]
    nonce = os.urandom(32)
    with device_env.host("dev-a") as host:
        info = host.start(device_env.images["debug"])
        host.load_artifact(code, device_env.key_for(host, code))
        first = host.evidence(nonce)
        second = host.evidence(os.urandom(16))
    assert evidence_kid(first) == "dev-a"
    ev = verify_evidence(first, registry.get("dev-a").attestation_key)
    assert ev.device_id == "dev-a" and ev.nonce == nonce
    assert ev.enclave_key == info.public_key
    assert ev.key_binding == key_binding(info.public_key, nonce)
    assert ev.enclave.mrenclave == info.report.identity.mrenclave and ev.enclave.debug is True
    assert [(a.name, a.version) for a in ev.artifacts] == [("vendor", 1)]
    assert ev.firmware == "1.0.0" and ev.platform_debug is False and ev.secure_boot is True
    later = verify_evidence(second, registry.get("dev-a").attestation_key)
    assert later.seq > ev.seq  # per-device sequence numbers only go up


def test_evidence_does_not_verify_with_another_devices_key(device_env: DeviceEnv) -> None:
    device_env.enroll("dev-b")
    with device_env.host("dev-a") as host:
        host.start(device_env.images["debug"])
        token = host.evidence(os.urandom(32))
    other_key = Registry(device_env.home.registry_dir).get("dev-b").attestation_key
    with pytest.raises(SignatureError):
        verify_evidence(token, other_key)
    tampered = bytearray(token)
    tampered[len(tampered) // 2] ^= 0x01
    own_key = Registry(device_env.home.registry_dir).get("dev-a").attestation_key
    with pytest.raises((SignatureError, FormatError)):
        verify_evidence(bytes(tampered), own_key)


def test_a_short_nonce_is_refused(device_env: DeviceEnv) -> None:
    with device_env.host("dev-a") as host:
        host.start(device_env.images["debug"])
        with pytest.raises(EnclaveError, match="nonce"):
            host.evidence(b"short")
