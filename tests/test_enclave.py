"""The simulated enclave: measured launch, local attestation, sealing, anti-rollback, faults."""

from __future__ import annotations

import os
import time

import pytest

import agent.host as host_module
from agent.errors import (
    EnclaveCrashedError,
    EnclaveError,
    InvokeError,
    LaunchError,
    LocalAttestationError,
)
from provisioning.home import init_home
from provisioning.seal import seal_artifact
from strongroom.image import load_image
from tests.enclave_env import CODE_MARKER, DeviceEnv


def _flip_byte_of_file(image: bytes, file_bytes: bytes) -> bytes:
    """Change one byte inside one file's content in the image."""
    at = image.index(file_bytes) + len(file_bytes) // 2
    return image[:at] + bytes([image[at] ^ 0x01]) + image[at + 1 :]


# -- launch ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["__main__.py", "enclave_policy.py", "agent/enclave_app/runtime.py"]
)
def test_an_image_with_one_byte_changed_in_any_file_is_refused_at_launch(
    device_env: DeviceEnv, path: str
) -> None:
    image_path = device_env.images["debug"]
    image = image_path.read_bytes()
    content = load_image(image).files[path]
    tampered = device_env.root / "tampered.img"
    tampered.write_bytes(_flip_byte_of_file(image, content))
    with device_env.host("dev-a") as host, pytest.raises(LaunchError, match="MRENCLAVE"):
        host.start(tampered)


def test_the_platform_itself_refuses_a_tampered_image(device_env: DeviceEnv) -> None:
    """The host's early check is a courtesy; the platform measures what it loads on its own."""
    image = device_env.images["debug"].read_bytes()
    tampered = _flip_byte_of_file(image, load_image(image).files["__main__.py"])
    host = device_env.host("dev-a")
    host_load_image = load_image
    host_module.load_image = lambda _data: host_load_image(image)  # type: ignore[assignment]
    try:
        path = device_env.root / "tampered.img"
        path.write_bytes(tampered)
        with pytest.raises(LaunchError, match="platform refused"):
            host.start(path)
    finally:
        host_module.load_image = host_load_image  # type: ignore[assignment]
        host.stop()


def test_a_debug_image_is_refused_by_a_production_configuration(device_env: DeviceEnv) -> None:
    with (
        device_env.host("dev-a", production=True) as host,
        pytest.raises(LaunchError, match="debug"),
    ):
        host.start(device_env.images["debug"])


def test_a_production_image_runs_in_a_production_configuration(device_env: DeviceEnv) -> None:
    image = device_env.build("prod")
    with device_env.host("dev-a", production=True) as host:
        info = host.start(image)
        assert info.report.identity.debug is False
        assert "not_dumpable" in info.hardening and "no_core_dumps" in info.hardening


# -- local attestation -------------------------------------------------------------------------


def test_firmware_below_the_enclave_minimum_fails_local_attestation(device_env: DeviceEnv) -> None:
    image = device_env.build("fw", min_firmware="2.0.0")
    with device_env.host("dev-a") as host, pytest.raises(LocalAttestationError, match="firmware"):
        host.start(image)


def test_a_platform_in_debug_mode_fails_local_attestation_of_a_production_enclave(
    device_env: DeviceEnv,
) -> None:
    device_env.enroll("dev-dbg", debug_platform=True)
    image = device_env.build("prod")
    host = device_env.host("dev-dbg", production=True)
    with host, pytest.raises(LocalAttestationError, match="debug mode"):
        host.start(image)


def test_smt_on_fails_local_attestation_when_the_enclave_policy_denies_it(
    device_env: DeviceEnv,
) -> None:
    device_env.set_profile("dev-a", smt=True)
    image = device_env.build("nosmt", smt="deny")
    with device_env.host("dev-a") as host, pytest.raises(LocalAttestationError, match="SMT"):
        host.start(image)
    device_env.set_profile("dev-a", smt=False)
    with device_env.host("dev-a") as host:
        assert host.start(image).report.claims.smt is False


def test_secure_boot_off_fails_local_attestation(device_env: DeviceEnv) -> None:
    device_env.enroll("dev-nsb", secure_boot=False)
    with device_env.host("dev-nsb") as host, pytest.raises(LocalAttestationError, match="secure"):
        host.start(device_env.images["debug"])


def test_an_enclave_below_an_svn_already_run_on_the_device_is_refused(
    device_env: DeviceEnv,
) -> None:
    newer = device_env.build("svn2", svn=2, debug=True)
    with device_env.host("dev-a") as host:
        host.start(newer)
    with device_env.host("dev-a") as host, pytest.raises(LocalAttestationError, match="SVN"):
        host.start(device_env.images["debug"])


# -- sealing -----------------------------------------------------------------------------------


