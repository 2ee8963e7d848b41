"""An install of Strongroom in a fresh virtual environment that every user may run.

Tests need one where processes of other users run the project: the project's own environment may
live where only its owner can go (here its interpreter is a link into /root), and an install
(no extras, not editable) is what a device runs. Built from a Python >= 3.11 whose path others
may use, in a world-traversable temporary directory, from a copy of the sources (the checkout
itself may be unreadable to others, and a build must not write into it) or from a wheel built
from such a copy. `floors()` reads setup.cfg's base requirements, so that an install check can
pin each to its declared floor.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from strongroom.cli import OWN_PACKAGES

PROJECT = Path(__file__).resolve().parents[1]
PACKAGES = tuple(sorted(OWN_PACKAGES))
PROJECT_FILES = ("setup.cfg", "pyproject.toml", "README.md")
CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3", "/usr/bin/python3.11")
# The base install alone runs every device command (agent run|invoke, enclave run, the platform
# and enclave processes): tests/test_install.py proves it with each base requirement at its floor.
BASE_EXTRAS: tuple[str, ...] = ()
PIP_TIMEOUT_S = 300  # one pip run on a cold cache
# pytest's own timeout (120 s in pyproject.toml) covers a test's fixtures too: a test that builds
# an install (a wheel, then virtual environments, one pip run each) needs this one instead.
INSTALL_TIMEOUT_S = 3 * PIP_TIMEOUT_S + 300
needs_install = pytest.mark.timeout(INSTALL_TIMEOUT_S)
_FLOOR = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*([^;]*)")


def _requirements(section: str, key: str) -> list[str]:
    parser = configparser.ConfigParser(comment_prefixes=("#",), inline_comment_prefixes=None)
    parser.read(PROJECT / "setup.cfg")
    lines = parser[section][key].splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def base_requirements() -> list[str]:
    """setup.cfg's `install_requires`, one requirement a line, comments dropped."""
    return _requirements("options", "install_requires")


def extra_requirements(extra: str) -> list[str]:
    """setup.cfg's requirements of `extra`."""
    return _requirements("options.extras_require", extra)


def requirement_name(requirement: str) -> str:
    """The distribution a requirement names, normalised (lower case, `-` for `_` and `.`)."""
    match = _FLOOR.match(requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def floors() -> list[str]:
    """`name==floor` for each base requirement, its floor being its `>=` bound; a base
    requirement without one is an error (its lowest release would be whatever pip finds)."""
    pinned = []
    for requirement in base_requirements():
        match = _FLOOR.match(requirement)
        assert match, requirement
        name, spec = match.group(1), match.group(2)
        lower = [part.strip()[2:] for part in spec.split(",") if part.strip().startswith(">=")]
        if len(lower) != 1:
            raise ValueError(f"base requirement {requirement!r} declares no floor (>=)")
        pinned.append(f"{name}=={lower[0].strip()}")
    return pinned


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


def copy_sources(dest: Path) -> Path:
    """What a build of the project reads, copied to `dest` (made here)."""
    dest.mkdir()
    for name in PROJECT_FILES:
        shutil.copy2(PROJECT / name, dest / name)
    for package in PACKAGES:
        shutil.copytree(
            PROJECT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return dest


def _pip(python: Path, *args: str, cwd: Path) -> None:
    argv = [str(python), "-m", "pip", "--disable-pip-version-check", *args]
    done = subprocess.run(
        argv, capture_output=True, text=True, check=False, cwd=cwd, timeout=PIP_TIMEOUT_S
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args[:1])} failed:\n{done.stderr[-3000:]}")


def build_wheel(root: Path, python: Path) -> Path:
    """The project's wheel, built with `pip wheel` from a copy of the sources into `root/dist`."""
    src = copy_sources(root / "wheel-src")
    dist = root / "dist"
    _pip(python, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist), str(src), cwd=root)
    shutil.rmtree(src)
    (wheel,) = dist.glob("strongroom-*.whl")
    return wheel


def build_device_venv(
    root: Path,
    python: Path,
    *,
    extras: tuple[str, ...] = BASE_EXTRAS,
    requirements: tuple[str, ...] = (),
    constraints: Sequence[str] = (),
    wheel: Path | None = None,
) -> DeviceVenv:
    """`pip install` Strongroom, not editable, into `root/venv`: the `wheel` if given, else a
    copy of the sources; with `extras` and `requirements` (none by default: exactly the base
    install), every package held to `constraints` (e.g. `floors()`)."""
    venv = root / "venv"
    subprocess.run([str(python), "-m", "venv", str(venv)], check=True, capture_output=True)
    src = None if wheel is not None else copy_sources(root / "src")
    target = str(wheel if wheel is not None else src)
    if extras:
        target += f"[{','.join(extras)}]"
    args = ["install", "--quiet", target, *requirements]
    if constraints:
        held = root / "constraints.txt"
        held.write_text("".join(f"{line}\n" for line in constraints))
        args += ["--constraint", str(held)]
    python_in_venv = venv / "bin" / "python"
    try:
        _pip(python_in_venv, *args, cwd=root)
    finally:
        if src is not None:
            shutil.rmtree(src)
    return DeviceVenv(root, python_in_venv)


@pytest.fixture(scope="session")
def device_venv() -> Iterator[DeviceVenv]:
    """A fresh virtual environment with Strongroom's base install (no extras, not editable,
    the newest releases setup.cfg allows) that every user may run. Its users need
    `needs_install` (pytest's timeout covers this fixture's pip run)."""
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
