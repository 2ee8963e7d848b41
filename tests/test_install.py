"""Strongroom installed the way its users install it: the wheel, into fresh virtual environments.

A device gets the base install alone (`pip install strongroom`), with every base requirement at
its declared floor; the fleet gets `strongroom[fleet]` alone, with the newest releases setup.cfg
allows (cbor2 6 among them). Each side then runs only from its own environment, against a real
Mosquitto with the fleet's generated TLS and ACL config: the fleet is set up, the device enrolls,
attests, gets its keys and answers `agent invoke`, and `status` shows it trusted; Ctrl-C stops
the agent and its children without a traceback, and `enclave run` answers from the keys the agent
sealed. A runtime import that setup.cfg does not declare, or a floor that is not real, fails here.
"""

from __future__ import annotations

import ast
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.version import Version

from provisioning.broker import scratch_state_dir
from strongroom.cli import OWN_PACKAGES
from tests.device_venv import (
    INSTALL_TIMEOUT_S,
    PIP_TIMEOUT_S,
    PROJECT,
    DeviceVenv,
    base_requirements,
    build_device_venv,
    build_wheel,
    extra_requirements,
    find_base_python,
    floors,
    needs_install,
    requirement_name,
)
from tests.fleet import Proc, children_of, free_port, require_mosquitto, wait_until

pytestmark = [pytest.mark.integration, needs_install]

# Imported by name, not installed: the enclave image's own measured policy module.
NOT_DISTRIBUTIONS = frozenset({"enclave_policy"})
# Imported only where an extra is needed, and only when used (the enclave's ONNX models).
LAZY_EXTRAS = {"onnxruntime": "onnx"}
FLEET_ONLY = ("tomlkit", "aiomqtt", "starlette", "psycopg", "uvicorn", "rich", "amqtt")


@dataclass(frozen=True)
class Installs:
    device: DeviceVenv  # the base install, each base requirement at its floor
    fleet: DeviceVenv  # strongroom[fleet], the newest releases allowed
    root: Path