def _load_fresh(env: DeviceEnv, device: str, image: str, name: str = "vendor@1") -> None:
    art = env.artifacts[name]
    with env.host(device) as host:
        host.start(env.images[image])
        host.load_artifact(art, env.key_for(host, art))


def test_another_device_cannot_unseal_the_blob(device_env: DeviceEnv) -> None:
    _load_fresh(device_env, "dev-a", "debug")
    device_env.enroll("dev-b")
    blob = (device_env.root / "state-dev-a" / "sealed" / "vendor.blob").read_bytes()
    with device_env.host("dev-b") as host:
        host.start(device_env.images["debug"])
        (host.config.state_dir / "sealed").mkdir(parents=True)
        (host.config.state_dir / "sealed" / "vendor.blob").write_bytes(blob)
        with pytest.raises(EnclaveError, match="does not open"):
            host.load_artifact(device_env.artifacts["vendor@1"])


def test_an_enclave_of_another_signer_cannot_unseal_the_blob(device_env: DeviceEnv) -> None:
    _load_fresh(device_env, "dev-a", "debug")
    other = init_home(device_env.root / "other-home")
    image = device_env.build("other-signer", debug=True, home=other)
    with device_env.host("dev-a") as host:
        host.start(image)
        with pytest.raises(EnclaveError, match="does not open"):
            host.load_artifact(device_env.artifacts["vendor@1"])


def test_a_higher_svn_unseals_a_lower_svns_blob(device_env: DeviceEnv) -> None:
    _load_fresh(device_env, "dev-a", "debug")
    newer = device_env.build("svn2", svn=2, debug=True)
    with device_env.host("dev-a") as host:
        host.start(newer)
        host.load_artifact(device_env.artifacts["vendor@1"])
        assert host.invoke("vendor:echo", 1) == {"echo": 1}


def test_a_lower_svn_cannot_unseal_a_higher_svns_blob(device_env: DeviceEnv) -> None:
    """On a fresh device (no SVN floor yet), the platform itself refuses the higher SVN's key."""
    newer = device_env.build("svn2", svn=2, debug=True)
    device_env.images["svn2"] = newer
    _load_fresh(device_env, "dev-a", "svn2")
    device_env.set_profile("dev-a")  # same platform
    counters = device_env.bundles["dev-a"] / "platform" / "counters.json"
    counters.unlink()  # a platform whose SVN floor never saw SVN 2 (e.g. counters rolled back)
    with device_env.host("dev-a") as host:
        host.start(device_env.images["debug"])
        with pytest.raises(EnclaveError, match="cannot derive keys of SVN 2"):
            host.load_artifact(device_env.artifacts["vendor@1"])


def test_a_modified_image_cannot_unseal_a_measurement_bound_blob(device_env: DeviceEnv) -> None:
    first = device_env.build("m1", debug=True, seal_policy="measurement")
    device_env.images["m1"] = first
    _load_fresh(device_env, "dev-a", "m1")
    second = device_env.build("m2", debug=True, seal_policy="measurement", extra={"v.py": "V=2\n"})
    with device_env.host("dev-a") as host:
        host.start(second)
        with pytest.raises(EnclaveError, match="does not open"):
            host.load_artifact(device_env.artifacts["vendor@1"])


def test_a_replayed_older_sealed_blob_is_refused(device_env: DeviceEnv) -> None:
    _load_fresh(device_env, "dev-a", "debug")
    blob_path = device_env.root / "state-dev-a" / "sealed" / "vendor.blob"
    old_blob = blob_path.read_bytes()
    _load_fresh(device_env, "dev-a", "debug")  # a new key delivery re-seals with a new counter
    assert blob_path.read_bytes() != old_blob
    blob_path.write_bytes(old_blob)
    with device_env.host("dev-a") as host:
        host.start(device_env.images["debug"])
        with pytest.raises(EnclaveError, match="stale"):
            host.load_artifact(device_env.artifacts["vendor@1"])


def test_a_corrupt_sealed_blob_gives_a_clear_error(device_env: DeviceEnv) -> None:
    _load_fresh(device_env, "dev-a", "debug")
    (device_env.root / "state-dev-a" / "sealed" / "vendor.blob").write_bytes(b"\xa1garbage")
    with device_env.host("dev-a") as host:
        host.start(device_env.images["debug"])
        with pytest.raises(EnclaveError, match="corrupt"):
            host.load_artifact(device_env.artifacts["vendor@1"])
        assert host.status()["loaded"] == []


# -- anti-rollback -----------------------------------------------------------------------------


def test_an_older_artifact_version_is_refused_after_a_newer_one_ran(device_env: DeviceEnv) -> None:
    v2 = device_env.seal("vendor", b"def echo(x):\n    return x\n", kind="code", version=2)
    with device_env.host("dev-a") as host:
        host.start(device_env.images["debug"])
        host.load_artifact(v2, device_env.key_for(host, v2))
    v1 = device_env.artifacts["vendor@1"]
    with device_env.host("dev-a") as host:
        host.start(device_env.images["debug"])
        with pytest.raises(EnclaveError, match="rollback"):
            host.load_artifact(v1, device_env.key_for(host, v1))


