"""Shared fixtures: a fresh fleet home, the CLI run in-process, and small enclave source trees."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from provisioning.home import FleetHome, init_home
from strongroom import cli
from tests.device_venv import device_venv  # noqa: F401 - a session fixture shared by modules
from tests.enclave_env import DeviceEnv, make_env
from tests.fleet import Broker, Fleet, free_port, require_mosquitto
from tests.verifier_rig import Rig, make_rig

# A small but realistic enclave: a package with a nested module and a data file.
ENCLAVE_FILES: Mapping[str, bytes] = {
    "main.py": b"from app import model\n\nprint(model.answer())\n",
    "app/__init__.py": b"",
    "app/model.py": b"def answer() -> int:\n    return 42\n",
    "app/weights.bin": bytes(range(256)),
}

CliResult = tuple[int, str, str]
RunCli = Callable[[Sequence[str | os.PathLike[str]]], CliResult]
MakeEnclaveSource = Callable[..., Path]


def write_tree(root: Path, files: Mapping[str, bytes], order: Sequence[str] | None = None) -> Path:
    """Write `files` under `root` in the given order (default: sorted), creating directories."""
    root.mkdir(parents=True, exist_ok=True)
    for rel in order if order is not None else sorted(files):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[rel])
    return root


@pytest.fixture
def fleet_home(tmp_path: Path) -> FleetHome:
    """A freshly initialised fleet home at tmp_path/"home"."""
    return init_home(tmp_path / "home")


@pytest.fixture
def other_fleet_home(tmp_path: Path) -> FleetHome:
    """A second, unrelated fleet with its own keys."""
    return init_home(tmp_path / "other-home")


@pytest.fixture
def make_enclave_source(tmp_path: Path) -> MakeEnclaveSource:
    """Factory: write an enclave source tree (default ENCLAVE_FILES) and return its directory."""

    def make(
        name: str = "enclave-src",
        files: Mapping[str, bytes] = ENCLAVE_FILES,
        order: Sequence[str] | None = None,
    ) -> Path:
        return write_tree(tmp_path / name, files, order)

    return make


@pytest.fixture
def enclave_src(make_enclave_source: MakeEnclaveSource) -> Path:
    return make_enclave_source()


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> RunCli:
    """Run `strongroom.cli.main(argv)` in-process and return (exit code, stdout, stderr)."""

    def run(argv: Sequence[str | os.PathLike[str]]) -> CliResult:
        capsys.readouterr()  # drop anything printed before this command
        try:
            code = cli.main([os.fspath(a) for a in argv])
        except SystemExit as e:  # argparse usage errors and --version exit this way
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def typical_umask() -> Iterator[None]:
    """Run with the common umask 022, so permission tests do not depend on the caller's umask."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def device_env(tmp_path: Path) -> DeviceEnv:
    """A fleet with one enrolled device (dev-a), a debug enclave image and sealed artifacts:
    `vendor` (code with a unique marker) and `model` (bytes with a unique marker)."""
    return make_env(tmp_path)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A real fleet (Mosquitto with the generated config, verifier, agents); `start()` it."""
    f = Fleet(tmp_path)
    yield f
    f.stop()


@pytest.fixture
def rig(tmp_path: Path, fleet_home: FleetHome) -> Rig:
    """A verifier on real evidence with an in-memory MQTT recorder (tests/verifier_rig.py)."""
    return make_rig(tmp_path, fleet_home)


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[Broker]:
    """A Mosquitto for a new fleet home, not yet started (enroll first); stopped afterwards."""
    require_mosquitto()
    b = Broker(init_home(tmp_path / "home"), free_port(), tmp_path)
    yield b
    b.stop()
