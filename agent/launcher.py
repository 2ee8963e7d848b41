"""How the platform and enclave processes are started: as the agent's own user, or by the
privileged launcher under users of their own.

- `DirectLauncher`: the host starts the platform itself and the platform starts the enclave
  (one user for all three; the only mode an unprivileged agent has).
- `SeparatedLauncher`: the client of the launcher process (`agent.launcher_main`), which the agent
  starts while it is still root and keeps after dropping its own privileges. The launcher starts
  the platform as the platform's user when the host asks, and the enclave as the enclave's user
  when that platform asks; nothing else. Descriptors travel over its sockets (SCM_RIGHTS).

Both spawn the same fixed command lines, defined here once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Protocol

from agent.channel import Channel, ChannelClosed, ChannelError, Message, check
from strongroom import bundle
from strongroom.errors import EnvironmentFault

ENCLAVE_ENV = {"LC_ALL": "C.UTF-8"}
LAUNCHER_TIMEOUT_S = 30.0
ENCLAVE_STOP_GRACE_S = 3.0
MAX_LAUNCHER_FRAME = 4096  # the launcher's requests and replies are a few fields each


class SeparationError(EnvironmentFault):
    """Privilege separation is missing where it is required."""

    hint = (
        "start the agent as root so it can run the platform and the enclave under users of "
        "their own, or pass --no-privilege-separation to accept running them as the agent's user"
    )


class SeparationFault(SeparationError):
    """Privilege separation could not be set up or failed (the agent is root)."""

    hint = "fix the machine's set-up, or pass --no-privilege-separation to run all as one user"


# -- the fixed command lines ---------------------------------------------------------------------


def platform_command(platform_dir: str, host_fd: int, enclave_fd: int, *extra: int) -> list[str]:
    return [
        sys.executable,
        "-I",
        "-B",
        "-m",
        "agent.platform_main",
        platform_dir,
        str(host_fd),
        str(enclave_fd),
        *(str(fd) for fd in extra),
    ]


def enclave_command(platform_fd: int, host_fd: int) -> list[str]:
    return [sys.executable, "-I", "-B", "-m", "agent.bootstrap", str(platform_fd), str(host_fd)]


def spawn_enclave_process(
    platform_fd: int,
    host_fd: int,
    *,
    show_stderr: bool,
    user: int | None = None,
    group: int | None = None,
) -> subprocess.Popen[bytes]:
    """The enclave loader with an empty environment, `/` as working directory, no stdio (stderr
    kept for debug images) and only its two channel descriptors; as `user` when given (root only),
    so it has that uid from its first instruction."""
    return subprocess.Popen(
        enclave_command(platform_fd, host_fd),
        pass_fds=(platform_fd, host_fd),
        close_fds=True,
        env=dict(ENCLAVE_ENV),
        cwd="/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=None if show_stderr else subprocess.DEVNULL,
        user=user,
        group=group,
        extra_groups=[] if user is not None else None,
        umask=0o077,
    )


def stop_process(proc: subprocess.Popen[bytes], grace: float, *, terminate: bool) -> int:
    """Wait up to `grace` s for `proc` to exit (after SIGTERM if `terminate`), then kill it."""
    if proc.poll() is None and terminate:
        proc.terminate()
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# -- descriptors over a channel ------------------------------------------------------------------


class FdChannel:
    """A `Channel` whose messages may carry descriptors (sent right after the frame)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.chan = sock, Channel(sock, max_frame=MAX_LAUNCHER_FRAME)

    def send(self, msg: Message, fds: tuple[int, ...] = ()) -> None:
        self.chan.send(msg)
        if fds:
            try:
                socket.send_fds(self.sock, [b"\x00"], list(fds))
            except OSError as e:
                raise ChannelClosed(f"channel closed while sending: {e.strerror}") from e

    def recv_fds(self, count: int, timeout: float = LAUNCHER_TIMEOUT_S) -> list[int]:
        try:
            self.sock.settimeout(timeout)
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 1, count)
        except OSError as e:
            raise ChannelClosed(f"no descriptors on the channel: {e.strerror or e}") from e
        if data != b"\x00" or len(fds) != count:
            for fd in fds:
                os.close(fd)
            raise ChannelError(f"expected {count} descriptors")
        return list(fds)

    def request(self, msg: Message, fds: tuple[int, ...] = ()) -> Message:
        self.send(msg, fds)
        reply = self.chan.recv(timeout=LAUNCHER_TIMEOUT_S)
        if reply["op"] == "error":
            raise SeparationFault(f"the launcher refused: {str(reply.get('reason'))[:300]}")
        return reply

    def close(self) -> None:
        self.chan.close()


# -- what the host and the platform hold -----------------------------------------------------


class ChildProcess(Protocol):
    """A platform or enclave process, however it was started."""

    @property
    def pid(self) -> int: ...

    def stop(self, grace: float) -> int:
        """Wait up to `grace` seconds for it to exit, then kill it; its exit status."""
        ...


class Launcher(Protocol):
    separated: bool

    def start_platform(self, host_fd: int, enclave_fd: int) -> ChildProcess: ...

    def close(self) -> None: ...


class _Child:
    """A process this process started itself."""

    def __init__(self, proc: subprocess.Popen[bytes], *, terminate: bool) -> None:
        self._proc, self._terminate = proc, terminate

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stop(self, grace: float) -> int:
        return stop_process(self._proc, grace, terminate=self._terminate)


