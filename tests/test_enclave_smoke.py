"""The simulated enclave end to end: launch, local attestation, keys, invoke, restart offline."""

from __future__ import annotations

from tests.enclave_env import CODE_MARKER, DeviceEnv


def test_debug_enclave_loads_code_and_model_and_answers(device_env: DeviceEnv) -> None:
    code, model = device_env.artifacts["vendor@1"], device_env.artifacts["model@1"]
    with device_env.host("dev-a") as host:
        host.start(device_env.images["debug"])
        host.load_artifact(code, device_env.key_for(host, code))
        host.load_artifact(model, device_env.key_for(host, model))
        assert host.invoke("vendor:echo", [1, "two"]) == {"echo": [1, "two"]}
        assert host.invoke("vendor:model_size", "model") == 6000 + 24
        assert host.invoke("vendor:model_has_marker", "model") is True


def test_sealed_keys_let_the_same_enclave_restart_offline(device_env: DeviceEnv) -> None:
    code = device_env.artifacts["vendor@1"]
    with device_env.host("dev-a") as host:
        host.start(device_env.images["debug"])
        host.load_artifact(code, device_env.key_for(host, code))
    with device_env.host("dev-a") as host:
        host.start(device_env.images["debug"])
        host.load_artifact(code)  # no key: the sealed blob from the first run
        assert host.invoke("vendor:secret_length", None) == len(CODE_MARKER)
