"""Privilege separation on the device. An agent started as root runs the platform and the enclave
under system users of their own and becomes the agent's user; a process of the agent's user then
reads neither the platform's secrets nor the platform's or the enclave's memory, not even in the
moment after they start, before they harden themselves. An agent that is not root refuses
production images unless told to accept running them as its own user.

The attacker always runs with the credentials the agent itself has once it runs (read from
/proc), so against an agent that keeps one user for everything (today's code as root: every
process root) the very same attacks succeed. Everything is real: Mosquitto, the verifier, the
agent from an installed copy of Strongroom that other users may run (tests/device_venv.py).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.host import EnclaveHost, HostConfig
from agent.launcher import SeparatedLauncher, SeparationError, SeparationFault
from agent.privsep import (
    AGENT_USER,
    ENCLAVE_USER,
    PLATFORM_USER,
    Account,
    Accounts,
    DeviceUsers,
    prepare_bundle,
    resolve_accounts,
)
from strongroom import bundle
from tests.device_venv import DeviceVenv, needs_install
from tests.enclave_env import DeviceEnv
from tests.fleet import Fleet, Proc, cli, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux /proc"),
    needs_install,  # the device venv's pip run is within this module's first test's time
]
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the agent separates privileges only when it starts as root"
)
PLATFORM_FILES = ("root-secret", "attestation.key", "counters.json", "profile.json")

# Run by the attacker, as the agent's user: read files, read /proc/PID/mem, ptrace-attach.
_ATTACKER = textwrap.dedent(
    """
    import ctypes, errno, json, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    PTRACE_ATTACH, PTRACE_SEIZE = 16, 0x4206

    def failure(code):
        return errno.errorcode.get(code, str(code))

    def read(path):
        try:
            with open(path, "rb") as f:
                f.read()
            return "read"
        except OSError as e:
            return failure(e.errno)

    def memory(pid):
        try:
            with open(f"/proc/{pid}/maps") as f:
                start = int(f.readline().split("-")[0], 16)
            with open(f"/proc/{pid}/mem", "rb") as f:
                f.seek(start)
                f.read(16)
            return "read"
        except OSError as e:
            return failure(e.errno)

    def trace(request, pid):
        if libc.ptrace(request, pid, None, None) == 0:
            return "attached"
        return failure(ctypes.get_errno())

    asked = json.loads(sys.argv[1])
    found = {"files": {p: read(p) for p in asked["files"]}, "pids": {}}
    for pid in asked["pids"]:
        seen = {"mem": memory(pid), "seize": trace(PTRACE_SEIZE, pid)}
        # one tracer at a time: after a successful seize, attaching again proves nothing new
        seen["attach"] = "attached" if seen["seize"] == "attached" else trace(PTRACE_ATTACH, pid)
        found["pids"][str(pid)] = seen
    print(json.dumps(found))
    """
)

# A test-only site hook: it holds a starting platform or enclave interpreter before any Strongroom
# code runs (so before PR_SET_DUMPABLE) until the test releases it. That is the window the
# finding's attacker raced for, held open so that the attack does not depend on timing.
_HOLD_HOOK = textwrap.dedent(
    """
    import os, time

    def _hold(where):
        if not os.path.exists(os.path.join(where, "armed")):
            return
        try:
            with open("/proc/self/cmdline", "rb") as f:
                argv = f.read().split(b"\\0")
        except OSError:
            return
        roles = {b"agent.bootstrap": "enclave", b"agent.platform_main": "platform"}
        role = next((roles[a] for a in argv if a in roles), None)
        if role is None:
            return
        pid = os.getpid()
        open(os.path.join(where, f"{role}.{pid}"), "w").close()
        deadline = time.monotonic() + 120  # only if the test died: never hold for good
        while not os.path.exists(os.path.join(where, f"release.{pid}")):
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)

    _hold(WHERE)
    """
)


@dataclass(frozen=True)
class Creds:
    uid: int
    gid: int


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def creds_of(pid: int) -> Creds:
    status = _status(pid)
    return Creds(int(status["Uid"].split()[0]), int(status["Gid"].split()[0]))


def descendants(pid: int) -> dict[int, tuple[int, str]]:
    """pid -> (uid, command line) of every live descendant of `pid`."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat_line = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat_line.rsplit(")", 1)[1].split()[1])
    found: dict[int, tuple[int, str]] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                try:
                    cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
                    found[child] = (creds_of(child).uid, cmd.decode(errors="replace"))
                except OSError:
                    continue
                frontier.append(child)
    return found


