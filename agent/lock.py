"""One agent per bundle: an exclusive `flock` on STATE/agent.lock, held for the agent's life.

Two agents on one bundle would take each other's MQTT session over and over (the broker makes the
certificate CN the client id) and share one outbox and one set of sealed keys. The lock file holds
the holder's PID, so the second agent can say who holds it. The kernel releases the lock when the
holder exits, however it exits: a stale file is never a reason to refuse.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from strongroom.errors import EnvironmentFault

LOCK_FILE = "agent.lock"


class AgentRunning(EnvironmentFault):
    """Another agent holds this bundle's lock."""

    hint = "stop that agent first (one agent per bundle), or give this one its own bundle"


class AgentLock:
    """The lock, held while this object is open. Not inherited by child processes."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, state_dir: Path) -> AgentLock | None:
        """Take the lock in `state_dir`, or raise AgentRunning naming the holder. None when the
        directory does not exist yet (the caller takes it once the directory is made). Neither
        the directory nor the file is reached through a symbolic link."""
        try:
            dir_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise EnvironmentFault(
                f"cannot open the state directory {state_dir}: {e.strerror}",
                hint="it must be a directory (not a link) that this user may use",
            ) from e
        path = state_dir / LOCK_FILE
        try:
            fd = os.open(
                LOCK_FILE,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dir_fd,
            )
        except OSError as e:
            raise EnvironmentFault(f"cannot open the agent lock {path}: {e.strerror}") from e
        finally:
            os.close(dir_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            who = f"PID {holder}" if holder else "another process"
            raise AgentRunning(
                f"another agent ({who}) is already running with this bundle (it holds {path})"
            ) from None
        except OSError as e:
            os.close(fd)
            raise EnvironmentFault(f"cannot lock {path}: {e.strerror}") from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        """Give the lock up (the file stays: removing it would race with a new agent's open)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AgentLock:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def _holder(fd: int) -> int | None:
    """The PID the holder wrote, if it reads as one."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