@pytest.fixture(scope="module")
def installs() -> Iterator[Installs]:
    # no other user runs these installs: any Python >= 3.11 with venv will do
    python = find_base_python() or Path(sys.base_prefix) / "bin" / "python3"
    root = Path(tempfile.mkdtemp(prefix="sr-install-", dir="/tmp"))
    try:
        root.chmod(0o755)
        wheel = build_wheel(root, python)
        for side in ("device", "fleet"):
            (root / side).mkdir()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # pip waits on I/O half the time
            device = pool.submit(
                build_device_venv, root / "device", python, wheel=wheel, constraints=floors()
            )
            fleet = pool.submit(
                build_device_venv, root / "fleet", python, extras=("fleet",), wheel=wheel
            )
            yield Installs(device.result(), fleet.result(), root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(venv: DeviceVenv, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        venv.cli(*args), capture_output=True, text=True, timeout=60, check=False, cwd="/"
    )
    if check and done.returncode != 0:
        raise AssertionError(f"strongroom {' '.join(args[:2])} failed: {done.stderr[-2000:]}")
    return done


def _python(venv: DeviceVenv, code: str) -> str:
    done = subprocess.run(
        [str(venv.python), "-I", "-c", code], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def _installed(venv: DeviceVenv) -> dict[str, str]:
    code = (
        "import json; from importlib import metadata as m\n"
        "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))"
    )
    found: dict[str, str] = json.loads(_python(venv, code))
    return found


def _third_party_imports(package: str) -> dict[str, set[str]]:
    """Top-level module -> files of `package` that import it, for modules that are neither the
    standard library nor Strongroom's own."""
    found: dict[str, set[str]] = {}
    for path in (PROJECT / package).rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in OWN_PACKAGES | {"__future__"}:
                    found.setdefault(top, set()).add(str(path.relative_to(PROJECT)))
    return found


def _declared(extra: str | None) -> set[str]:
    """Distributions setup.cfg declares for the base install, or for `extra`."""
    requirements = base_requirements() if extra is None else extra_requirements(extra)
    return {requirement_name(r) for r in requirements}


@pytest.mark.parametrize(
    ("packages", "extra"),
    [(("strongroom", "agent"), None), (("provisioning", "verifier", "device_sim"), "fleet")],
    ids=["device", "fleet"],
)
def test_every_third_party_import_is_a_declared_dependency(
    packages: tuple[str, ...], extra: str | None
) -> None:
    distributions = metadata.packages_distributions()
    allowed = _declared(None) | (_declared(extra) if extra else set())
    undeclared = {}
    for package in packages:
        for module, files in _third_party_imports(package).items():
            if module in NOT_DISTRIBUTIONS or module in LAZY_EXTRAS:
                continue
            dists = {requirement_name(d) for d in distributions.get(module, [module])}
            if not dists & allowed:
                undeclared[module] = sorted(files)
    assert undeclared == {}, f"imported but not declared in setup.cfg ({extra or 'base'})"


def test_the_install_checks_outlast_their_pip_runs(request: pytest.FixtureRequest) -> None:
    """The module fixture runs pip for the wheel, then for two installs side by side: pytest's
    timeout, which covers it, must outlast them (a cold pip cache took longer than 120 s)."""
    marker = request.node.get_closest_marker("timeout")
    assert marker is not None and marker.args[0] == INSTALL_TIMEOUT_S
    assert INSTALL_TIMEOUT_S > 2 * PIP_TIMEOUT_S


@pytest.mark.parametrize(("module", "extra"), sorted(LAZY_EXTRAS.items()))
def test_a_lazily_imported_module_is_declared_by_its_extra(module: str, extra: str) -> None:
    """The import check above skips these: their extra must declare them instead."""
    distributions = metadata.packages_distributions().get(module, [module])
    assert {requirement_name(d) for d in distributions} & _declared(extra), (module, extra)


def test_every_base_requirement_declares_a_floor() -> None:
    assert len(floors()) == len(base_requirements())


class _Broker:
    """`strongroom broker run` from the fleet's install, its state outside the fleet home."""

    def __init__(self, fleet: DeviceVenv, home: Path, logs: Path) -> None:
        self.port = free_port()
        self.state = scratch_state_dir("sr-install-broker-")
        argv = fleet.cli("broker", "run", "--home", str(home), "--port", str(self.port))
        self.proc = Proc([*argv, "--state-dir", str(self.state)], logs / "broker.log")
        wait_until(self._accepting, 20, "the broker to listen")

    def _accepting(self) -> bool:
        if self.proc.p.poll() is not None:
            raise AssertionError(f"the broker exited: {self.proc.log()[-2000:]}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.state.parent, ignore_errors=True)


class _ProcessGroup(Proc):
    """A process leading a process group of its own, as a shell's foreground job does."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("ab")
        self.p = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _interrupt_as_a_terminal_does(agent: Proc) -> None:
    """Ctrl-C: SIGINT to the agent's whole process group (its platform and enclave run in one of
    their own); every one stops, none with a traceback."""
    platform = children_of(agent.p.pid)
    assert platform, "the agent's platform process is not running"
    enclave = [pid for parent in platform for pid in children_of(parent)]
    assert enclave, "the enclave process is not running"
    os.killpg(agent.p.pid, signal.SIGINT)
    assert agent.p.wait(30) in (0, 130)  # 130: `strongroom: interrupted`

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def gone() -> bool:
        return not any(running(pid) for pid in platform + enclave)

    wait_until(gone, 10, "the agent's platform and enclave to stop")


def _set_up_fleet(fleet: DeviceVenv, work: Path) -> tuple[Path, Path]:
    """A fleet home, a production image, a sealed code artifact and one enrolled device's
    bundle carrying both, all made with the fleet's install; returns (home, bundle)."""
    home, src, image = work / "home", work / "enclave-src", work / "enclave.img"
    _run(fleet, "fleet", "init", str(home))
    _run(fleet, "enclave", "source", str(src), "--home", str(home))
    _run(
        fleet, "enclave", "build", str(src), "--home", str(home), "--svn", "1", "--out", str(image)
    )
    code, sealed = work / "vendor.py", work / "vendor.sra"
    code.write_text("def echo(x):\n    return {'echo': x}\n")
    seal = ["--name", "vendor", "--version", "1", "--kind", "code", "--out", str(sealed)]
    _run(fleet, "artifact", "seal", str(code), "--home", str(home), *seal)
    bundle = work / "cam-1"
    _run(fleet, "device", "enroll", "cam-1", "--home", str(home), "--out", str(bundle))
    shutil.copy(image, bundle / "enclave.img")
    (bundle / "artifacts").mkdir(exist_ok=True)
    shutil.copy(sealed, bundle / "artifacts" / sealed.name)
    return home, bundle


def test_a_base_install_runs_a_device_against_a_fleet_install(installs: Installs) -> None:
    require_mosquitto()
    device, fleet = installs.device, installs.fleet
    on_device, on_fleet = _installed(device), _installed(fleet)
    for line in floors():
        name, floor = line.split("==")
        assert Version(on_device[name]) == Version(floor), f"{name} is not at its floor"
    assert [name for name in FLEET_ONLY if name in on_device] == []  # a device install is small
    assert Version(on_fleet["cbor2"]).major == 6  # the fleet decodes with cbor2 6, the device 5
    refused = _run(device, "fleet", "init", str(installs.root / "nowhere"), check=False)
    assert refused.returncode == 3 and "strongroom[fleet]" in refused.stderr

    work = installs.root / "run"
    work.mkdir(mode=0o755)
    home, bundle = _set_up_fleet(fleet, work)
    broker = _Broker(fleet, home, work)
    url = f"mqtts://localhost:{broker.port}"
    sockets = Path(tempfile.mkdtemp(prefix="sr-", dir="/tmp"))
    sock = sockets / "cam-1.sock"
    procs: list[Proc] = [broker.proc]
    try:
        verifier = Proc(
            fleet.cli("verifier", "run", "--home", str(home), "--broker", url),
            work / "verifier.log",
        )
        procs.append(verifier)
        wait_until(lambda: "verifier_started" in verifier.log(), 20, "the verifier to start")
        agent = _ProcessGroup(
            device.cli(
                "agent",
                "run",
                "--bundle",
                str(bundle),
                "--broker",
                url,
                "--socket",
                str(sock),
                "--no-privilege-separation",  # privilege separation: test_privilege_separation
            ),
            work / "agent.log",
        )
        procs.append(agent)

        def answered() -> subprocess.CompletedProcess[str] | None:
            assert agent.p.poll() is None, f"the agent exited: {agent.log()[-3000:]}"
            argv = ["agent", "invoke", "--bundle", str(bundle), "--socket", str(sock)]
            done = _run(device, *argv, "vendor:echo", '{"a": 1}', check=False)
            return done if done.returncode == 0 else None

        done = wait_until(answered, 45, "the device's protected code to answer")
        assert json.loads(done.stdout) == {"echo": {"a": 1}}
        assert "key_released" in verifier.log()
        argv = ["status", "--home", str(home), "--broker", url, "--json", "--settle", "3"]
        rows = json.loads(_run(fleet, *argv).stdout)["devices"]
        assert [(r["device"], r["result"]) for r in rows] == [("cam-1", "affirming")]
        _interrupt_as_a_terminal_does(agent)
        # `enclave run`, the other device command, from the keys the agent sealed on the device
        argv = ["enclave", "run", "--bundle", str(bundle), "--image", str(bundle / "enclave.img")]
        sealed = bundle / "artifacts" / "vendor.sra"
        argv += ["--state", str(bundle / "state"), "--artifact", str(sealed)]
        once = _run(device, *argv, "--no-privilege-separation", "vendor:echo", '{"b": 2}')
        assert json.loads(once.stdout) == {"echo": {"b": 2}}
    finally:
        for proc in reversed(procs[1:]):
            proc.stop()
        broker.stop()
        shutil.rmtree(sockets, ignore_errors=True)
    for proc in procs:
        assert "Traceback" not in proc.log(), proc.log()[-3000:]