def role_pid(agent_pid: int, module: str) -> int:
    pids = [p for p, (_uid, cmd) in descendants(agent_pid).items() if f"-m {module} " in cmd]
    assert len(pids) == 1, f"expected one {module} under the agent, found {pids}"
    return pids[0]


def as_user(creds: Creds, argv: list[str]) -> list[str]:
    """`argv` with exactly these credentials (root stays root, as an agent that kept it is)."""
    if creds == Creds(os.geteuid(), os.getegid()):
        return argv
    ids = [f"--reuid={creds.uid}", f"--regid={creds.gid}", "--clear-groups"]
    return [shutil.which("setpriv") or "setpriv", *ids, "--", *argv]


def attack(
    venv: DeviceVenv, creds: Creds, *, files: tuple[Path, ...] = (), pids: tuple[int, ...] = ()
) -> dict[str, Any]:
    request = json.dumps({"files": [str(f) for f in files], "pids": list(pids)})
    argv = as_user(creds, [str(venv.python), "-I", "-c", _ATTACKER, request])
    done = subprocess.run(argv, capture_output=True, text=True, check=True, cwd="/", timeout=30)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


class Hold:
    """Arms the hold hook in the device venv (see _HOLD_HOOK) and hands held processes over."""

    def __init__(self, venv: DeviceVenv, where: Path) -> None:
        self.where, self.seen = where, set[int]()
        where.mkdir(exist_ok=True)
        where.chmod(0o1777)  # the platform's and the enclave's users write their pid files here
        site = venv.site_packages
        self.files = (site / "_sr_test_hold.py", site / "_sr_test_hold.pth")
        self.files[0].write_text(_HOLD_HOOK.replace("WHERE", repr(str(where))))
        self.files[1].write_text("import _sr_test_hold\n")

    def arm(self) -> None:
        (self.where / "armed").touch()

    def disarm(self) -> None:
        (self.where / "armed").unlink(missing_ok=True)

    def wait(self, role: str) -> int:
        def held() -> int | None:
            pids = {int(p.name.split(".")[1]) for p in self.where.glob(f"{role}.*")} - self.seen
            return pids.pop() if pids else None

        pid: int = wait_until(held, 30, f"a held {role} process")
        self.seen.add(pid)
        return pid

    def release(self, pid: int) -> None:
        (self.where / f"release.{pid}").touch()

    def remove(self) -> None:
        self.disarm()
        for path in self.files:
            path.unlink(missing_ok=True)


@dataclass
class Separated:
    venv: DeviceVenv
    fleet: Fleet
    bundle: Path
    agent: Proc
    creds: Creds  # the agent's, as it runs
    held: dict[str, dict[str, Any]]  # what the attacker got from the freshly started processes


