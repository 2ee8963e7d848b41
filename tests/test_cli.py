"""The `strongroom` command: the provisioning happy path, and one clean line for every error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from provisioning.home import FleetHome
from provisioning.keystore import Keystore
from provisioning.seal import seal_artifact
from strongroom.artifact import MAGIC
from strongroom.cli import EXIT_ENVIRONMENT, EXIT_FAILED, EXIT_USAGE
from strongroom.image import load_image

from .conftest import CliResult, MakeEnclaveSource, RunCli
from .privileges import unprivileged


def assert_clean_error(result: CliResult, exit_code: int | None, mentions: str) -> None:
    """A failed command exits non-zero (`exit_code` if given) with one line on stderr, starting
    "strongroom: error:" and naming `mentions`, and prints nothing on stdout."""
    code, out, err = result
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("strongroom: error: "), err
    assert mentions in err
    assert code != 0
    assert exit_code is None or code == exit_code
    assert out == ""


def ok_json(result: CliResult) -> dict[str, object]:
    code, out, err = result
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert isinstance(doc, dict)
    return doc


@pytest.fixture
def sealed(fleet_home: FleetHome, tmp_path: Path) -> Path:
    """An artifact sealed by `fleet_home`, several chunks long."""
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(1000))
    out = tmp_path / "model.art"
    seal_artifact(fleet_home, src, out, name="model", version=1, kind="model", chunk_size=256)
    return out


# --- happy path ----------------------------------------------------------------------------------


def test_provisioning_happy_path(run_cli: RunCli, tmp_path: Path, enclave_src: Path) -> None:
    home = tmp_path / "fleet"
    created = ok_json(run_cli(["fleet", "init", home]))
    assert created["home"] == str(home)
    assert (home / "fleet.json").is_file()

    enrolled = ok_json(
        run_cli(["device", "enroll", "dev-1", "--home", home, "--out", tmp_path / "dev-1"])
    )
    assert enrolled["device_id"] == "dev-1"
    assert (home / "registry" / "devices" / "dev-1.json").is_file()

    image = tmp_path / "enclave.img"
    built = ok_json(
        run_cli(["enclave", "build", enclave_src, "--home", home, "--svn", "4", "--out", image])
    )
    loaded = load_image(image.read_bytes())
    assert built["mrenclave"] == loaded.mrenclave
    assert built["mrsigner"] == loaded.mrsigner
    assert built["svn"] == 4

    model = tmp_path / "model.bin"
    model.write_bytes(b"weights" * 1000)
    art = tmp_path / "model.art"
    seal_argv = ["artifact", "seal", model, "--home", home, "--name", "model", "--version", "2"]
    sealed = ok_json(run_cli([*seal_argv, "--kind", "model", "--out", art]))
    assert (sealed["name"], sealed["version"], sealed["size"]) == ("model", 2, 7000)

    inspected = ok_json(run_cli(["artifact", "inspect", art, "--home", home]))
    assert inspected["manifest"] == {k: v for k, v in sealed.items() if k != "artifact"}
    assert inspected["signer_trusted"] is True

    _, data_key = Keystore(home / "keystore").unwrap(str(sealed["key_id"]))
    assert bytes(data_key).hex() not in json.dumps([created, enrolled, built, sealed, inspected])


def test_inspect_without_home_reports_the_signer_but_not_trust(
    run_cli: RunCli, sealed: Path, other_fleet_home: FleetHome
) -> None:
    report = ok_json(run_cli(["artifact", "inspect", sealed]))
    assert report["signer_trusted"] is None
    assert report["signer"] != other_fleet_home.verify_key("artifact").fingerprint


# --- error paths ---------------------------------------------------------------------------------


def test_inspecting_a_missing_artifact(run_cli: RunCli, tmp_path: Path) -> None:
    result = run_cli(["artifact", "inspect", tmp_path / "missing.art"])
    assert_clean_error(result, EXIT_USAGE, "artifact not found")


def test_inspecting_a_directory(run_cli: RunCli, tmp_path: Path) -> None:
    result = run_cli(["artifact", "inspect", tmp_path])
    assert_clean_error(result, EXIT_USAGE, "is a directory")


def test_inspecting_an_unreadable_artifact(sealed: Path) -> None:
    sealed.chmod(0)
    argv = unprivileged(
        [sys.executable, "-m", "strongroom.cli", "artifact", "inspect", str(sealed)]
    )
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert_clean_error((done.returncode, done.stdout, done.stderr), EXIT_USAGE, "is not readable")


def _flip_signature(data: bytes) -> bytes:
    header_len = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 4], "big")
    position = len(MAGIC) + 4 + header_len + 10  # inside the manifest signature
    return data[:position] + bytes([data[position] ^ 1]) + data[position + 1 :]


NESTED_HEADER = b"[" * 30_000 + b"]" * 30_000
CORRUPTIONS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "garbage": (lambda data: b"this is not an artifact at all", "bad magic"),
    "empty": (lambda data: b"", "bad magic"),
    "bad magic": (lambda data: b"X" + data[1:], "bad magic"),
    "truncated header": (lambda data: data[:40], "ends inside its header"),
    "truncated body": (lambda data: data[:-5], "the file is incomplete"),
    "trailing data": (lambda data: data + b"\x00", "after its final chunk"),
    "flipped signature": (_flip_signature, "bad strongroom/artifact-manifest/v1 signature"),
    "deeply nested header": (
        lambda data: MAGIC + len(NESTED_HEADER).to_bytes(4, "big") + NESTED_HEADER + bytes(64),
        "artifact manifest",
    ),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_inspecting_a_corrupt_artifact(
    run_cli: RunCli, sealed: Path, fleet_home: FleetHome, corruption: str
) -> None:
    corrupt, mentions = CORRUPTIONS[corruption]
    sealed.write_bytes(corrupt(sealed.read_bytes()))

    result = run_cli(["artifact", "inspect", sealed, "--home", fleet_home.root])
    assert_clean_error(result, EXIT_FAILED, mentions)


def test_inspecting_an_artifact_of_another_fleet(
    run_cli: RunCli, sealed: Path, other_fleet_home: FleetHome
) -> None:
    result = run_cli(["artifact", "inspect", sealed, "--home", other_fleet_home.root])
    assert_clean_error(result, EXIT_FAILED, "not by the expected key")


def test_inspecting_with_a_home_that_is_not_a_fleet_home(
    run_cli: RunCli, sealed: Path, tmp_path: Path
) -> None:
    result = run_cli(["artifact", "inspect", sealed, "--home", tmp_path])
    assert_clean_error(result, EXIT_USAGE, "is not a Strongroom fleet home")


def test_fleet_init_over_an_existing_home(run_cli: RunCli, fleet_home: FleetHome) -> None:
    result = run_cli(["fleet", "init", fleet_home.root])
    assert_clean_error(result, EXIT_USAGE, "already exists")


def test_fleet_init_with_force_over_a_directory_that_is_not_a_fleet_home(
    run_cli: RunCli, tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("keep")
    result = run_cli(["fleet", "init", tmp_path, "--force"])
    assert_clean_error(result, EXIT_USAGE, "not a fleet home")
    assert (tmp_path / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("device_id", ["Dev-1", "_verifier", "../x", "a" * 65])
def test_enrolling_a_bad_device_id(
    run_cli: RunCli, fleet_home: FleetHome, tmp_path: Path, device_id: str
) -> None:
    argv = ["device", "enroll", device_id, "--home", fleet_home.root, "--out", tmp_path / "b"]
    assert_clean_error(run_cli(argv), EXIT_USAGE, "invalid device id")


def test_enrolling_into_an_existing_output(
    run_cli: RunCli, fleet_home: FleetHome, tmp_path: Path
) -> None:
    (tmp_path / "b").mkdir()
    argv = ["device", "enroll", "dev-1", "--home", fleet_home.root, "--out", tmp_path / "b"]
    assert_clean_error(run_cli(argv), EXIT_USAGE, "already exists")


def test_enrolling_a_device_twice_without_force(
    run_cli: RunCli, fleet_home: FleetHome, tmp_path: Path
) -> None:
    base = ["device", "enroll", "dev-1", "--home", fleet_home.root, "--out"]
    ok_json(run_cli([*base, tmp_path / "first"]))
    assert_clean_error(run_cli([*base, tmp_path / "second"]), EXIT_USAGE, "already enrolled")
    ok_json(run_cli([*base, tmp_path / "third", "--force"]))


@pytest.mark.parametrize("firmware", ["1.0", "².0.0"])
def test_enrolling_with_a_malformed_firmware_version(
    run_cli: RunCli, fleet_home: FleetHome, tmp_path: Path, firmware: str
) -> None:
    argv = ["device", "enroll", "dev-1", "--home", fleet_home.root, "--out", tmp_path / "b"]
    assert_clean_error(run_cli([*argv, "--firmware", firmware]), EXIT_USAGE, "invalid firmware")


def test_enrolling_with_a_home_that_does_not_exist(run_cli: RunCli, tmp_path: Path) -> None:
    argv = ["device", "enroll", "dev-1", "--home", tmp_path / "nowhere", "--out", tmp_path / "b"]
    assert_clean_error(run_cli(argv), EXIT_USAGE, "is not a Strongroom fleet home")


def test_a_fleet_home_with_a_corrupt_marker(
    run_cli: RunCli, fleet_home: FleetHome, tmp_path: Path
) -> None:
    (fleet_home.root / "fleet.json").write_bytes(b"{not json")
    argv = ["device", "enroll", "dev-1", "--home", fleet_home.root, "--out", tmp_path / "b"]
    assert_clean_error(run_cli(argv), EXIT_FAILED, "fleet marker is not valid JSON")


def test_sealing_a_missing_file(run_cli: RunCli, fleet_home: FleetHome, tmp_path: Path) -> None:
    argv = ["artifact", "seal", tmp_path / "missing.bin", "--home", fleet_home.root]
    argv += ["--name", "m", "--version", "1", "--kind", "model", "--out", tmp_path / "m.art"]
    assert_clean_error(run_cli(argv), EXIT_USAGE, "file to seal not found")


def test_sealing_with_the_signing_key_missing_from_the_home(
    run_cli: RunCli, fleet_home: FleetHome, tmp_path: Path
) -> None:
    (fleet_home.root / "signing" / "artifact.key").unlink()
    (tmp_path / "m.bin").write_bytes(b"data")
    argv = ["artifact", "seal", tmp_path / "m.bin", "--home", fleet_home.root]
    argv += ["--name", "m", "--version", "1", "--kind", "model", "--out", tmp_path / "m.art"]
    assert_clean_error(run_cli(argv), EXIT_USAGE, "artifact key not found")
    assert not (tmp_path / "m.art").exists()


def test_sealing_into_an_existing_output(
    run_cli: RunCli, fleet_home: FleetHome, sealed: Path, tmp_path: Path
) -> None:
    (tmp_path / "m.bin").write_bytes(b"data")
    argv = ["artifact", "seal", tmp_path / "m.bin", "--home", fleet_home.root]
    argv += ["--name", "m", "--version", "1", "--kind", "model", "--out", sealed]
    assert_clean_error(run_cli(argv), EXIT_USAGE, "already exists")


def test_sealing_into_a_missing_directory(
    run_cli: RunCli, fleet_home: FleetHome, tmp_path: Path
) -> None:
    (tmp_path / "m.bin").write_bytes(b"data")
    argv = ["artifact", "seal", tmp_path / "m.bin", "--home", fleet_home.root]
    argv += ["--name", "m", "--version", "1", "--kind", "model"]
    argv += ["--out", tmp_path / "missing" / "m.art"]
    assert_clean_error(run_cli(argv), EXIT_ENVIRONMENT, "cannot write")


def test_sealing_with_an_invalid_policy(
    run_cli: RunCli, fleet_home: FleetHome, tmp_path: Path
) -> None:
    fleet_home.policy_path.write_text("[keys]\nlease_s = 'forever'\n")
    (tmp_path / "m.bin").write_bytes(b"data")
    argv = ["artifact", "seal", tmp_path / "m.bin", "--home", fleet_home.root]
    argv += ["--name", "m", "--version", "1", "--kind", "model", "--out", tmp_path / "m.art"]
    assert_clean_error(run_cli(argv), EXIT_FAILED, "keys.lease_s")
    assert not (tmp_path / "m.art").exists()


@pytest.mark.parametrize(
    "bad",
    [("--version", "0", "version"), ("--chunk-size", "1", "chunk size"), ("--name", "M", "name")],
    ids=["version", "chunk-size", "name"],
)
def test_sealing_with_a_bad_argument(
    run_cli: RunCli, fleet_home: FleetHome, tmp_path: Path, bad: tuple[str, str, str]
) -> None:
    option, value, mentions = bad
    (tmp_path / "m.bin").write_bytes(b"data")
    args = {"--name": "m", "--version": "1", "--chunk-size": "1024", option: value}
    argv = ["artifact", "seal", tmp_path / "m.bin", "--home", fleet_home.root, "--kind", "model"]
    argv += [*(x for pair in args.items() for x in pair), "--out", tmp_path / "m.art"]
    assert_clean_error(run_cli(argv), EXIT_USAGE, mentions)
    assert not (tmp_path / "m.art").exists()


def test_building_from_a_missing_source(
    run_cli: RunCli, fleet_home: FleetHome, tmp_path: Path
) -> None:
    argv = ["enclave", "build", tmp_path / "nope", "--home", fleet_home.root, "--svn", "1"]
    assert_clean_error(run_cli([*argv, "--out", tmp_path / "e.img"]), EXIT_USAGE, "not found")


def test_building_into_an_existing_output(
    run_cli: RunCli, fleet_home: FleetHome, enclave_src: Path, tmp_path: Path
) -> None:
    (tmp_path / "e.img").write_bytes(b"old")
    argv = ["enclave", "build", enclave_src, "--home", fleet_home.root, "--svn", "1"]
    assert_clean_error(run_cli([*argv, "--out", tmp_path / "e.img"]), EXIT_USAGE, "already exists")


def test_building_with_an_svn_of_zero(
    run_cli: RunCli, fleet_home: FleetHome, enclave_src: Path, tmp_path: Path
) -> None:
    argv = ["enclave", "build", enclave_src, "--home", fleet_home.root, "--svn", "0"]
    assert_clean_error(run_cli([*argv, "--out", tmp_path / "e.img"]), EXIT_USAGE, "SVN")


def test_building_a_source_with_a_symlink(
    run_cli: RunCli, fleet_home: FleetHome, enclave_src: Path, tmp_path: Path
) -> None:
    (enclave_src / "passwd").symlink_to("/etc/passwd")
    argv = ["enclave", "build", enclave_src, "--home", fleet_home.root, "--svn", "1"]
    assert_clean_error(run_cli([*argv, "--out", tmp_path / "e.img"]), EXIT_USAGE, "symbolic link")


def test_building_a_source_with_a_file_name_that_is_not_utf8(
    run_cli: RunCli, fleet_home: FleetHome, make_enclave_source: MakeEnclaveSource, tmp_path: Path
) -> None:
    src = make_enclave_source()
    with open(os.path.join(os.fsencode(src), b"caf\xe9.py"), "wb") as f:
        f.write(b"print('latin-1 name')\n")
    argv = ["enclave", "build", src, "--home", fleet_home.root, "--svn", "1"]
    # A user's odd file name is a refusal with a message, whichever error class names it.
    assert_clean_error(run_cli([*argv, "--out", tmp_path / "e.img"]), None, "")
    assert not (tmp_path / "e.img").exists()


def test_console_script_reports_errors_without_a_traceback(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "strongroom"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "strongroom.cli"]
    env = {k: v for k, v in os.environ.items() if k != "STRONGROOM_DEBUG"}

    proc = subprocess.run(
        [*command, "artifact", "inspect", str(tmp_path / "missing.art")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )

    assert_clean_error((proc.returncode, proc.stdout, proc.stderr), EXIT_USAGE, "not found")
