"""An install of Strongroom in a fresh virtual environment that every user may run.

Tests need one where processes of other users run the project: the project's own environment may
live where only its owner can go (here its interpreter is a link into /root), and an install
(no extras, not editable) is what a device runs. Built once per test session from a Python >= 3.11
whose path others may use, in a world-traversable temporary directory, from a copy of the
sources (the checkout itself may be unreadable to others, and a build must not write into it).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
PACKAGES = ("strongroom", "agent", "provisioning", "verifier", "device_sim")
PROJECT_FILES = ("setup.cfg", "pyproject.toml", "README.md")
CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3", "/usr/bin/python3.11")
# What the device's commands need beyond setup.cfg's base install, until the base install alone
# runs them: cbor2 (imported by agent/channel.py, declared nowhere: the project's environment has
# it only through the test extra's cwt) and the fleet extra (`strongroom`'s CLI imports every
# role's commands, the verifier's and provisioning's among them, even to run `agent run`).
UNDECLARED_DEVICE_REQUIREMENTS = ("cbor2>=5.6",)
CLI_EXTRAS = ("fleet",)


@dataclass(frozen=True)
class DeviceVenv:
    root: Path  # world-traversable
    python: Path

    @property
    def site_packages(self) -> Path:
        out = subprocess.run(
            [str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        )
        return Path(out.stdout.strip())

    def cli(self, *args: str) -> list[str]:
        # -I: the project's checkout (the working directory, PYTHONPATH) stays out of sys.path
        return [str(self.python), "-I", "-m", "strongroom.cli", "--log-level", "info", *args]


def _open_to_others(path: Path) -> bool:
    """Whether any user may reach and execute `path` (every directory on the way o+x)."""
    for candidate in (path, path.resolve()):
        for parent in candidate.parents:
            if not parent.stat().st_mode & stat.S_IXOTH:
                return False
        if not candidate.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def find_base_python() -> Path | None:
    """A Python >= 3.11 with venv and ensurepip that other users may execute."""
    for name in (*CANDIDATES, shutil.which("python3") or "", sys.executable):
        path = Path(name) if name else None
        if path is None or not path.is_file() or not _open_to_others(path):
            continue
        probe = subprocess.run(
            [str(path), "-c", "import sys, venv, ensurepip; assert sys.version_info >= (3, 11)"],
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return path
    return None


def build_device_venv(
    root: Path,
    python: Path,
    *,
    extras: tuple[str, ...] = CLI_EXTRAS,
    requirements: tuple[str, ...] = UNDECLARED_DEVICE_REQUIREMENTS,
) -> DeviceVenv:
    """Copy the sources to `root/src` and `pip install` them, not editable, into `root/venv`,
    with `extras` and `requirements` (pass `()` for both: exactly the base install)."""
    src = root / "src"
    src.mkdir()
    for name in PROJECT_FILES:
        shutil.copy2(PROJECT / name, src / name)
    for package in PACKAGES:
        shutil.copytree(
            PROJECT / package, src / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    venv = root / "venv"
    subprocess.run([str(python), "-m", "venv", str(venv)], check=True, capture_output=True)
    target = f"{src}[{','.join(extras)}]" if extras else str(src)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", target]
    pip += requirements
    done = subprocess.run(pip, capture_output=True, text=True, check=False, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"pip install into the device venv failed:\n{done.stderr[-3000:]}")
    shutil.rmtree(src)
    return DeviceVenv(root, venv / "bin" / "python")


@pytest.fixture(scope="session")
def device_venv() -> Iterator[DeviceVenv]:
    """A fresh virtual environment with Strongroom installed (not editable) that every user
    may run; see `build_device_venv` for what it installs beyond the base install."""
    python = find_base_python()
    if python is None:
        if os.geteuid() == 0:
            pytest.fail("no Python >= 3.11 that other users may run: install python3-venv")
        pytest.skip("no Python >= 3.11 with venv that other users may run")
    root = Path(tempfile.mkdtemp(prefix="sr-device-venv-", dir="/tmp"))
    try:
        root.chmod(0o755)
        yield build_device_venv(root, python)
    finally:
        shutil.rmtree(root, ignore_errors=True)