def _invoke(bundle_dir: Path) -> subprocess.CompletedProcess[str]:
    argv = cli("agent", "invoke", "--bundle", str(bundle_dir), "vendor:echo", "1")
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def hold(device_venv: DeviceVenv) -> Iterator[Hold]:
    where = Path(tempfile.mkdtemp(prefix="sr-hold-", dir="/tmp"))
    made = Hold(device_venv, where)
    try:
        yield made
    finally:
        made.remove()
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="module")
def separated(device_venv: DeviceVenv, hold: Hold) -> Iterator[Separated]:
    """A fleet and one agent started as root from the device venv, without any opt-out; the
    attacker hit its platform and its enclave while the hold hook kept each at its start."""
    if os.geteuid() != 0:
        pytest.skip("the agent separates privileges only when it starts as root")
    root = Path(tempfile.mkdtemp(prefix="sr-privsep-", dir="/tmp"))
    root.chmod(0o711)  # the agent's user must reach the bundle, as under /var/lib on a device
    fleet = Fleet(root)
    try:
        fleet.start()
        bundle_dir = fleet.enroll("sep-1")
        hold.arm()
        argv = device_venv.cli("agent", "run", "--bundle", str(bundle_dir))
        agent = Proc([*argv, "--broker", fleet.broker.url], root / "agent-sep-1.log")
        fleet.agents["sep-1"] = agent  # stopped with the fleet
        platform_pid = hold.wait("platform")
        creds = creds_of(agent.p.pid)  # the platform started: the agent is done setting up
        held = {"platform": attack(device_venv, creds, pids=(platform_pid,))}
        hold.release(platform_pid)
        enclave_pid = hold.wait("enclave")
        held["enclave"] = attack(device_venv, creds, pids=(enclave_pid,))
        hold.release(enclave_pid)
        hold.disarm()
        assert fleet.observer is not None
        fleet.observer.wait_result("sep-1", "affirming")
        wait_until(lambda: _invoke(bundle_dir).returncode == 0, 30, "the agent's first answer")
        yield Separated(device_venv, fleet, bundle_dir, agent, creds, held)
    finally:
        hold.disarm()
        fleet.stop()
        shutil.rmtree(root, ignore_errors=True)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@needs_root
def test_an_agent_started_as_root_runs_each_role_under_its_own_user(separated: Separated) -> None:
    users = {name: pwd.getpwnam(name) for name in (AGENT_USER, PLATFORM_USER, ENCLAVE_USER)}
    agent = users[AGENT_USER]
    assert separated.creds == Creds(agent.pw_uid, agent.pw_gid)
    assert _status(separated.agent.p.pid)["Groups"].split() in ([], [str(agent.pw_gid)])
    assert int(_status(separated.agent.p.pid)["CapEff"], 16) == 0
    pid = separated.agent.p.pid
    uids = {
        module: descendants(pid)[role_pid(pid, module)][0]
        for module in ("agent.launcher_main", "agent.platform_main", "agent.bootstrap")
    }
    assert uids == {
        "agent.launcher_main": 0,  # the one root process left: it only starts the two below
        "agent.platform_main": users[PLATFORM_USER].pw_uid,
        "agent.bootstrap": users[ENCLAVE_USER].pw_uid,
    }
    platform_dir = separated.bundle / bundle.PLATFORM_DIR
    assert platform_dir.stat().st_uid == users[PLATFORM_USER].pw_uid
    assert _mode(platform_dir) == 0o700
    for name in PLATFORM_FILES:
        assert (platform_dir / name).stat().st_uid == users[PLATFORM_USER].pw_uid
        assert _mode(platform_dir / name) == 0o600
    assert (separated.bundle / bundle.TLS_KEY_FILE).stat().st_uid == agent.pw_uid
    assert list((separated.bundle / "state" / "sealed").glob("*.blob"))  # the keys were sealed
    answer = _invoke(separated.bundle)
    assert (answer.returncode, json.loads(answer.stdout)) == (0, {"echo": 1})


@needs_root
def test_the_agents_user_cannot_read_the_platforms_secrets(separated: Separated) -> None:
    platform_dir = separated.bundle / bundle.PLATFORM_DIR
    sealed = sorted((separated.bundle / "state" / "sealed").glob("*.blob"))
    own = (separated.bundle / bundle.TLS_KEY_FILE, *sealed)
    files = tuple(platform_dir / name for name in PLATFORM_FILES)
    found = attack(separated.venv, separated.creds, files=(*files, *own))["files"]
    assert {f: found[str(f)] for f in own} == {f: "read" for f in own}  # the attacker can read
    assert {f: found[str(f)] for f in files} == {f: "EACCES" for f in files}


