"""The privileged launcher: `python -m agent.launcher_main CONTROL_FD PLATFORM_DIR_FD P_UID P_GID
E_UID E_GID`, started by the agent while it is root, before it drops its own privileges.

It is the only part of the device that stays root, so it does as little as possible (OpenSSH's
privilege-separation monitor is the model):

- on its control channel (held by the host alone): `start_platform` with the host's two channel
  descriptors starts `agent.platform_main` as the platform's user, with the platform directory
  (opened by root at set-up) as a descriptor; `stop_platform` waits for one to exit, then kills it;
- on each platform's own channel (held by that platform alone): `start_enclave` with two channel
  descriptors starts `agent.bootstrap` as the enclave's user, once; `stop_enclave` stops it.

Command lines, environments and users are fixed here; requests choose none of them. The host may
start platforms (as it always could) but never an enclave: only a platform, which has verified
and measured the image it will send, can. When the control channel closes, every process it
started is stopped and it exits; it dies with the agent (parent-death signal) too.
"""

# ruff: noqa: E402 - two statements must run before the imports (see below)
from __future__ import annotations

import signal
import sys

# as in agent.platform_main: the agent stops the launcher (it closes the control channel), and
# the platforms and enclaves it starts inherit the ignored signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.modules.setdefault("rich", None)  # type: ignore[arg-type] # as in agent.platform_main

import contextlib
import math
import os
import socket
import stat
import subprocess
import threading
from dataclasses import dataclass, field

from agent.channel import ChannelClosed, ChannelError, Message, check
from agent.hardening import harden_process
from agent.launcher import (
    ENCLAVE_ENV,
    ENCLAVE_STOP_GRACE_S,
    FdChannel,
    platform_command,
    spawn_enclave_process,
    stop_process,
)

MAX_PLATFORMS = 4  # a host restarts its enclave; it never needs many at once
MAX_GRACE_S = 10.0


@dataclass
class _Platform:
    proc: subprocess.Popen[bytes]
    chan: FdChannel
    enclave: subprocess.Popen[bytes] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stop_enclave(self, grace: float = ENCLAVE_STOP_GRACE_S) -> int:
        with self.lock:
            if self.enclave is None:
                return 0
            return stop_process(self.enclave, grace, terminate=True)


def _sockets_only(fds: list[int]) -> None:
    for fd in fds:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise ChannelError("channel descriptors must be sockets")


