"""One process per bundle: an exclusive `flock` on the bundle directory itself, held for the life
of `agent run` (and of `enclave run`), whatever state directory each was given.

Two agents on one bundle would take each other's MQTT session over and over (the broker makes the
certificate CN the client id), and two platforms on one `platform/counters.json` would each
read-modify-write the monotonic counters (their lock is per process): a counter could go back.
The lock is taken on a descriptor of the bundle directory opened read-only without following a
link: no file is created, and it stays valid when privilege separation gives the directory to
root (0755) and this process becomes the agent's user. The kernel releases it when the holder
exits, however it exits: nothing left on disk is ever a reason to refuse.

Who holds it is read from `/proc/locks` (the kernel's table, which names the holder's PID and the
locked inode) without taking the lock, so `strongroom doctor` cannot make a starting agent
refuse. The agent also writes its PID to STATE/agent.pid, for people and for systems without
`/proc/locks`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Literal

from strongroom.errors import EnvironmentFault
from strongroom.fsutil import atomic_writer

PID_FILE = "agent.pid"
PROC_LOCKS = Path("/proc/locks")
Holder = Literal["agent", "enclave run"]


class AgentRunning(EnvironmentFault):
    """Another process holds this bundle's lock."""

    hint = "stop that agent first (one agent per bundle), or give this one its own bundle"


class EnclaveRunRefused(AgentRunning):
    """`enclave run` on a bundle an agent holds."""

    hint = "stop the agent first, or call the enclave through it (`strongroom agent invoke`)"


class AgentLock:
    """The lock, held while this object is open. Not inherited by child processes."""

    def __init__(self, bundle_dir: Path, fd: int) -> None:
        self.bundle_dir, self._fd = bundle_dir, fd
        self._pid_file: Path | None = None

    @classmethod
    def acquire(
        cls, bundle_dir: Path, state_dir: Path | None = None, *, by: Holder = "agent"
    ) -> AgentLock:
        """Lock `bundle_dir` (never through a symbolic link) or raise AgentRunning naming the
        holder (found in /proc/locks, else in `state_dir`'s PID file)."""
        try:
            fd = os.open(bundle_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise EnvironmentFault(
                f"cannot open the bundle directory {bundle_dir}: {e.strerror}",
                hint="it must be a directory (not a link) that this user may read",
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_of(os.fstat(fd)) or _recorded_pid(state_dir)
            os.close(fd)
            who = f"PID {holder}" if holder else "another process"
            if by == "enclave run":
                raise EnclaveRunRefused(
                    f"an agent is running with this bundle ({who}): {bundle_dir}"
                ) from None
            raise AgentRunning(
                f"another agent or `enclave run` ({who}) is already running with the bundle "
                f"{bundle_dir}"
            ) from None
        except OSError as e:
            os.close(fd)
            raise EnvironmentFault(f"cannot lock {bundle_dir}: {e.strerror}") from e
        return cls(bundle_dir, fd)

    def record_pid(self, state_dir: Path) -> None:
        """Write this process's PID to STATE/agent.pid (removed again by `release`)."""
        path = state_dir / PID_FILE
        with atomic_writer(path) as f:
            f.write(f"{os.getpid()}\n".encode())
        self._pid_file = path

    def release(self) -> None:
        """Give the lock up; the PID file goes first, while no other agent can have written it."""
        if self._pid_file is not None:
            if _read_pid(self._pid_file) == os.getpid():
                with contextlib.suppress(OSError):
                    self._pid_file.unlink()
            self._pid_file = None
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AgentLock:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def holder(bundle_dir: Path) -> int | None:
    """The PID of the process that holds `bundle_dir`'s lock, or None when none does; the lock
    is not taken. Raises OSError when the directory or /proc/locks cannot be read."""
    return _holder_of(os.stat(bundle_dir, follow_symlinks=False), strict=True)


def _holder_of(st: os.stat_result, *, strict: bool = False) -> int | None:
    """The PID /proc/locks names for an exclusive flock on the inode of `st`."""
    try:
        table = PROC_LOCKS.read_text(encoding="ascii", errors="replace")
    except OSError:
        if strict:
            raise
        return None
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in table.splitlines():
        # "12: FLOCK  ADVISORY  WRITE 4321 fe:00:3252371 0 EOF"; waiters have "->" after the number
        fields = line.split()
        if len(fields) < 6 or fields[1:4] != ["FLOCK", "ADVISORY", "WRITE"]:
            continue
        try:
            major, minor, inode = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == want:
                return int(fields[4])
        except ValueError:
            continue
    return None


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _recorded_pid(state_dir: Path | None) -> int | None:
    return _read_pid(state_dir / PID_FILE) if state_dir is not None else None