@needs_root
def test_the_agents_user_cannot_trace_or_read_the_running_platform_or_enclave(
    separated: Separated,
) -> None:
    pid = separated.agent.p.pid
    targets = (role_pid(pid, "agent.platform_main"), role_pid(pid, "agent.bootstrap"))
    control = subprocess.Popen(as_user(separated.creds, ["sleep", "60"]))
    try:
        # setpriv changes ids, then execs sleep (until then, the kernel keeps it undumpable)
        cmdline = Path(f"/proc/{control.pid}/cmdline")
        wait_until(lambda: cmdline.read_bytes() == b"sleep\x0060\x00", 10, "the control process")
        assert creds_of(control.pid) == separated.creds
        found = attack(separated.venv, separated.creds, pids=(control.pid, *targets))["pids"]
    finally:
        control.kill()
        control.wait()
    # a process of the agent's user is the attacker's to trace and read
    assert found[str(control.pid)] == {"mem": "read", "seize": "attached", "attach": "attached"}
    denied = {"mem": "EACCES", "seize": "EPERM", "attach": "EPERM"}
    assert {t: found[str(t)] for t in targets} == {t: denied for t in targets}


@needs_root
def test_the_agents_user_cannot_attach_to_a_platform_or_enclave_before_it_hardens_itself(
    separated: Separated,
) -> None:
    """The finding: PTRACE_SEIZE on a freshly started enclave, before PR_SET_DUMPABLE ran. The
    hold hook kept each process at its start while the attacker tried."""
    denied = {"mem": "EACCES", "seize": "EPERM", "attach": "EPERM"}
    for role in ("platform", "enclave"):
        (result,) = separated.held[role]["pids"].values()
        assert result == denied, role


# -- without root ---------------------------------------------------------------------------------


@needs_root
def test_without_separation_the_agents_user_wins_as_the_threat_model_says(
    device_env: DeviceEnv, device_venv: DeviceVenv, hold: Hold
) -> None:
    """The finding's set-up, accepted with --no-privilege-separation by an unprivileged agent:
    the same attacker reads the root secret and attaches to the fresh platform and enclave. (So
    the attacks above fail because of the separation, not because the attacker cannot attack.)"""
    device_env.build("prod")
    account = device_accounts().agent
    creds = Creds(account.uid, account.gid)
    root = _unprivileged_copy(device_env, account)
    argv = device_venv.cli(
        *("enclave", "run", "vendor:echo", "1", "--no-privilege-separation"),
        *("--bundle", str(root / "bundle"), "--image", str(root / "prod.img")),
        *("--state", str(root / "state")),
    )
    hold.arm()
    run = subprocess.Popen(as_user(creds, argv), cwd="/", stderr=subprocess.PIPE, text=True)
    try:
        secret = root / "bundle" / bundle.ROOT_SECRET_FILE
        platform_pid = hold.wait("platform")
        found = attack(device_venv, creds, files=(secret,), pids=(platform_pid,))
        hold.release(platform_pid)
        enclave_pid = hold.wait("enclave")
        found["pids"].update(attack(device_venv, creds, pids=(enclave_pid,))["pids"])
        hold.release(enclave_pid)
        hold.disarm()
        _out, err = run.communicate(timeout=60)
    finally:
        hold.disarm()
        run.kill()
        run.wait()
        shutil.rmtree(root, ignore_errors=True)
    assert found["files"] == {str(secret): "read"}
    assert {pid: seen["seize"] for pid, seen in found["pids"].items()} == {
        str(platform_pid): "attached",
        str(enclave_pid): "attached",
    }
    assert "not in any loaded code artifact" in err  # it ran: nothing refused it


def test_a_host_without_separation_refuses_a_production_image_and_says_why(
    device_env: DeviceEnv,
) -> None:
    image = device_env.build("prod")
    config = HostConfig(bundle=device_env.bundles["dev-a"], state_dir=device_env.root / "st")
    with EnclaveHost(config) as host, pytest.raises(SeparationError) as caught:
        host.start(image)
    message = caught.value.diagnostics()
    assert "production enclave image refused" in message
    assert "--no-privilege-separation" in message and "\n" not in message
    assert host.enclave is None


def device_accounts() -> Accounts:
    return resolve_accounts(DeviceUsers())  # as root: created when missing