class PrivilegedLauncher:
    def __init__(self, platform_dir_fd: int, platform: tuple[int, int], enclave: tuple[int, int]):
        self.platform_dir_fd, self.platform, self.enclave = platform_dir_fd, platform, enclave
        self.platforms: dict[int, _Platform] = {}
        self.lock = threading.Lock()

    # -- the host's requests -------------------------------------------------------------------

    def start_platform(self, host_fds: list[int]) -> Message:
        with self.lock:
            live = [p for p in self.platforms.values() if p.proc.poll() is None]
            if len(live) >= MAX_PLATFORMS:
                return {"op": "error", "reason": "too many platforms running"}
        ours, theirs = socket.socketpair()
        host_fd, enclave_fd = host_fds
        argv = platform_command(
            f"/proc/self/fd/{self.platform_dir_fd}", host_fd, enclave_fd, theirs.fileno()
        )
        try:
            proc = subprocess.Popen(
                argv,
                pass_fds=(self.platform_dir_fd, host_fd, enclave_fd, theirs.fileno()),
                close_fds=True,
                env=dict(ENCLAVE_ENV),
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                user=self.platform[0],
                group=self.platform[1],
                extra_groups=[],
                umask=0o077,
            )
        except OSError as e:
            ours.close()
            return {"op": "error", "reason": f"cannot start the platform: {e.strerror}"}
        finally:
            theirs.close()
        record = _Platform(proc, FdChannel(ours))
        with self.lock:
            self.platforms[proc.pid] = record
        threading.Thread(target=self.serve_platform, args=(record,), daemon=True).start()
        return {"op": "started", "pid": proc.pid}

    def stop_platform(self, msg: Message) -> Message:
        check(msg, {"pid": int, "grace": float})
        with self.lock:
            record = self.platforms.pop(msg["pid"], None)
        if record is None:
            return {"op": "error", "reason": "no such platform"}
        grace = msg["grace"] if math.isfinite(msg["grace"]) else 0.0
        code = stop_process(record.proc, min(max(grace, 0.0), MAX_GRACE_S), terminate=False)
        record.stop_enclave()
        return {"op": "stopped", "pid": msg["pid"], "returncode": code}

    def serve_host(self, host: FdChannel) -> None:
        while True:
            try:
                msg = host.chan.recv()
            except ChannelClosed:
                return
            except ChannelError as e:
                host.send({"op": "error", "reason": str(e)})
                continue
            fds: list[int] = []
            try:
                if msg["op"] == "hello":
                    reply: Message = {"op": "hello", "pid": os.getpid()}
                elif msg["op"] == "start_platform":
                    check(msg, {})
                    fds = host.recv_fds(2)
                    _sockets_only(fds)
                    reply = self.start_platform(fds)
                elif msg["op"] == "stop_platform":
                    reply = self.stop_platform(msg)
                else:
                    reply = {"op": "error", "reason": f"unknown request {msg['op'][:40]!r}"}
            except ChannelError as e:
                reply = {"op": "error", "reason": str(e)}
            finally:
                for fd in fds:
                    os.close(fd)
            try:
                host.send(reply)
            except ChannelClosed:
                return

    # -- a platform's requests -----------------------------------------------------------------

    def start_enclave(self, record: _Platform, msg: Message, fds: list[int]) -> Message:
        check(msg, {"show_stderr": bool})
        with record.lock:
            if record.enclave is not None:
                return {"op": "error", "reason": "this platform already started its enclave"}
            platform_fd, host_fd = fds
            try:
                record.enclave = spawn_enclave_process(
                    platform_fd,
                    host_fd,
                    show_stderr=msg["show_stderr"],
                    user=self.enclave[0],
                    group=self.enclave[1],
                )
            except OSError as e:
                return {"op": "error", "reason": f"cannot start the enclave: {e.strerror}"}
            return {"op": "started", "pid": record.enclave.pid}

    def serve_platform(self, record: _Platform) -> None:
        try:
            while True:
                try:
                    msg = record.chan.chan.recv()
                except ChannelClosed:
                    return
                except ChannelError as e:
                    record.chan.send({"op": "error", "reason": str(e)})
                    continue
                fds: list[int] = []
                try:
                    if msg["op"] == "start_enclave":
                        fds = record.chan.recv_fds(2)
                        _sockets_only(fds)
                        reply = self.start_enclave(record, msg, fds)
                    elif msg["op"] == "stop_enclave":
                        check(msg, {"pid": int, "grace": float})
                        grace = msg["grace"] if math.isfinite(msg["grace"]) else 0.0
                        code = record.stop_enclave(min(max(grace, 0.0), MAX_GRACE_S))
                        reply = {"op": "stopped", "pid": msg["pid"], "returncode": code}
                    else:
                        reply = {"op": "error", "reason": f"unknown request {msg['op'][:40]!r}"}
                except ChannelError as e:
                    reply = {"op": "error", "reason": str(e)}
                finally:
                    for fd in fds:
                        os.close(fd)
                record.chan.send(reply)
        except ChannelClosed:
            return
        finally:
            # the platform is gone or hung up: its enclave goes too
            record.stop_enclave()
            record.chan.close()

    def stop_all(self) -> None:
        with self.lock:
            records = list(self.platforms.values())
            self.platforms.clear()
        for record in records:
            with contextlib.suppress(ChannelError):
                record.chan.close()
            stop_process(record.proc, ENCLAVE_STOP_GRACE_S, terminate=True)
            record.stop_enclave()


def main() -> int:
    harden_process()  # not dumpable, and killed with the agent
    control_fd, platform_dir_fd, *ids = (int(a) for a in sys.argv[1:7])
    if os.geteuid() != 0 or len(ids) != 4:
        return 2
    launcher = PrivilegedLauncher(platform_dir_fd, (ids[0], ids[1]), (ids[2], ids[3]))
    host = FdChannel(socket.socket(fileno=control_fd))
    try:
        launcher.serve_host(host)
    finally:
        launcher.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