def test_an_artifact_needing_a_higher_svn_is_refused(device_env: DeviceEnv) -> None:
    art = device_env.seal("needs3", b"X = 1\n", kind="code", min_svn=3)
    with device_env.host("dev-a") as host:
        host.start(device_env.images["debug"])
        with pytest.raises(EnclaveError, match="needs enclave SVN 3"):
            host.load_artifact(art, device_env.key_for(host, art))


def test_a_corrupt_artifact_is_refused_and_nothing_is_loaded(device_env: DeviceEnv) -> None:
    good = device_env.artifacts["vendor@1"]
    data = bytearray(good.read_bytes())
    data[-5] ^= 0xFF
    bad = device_env.root / "bad.sra"
    bad.write_bytes(bytes(data))
    with device_env.host("dev-a") as host:
        host.start(device_env.images["debug"])
        with pytest.raises(EnclaveError, match="failed authentication"):
            host.load_artifact(bad, device_env.key_for(host, good))
        assert host.status()["loaded"] == []
        host.load_artifact(good, device_env.key_for(host, good))  # the channel is still in sync
        assert host.status()["loaded"] == ["vendor@1"]


def test_an_artifact_from_another_fleet_is_refused(device_env: DeviceEnv) -> None:
    other = init_home(device_env.root / "other-home")
    src = device_env.root / "foreign.py"
    src.write_text("X = 1\n")
    foreign = device_env.root / "foreign.sra"
    seal_artifact(other, src, foreign, name="vendor", version=1, kind="code")
    with device_env.host("dev-a") as host:
        host.start(device_env.images["debug"])
        with pytest.raises(EnclaveError, match="not by the expected key"):
            host.load_artifact(foreign)


# -- invoke and faults -------------------------------------------------------------------------


@pytest.fixture
def running(device_env: DeviceEnv):  # type: ignore[no-untyped-def]
    code = device_env.artifacts["vendor@1"]
    host = device_env.host("dev-a")
    host.start(device_env.images["debug"])
    host.load_artifact(code, device_env.key_for(host, code))
    yield host
    host.stop()


def test_an_exception_in_protected_code_returns_a_short_reason_without_traceback(running) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvokeError) as caught:
        running.invoke("vendor:fail", None)
    message = str(caught.value)
    assert message == "protected code raised ValueError: bad input"
    with pytest.raises(InvokeError) as caught:
        running.invoke("vendor:syntax", None)
    assert str(caught.value) == "protected code raised SyntaxError"
    assert running.invoke("vendor:echo", "still up") == {"echo": "still up"}


def test_results_that_cannot_cross_the_boundary_are_refused(running) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvokeError, match="not JSON"):
        running.invoke("vendor:not_json", None)
    with pytest.raises(InvokeError, match="exceeds"):
        running.invoke("vendor:huge", None)
    with pytest.raises(InvokeError, match="not in any loaded code artifact"):
        running.invoke("os:getcwd", None)


def test_protected_code_that_runs_too_long_is_stopped_by_the_timer(running) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvokeError, match="timed out"):
        running.invoke("vendor:spin", None, timeout=0.3)
    assert running.invoke("vendor:echo", 2) == {"echo": 2}


def test_a_hung_enclave_is_stopped_and_the_host_keeps_running(
    device_env: DeviceEnv, running
) -> None:  # type: ignore[no-untyped-def]
    pid = running.enclave.pid
    with pytest.raises(EnclaveCrashedError):
        running.invoke("vendor:stubborn", None, timeout=0.2)
    _assert_gone(pid)
    with device_env.host("dev-a") as host:  # the host side carries on with a new enclave
        host.start(device_env.images["debug"])
        host.load_artifact(device_env.artifacts["vendor@1"])
        assert host.invoke("vendor:echo", 3) == {"echo": 3}


def test_a_crashed_enclave_gives_a_clear_error(running) -> None:  # type: ignore[no-untyped-def]
    pid = running.enclave.pid
    with pytest.raises(EnclaveCrashedError):
        running.invoke("vendor:crash", None)
    _assert_gone(pid)
    with pytest.raises(EnclaveError, match="not running"):
        running.invoke("vendor:echo", 1)


def _assert_gone(pid: int) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    os.kill(pid, 0)
    raise AssertionError(f"enclave process {pid} is still running")


def test_shutdown_stops_the_enclave_process(running) -> None:  # type: ignore[no-untyped-def]
    pid = running.enclave.pid
    running.stop()
    _assert_gone(pid)


def test_the_code_marker_never_appears_in_what_the_host_receives(running) -> None:  # type: ignore[no-untyped-def]
    assert running.invoke("vendor:secret_length", None) == len(CODE_MARKER)