def _unprivileged_copy(env: DeviceEnv, account: Account | None) -> Path:
    """A copy of dev-a's bundle (and the production image, if built) in a directory every user
    may pass, given to `account` if one is named."""
    root = Path(tempfile.mkdtemp(prefix="sr-unpriv-", dir="/tmp"))
    root.chmod(0o711)
    shutil.copytree(env.bundles["dev-a"], root / "bundle")
    if "prod" in env.images:
        shutil.copy(env.images["prod"], root / "prod.img")
    if account is not None:
        for path in (root, *root.rglob("*")):
            os.chown(path, account.uid, account.gid, follow_symlinks=False)
    return root


def test_an_unprivileged_agent_refuses_production_images_unless_told_to_accept(
    device_env: DeviceEnv, device_venv: DeviceVenv
) -> None:
    device_env.build("prod")
    account = device_accounts().agent if os.geteuid() == 0 else None
    root = _unprivileged_copy(device_env, account)
    creds = Creds(account.uid, account.gid) if account else Creds(os.getuid(), os.getgid())
    try:
        argv = device_venv.cli(
            "enclave",
            "run",
            "vendor:echo",
            "1",
            "--bundle",
            str(root / "bundle"),
            "--image",
            str(root / "prod.img"),
            "--state",
            str(root / "state"),
        )
        refused = subprocess.run(
            as_user(creds, argv), capture_output=True, text=True, cwd="/", check=False
        )
        accepted = subprocess.run(
            as_user(creds, [*argv, "--no-privilege-separation"]),
            capture_output=True,
            text=True,
            cwd="/",
            check=False,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    errors = [line for line in refused.stderr.splitlines() if "error" in line]
    assert refused.returncode == 3, refused.stderr
    assert len(errors) == 1 and "production enclave image refused" in errors[0]
    assert "--no-privilege-separation" in errors[0]
    # accepted: the enclave starts; nothing is loaded, so the entry point is unknown
    assert accepted.returncode == 1, accepted.stderr
    assert "not in any loaded code artifact" in accepted.stderr


def _others_cannot_run(python: Path) -> bool:
    return any(not p.stat().st_mode & stat.S_IXOTH for p in python.resolve().parents)


@needs_root
@pytest.mark.skipif(
    not _others_cannot_run(Path(sys.executable)),
    reason="needs a project interpreter that other users cannot run (as under /root)",
)
def test_as_root_an_installation_the_other_users_cannot_run_is_refused_before_any_change(
    device_env: DeviceEnv,
) -> None:
    bundle_dir = device_env.bundles["dev-a"]
    argv = cli(
        *("enclave", "run", "vendor:echo", "1", "--bundle", str(bundle_dir)),
        *("--image", str(device_env.images["debug"]), "--state", str(device_env.root / "st")),
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert done.returncode == 3, done.stderr
    assert len(errors) == 1 and "cannot use" in errors[0], errors
    assert "--no-privilege-separation" in errors[0]
    assert (bundle_dir / bundle.ROOT_SECRET_FILE).stat().st_uid == 0  # nothing was given away


@needs_root
def test_the_launcher_starts_no_enclave_for_the_host_and_stops_only_its_own_platforms(
    device_env: DeviceEnv,
) -> None:
    """The host's channel to the root launcher, spoken to directly as a hostile host would."""
    accounts = device_accounts()
    platform_fd = os.open(device_env.bundles["dev-a"] / bundle.PLATFORM_DIR, os.O_RDONLY)
    try:
        p, e = accounts.platform, accounts.enclave
        launcher = SeparatedLauncher.start(platform_fd, (p.uid, p.gid), (e.uid, e.gid))
    finally:
        os.close(platform_fd)
    chan = launcher._chan  # the raw protocol is what is under test
    ends = socket.socketpair()
    try:
        with pytest.raises(SeparationFault, match="no such platform"):
            chan.request({"op": "stop_platform", "pid": 1, "grace": 0.0})
        with (
            (device_env.root / "not-a-socket").open("wb") as f,
            pytest.raises(SeparationFault, match="must be sockets"),
        ):
            chan.request({"op": "start_platform"}, (f.fileno(), f.fileno()))
        with pytest.raises(SeparationFault, match="unknown request 'start_enclave'"):
            fds = (ends[0].fileno(), ends[1].fileno())
            chan.request({"op": "start_enclave", "show_stderr": False}, fds)
    finally:
        for end in ends:
            end.close()
        launcher.close()
    assert launcher._proc.returncode == 0  # it exited when its channel closed


# -- giving the bundle away ---------------------------------------------------------------------


@needs_root
def test_root_gives_the_bundle_away_without_following_links_planted_in_it(
    device_env: DeviceEnv,
) -> None:
    accounts = device_accounts()
    root = _unprivileged_copy(device_env, None)
    try:
        bundle_dir = root / "bundle"
        outside = root / "root-only"
        outside.write_bytes(b"root's")
        outside.chmod(0o600)
        (bundle_dir / "link").symlink_to(outside)
        (bundle_dir / "state").mkdir()
        os.link(outside, bundle_dir / "state" / "hardlink")
        (bundle_dir / bundle.PLATFORM_DIR / "escape").symlink_to(outside)
        os.close(prepare_bundle(bundle_dir, bundle_dir / "state", accounts))
        assert (outside.stat().st_uid, _mode(outside)) == (0, 0o600)
        assert (bundle_dir / bundle.TLS_KEY_FILE).stat().st_uid == accounts.agent.uid
        assert (bundle_dir / bundle.ROOT_SECRET_FILE).stat().st_uid == accounts.platform.uid
    finally:
        shutil.rmtree(root, ignore_errors=True)


@needs_root
def test_the_agents_user_cannot_swap_the_platform_directory_for_a_decoy(
    device_env: DeviceEnv,
) -> None:
    """Once given the bundle, could the agent's user rename `platform/` and put a decoy in its
    place, the next start would give the decoy to the platform and the real secrets to the agent.
    The bundle directory stays root's, and another role's entries are never given away."""
    accounts = device_accounts()
    root = _unprivileged_copy(device_env, None)
    try:
        bundle_dir = root / "bundle"
        os.close(prepare_bundle(bundle_dir, bundle_dir / "state", accounts))
        assert (bundle_dir.stat().st_uid, _mode(bundle_dir)) == (0, 0o755)
        agent = Creds(accounts.agent.uid, accounts.agent.gid)
        rename = "import os, sys; os.rename(sys.argv[1], sys.argv[2])"
        moved = bundle_dir / "p2"
        swap = subprocess.run(
            as_user(
                agent, ["/usr/bin/python3", "-c", rename, str(bundle_dir / "platform"), str(moved)]
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        assert swap.returncode != 0 and "PermissionError" in swap.stderr
        # as if it had got there anyway (an older layout): the real one is left to the platform
        os.rename(bundle_dir / bundle.PLATFORM_DIR, moved)
        decoy = bundle_dir / bundle.PLATFORM_DIR
        decoy.mkdir()
        os.chown(decoy, accounts.agent.uid, accounts.agent.gid)
        os.close(prepare_bundle(bundle_dir, bundle_dir / "state", accounts))
        secret = moved / Path(bundle.ROOT_SECRET_FILE).name
        assert (moved.stat().st_uid, secret.stat().st_uid) == (accounts.platform.uid,) * 2
    finally:
        shutil.rmtree(root, ignore_errors=True)


@needs_root
def test_an_installation_a_role_could_change_is_refused(tmp_path: Path) -> None:
    """The launcher runs the installed code as the platform's user (and as root at the next
    start): a file or directory of it that one of the roles may write is refused."""
    from agent.privsep import _writable_by_roles  # noqa: PLC0415 - the check under test

    accounts = device_accounts()
    package = tmp_path / "site" / "strongroom"
    package.mkdir(parents=True)
    module = package / "platform_main.py"
    module.write_text("")
    assert _writable_by_roles([package], accounts) is None
    os.chown(module, accounts.agent.uid, accounts.agent.gid)
    assert _writable_by_roles([package], accounts) == module
    os.chown(module, 0, 0)
    package.chmod(0o777)
    assert _writable_by_roles([package], accounts) == package