def spawn_enclave_directly(platform_fd: int, host_fd: int, *, show_stderr: bool) -> ChildProcess:
    proc = spawn_enclave_process(platform_fd, host_fd, show_stderr=show_stderr)
    return _Child(proc, terminate=True)


class DirectLauncher:
    """The platform as a child of the host, under the host's own user."""

    separated = False

    def __init__(self, bundle_dir: Path) -> None:
        self._platform_dir = (bundle_dir / bundle.PLATFORM_DIR).absolute()

    def start_platform(self, host_fd: int, enclave_fd: int) -> ChildProcess:
        argv = platform_command(str(self._platform_dir), host_fd, enclave_fd)
        # Out of the terminal's process group from its first instruction, as the separated
        # launcher's children are: a Ctrl-C reaches the agent alone, never a platform still
        # starting its interpreter (it ignores SIGINT only once agent.platform_main runs). The
        # enclave it starts joins its group. The platform still dies with the agent
        # (PR_SET_PDEATHSIG, agent.hardening), and the host stops it on its way out.
        proc = subprocess.Popen(
            argv, pass_fds=(host_fd, enclave_fd), stdin=subprocess.DEVNULL, process_group=0
        )
        # the host asks the platform to shut down over its channel before it stops it
        return _Child(proc, terminate=False)

    def close(self) -> None:
        pass


class _LaunchedProcess:
    """A process the privileged launcher started; stopping it is the launcher's job."""

    def __init__(self, chan: FdChannel, lock: threading.Lock, op: str, pid: int) -> None:
        self._chan, self._lock, self._op, self._pid = chan, lock, op, pid

    @property
    def pid(self) -> int:
        return self._pid

    def stop(self, grace: float) -> int:
        with self._lock:
            try:
                reply = self._chan.request({"op": self._op, "pid": self._pid, "grace": grace})
                return int(check(reply, {"pid": int, "returncode": int})["returncode"])
            except ChannelError:
                return -1  # the launcher is gone, and its children with it (parent-death signal)


class SeparatedLauncher:
    """The host's side of the privileged launcher."""

    separated = True

    def __init__(self, chan: FdChannel, proc: subprocess.Popen[bytes]) -> None:
        self._chan, self._proc, self._lock = chan, proc, threading.Lock()

    @classmethod
    def start(
        cls, platform_dir_fd: int, platform: tuple[int, int], enclave: tuple[int, int]
    ) -> SeparatedLauncher:
        """Start the launcher (the caller is root): it starts platforms as `platform` (uid, gid)
        with `platform_dir_fd` as their directory, and their enclaves as `enclave` (uid, gid)."""
        ours, theirs = socket.socketpair()
        argv = [
            sys.executable,
            "-I",
            "-B",
            "-m",
            "agent.launcher_main",
            str(theirs.fileno()),
            str(platform_dir_fd),
            *(str(n) for n in (*platform, *enclave)),
        ]
        try:
            proc = subprocess.Popen(
                argv,
                pass_fds=(theirs.fileno(), platform_dir_fd),
                close_fds=True,
                env=dict(ENCLAVE_ENV),
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                # out of the terminal's process group: Ctrl-C reaches the agent alone, which then
                # stops the enclave (after it wipes itself) and the platform in order
                start_new_session=True,
            )
        except OSError as e:
            ours.close()
            raise SeparationFault(f"cannot start the privileged launcher: {e.strerror}") from e
        finally:
            theirs.close()
        launcher = cls(FdChannel(ours), proc)
        try:
            check(launcher._chan.request({"op": "hello"}), {"pid": int})
        except ChannelError as e:
            launcher.close()
            raise SeparationFault(f"the privileged launcher did not start: {e}") from e
        return launcher

    def start_platform(self, host_fd: int, enclave_fd: int) -> ChildProcess:
        with self._lock:
            try:
                reply = self._chan.request({"op": "start_platform"}, (host_fd, enclave_fd))
                pid = int(check(reply, {"pid": int})["pid"])
            except ChannelError as e:
                raise SeparationFault(f"the privileged launcher failed: {e}") from e
        return _LaunchedProcess(self._chan, self._lock, "stop_platform", pid)

    def close(self) -> None:
        """Close the launcher's channel: it stops every process it started, then exits."""
        self._chan.close()
        try:
            self._proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            # it runs as root: an agent that dropped its privileges cannot kill it, and it dies
            # with us anyway (parent-death signal)
            with contextlib.suppress(PermissionError):
                self._proc.kill()


class EnclaveSpawner:
    """The platform's side of the launcher: its own channel, good for one enclave."""

    def __init__(self, fd: int) -> None:
        self._chan, self._lock = FdChannel(socket.socket(fileno=fd)), threading.Lock()

    def spawn(self, platform_fd: int, host_fd: int, *, show_stderr: bool) -> ChildProcess:
        with self._lock:
            try:
                reply = self._chan.request(
                    {"op": "start_enclave", "show_stderr": show_stderr}, (platform_fd, host_fd)
                )
                pid = int(check(reply, {"pid": int})["pid"])
            except ChannelError as e:
                raise SeparationFault(f"the privileged launcher failed: {e}") from e
        return _LaunchedProcess(self._chan, self._lock, "stop_enclave", pid)
