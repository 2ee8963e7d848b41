"""Entry point of the platform process:
`python -m agent.platform_main PLATFORM_DIR HOST_FD ENCLAVE_FD [LAUNCHER_FD]`.

It starts with two descriptors: its channel to the host, and the end of the host's channel that the
enclave will own. Started by the host itself, it starts the enclave itself; started by the
privileged launcher (as the platform's user, with its directory as `/proc/self/fd/N`), it asks the
launcher on LAUNCHER_FD to start the enclave as the enclave's user.

The platform loads its secrets, receives the image from the host, verifies and measures it,
launches the enclave from the measured bytes, and serves the enclave's requests until the host
says `shutdown` or goes away; then it stops the enclave.
"""

# ruff: noqa: E402 - two statements must run before the imports (see below)
from __future__ import annotations

import signal
import sys

# Ctrl-C in the agent's terminal reaches its whole process group, this process too when the agent
# started it itself: the host stops the platform in order (after its enclave), so the platform
# ignores it, from as early as it can. The enclave it starts inherits the ignored signal.
signal.signal(signal.SIGINT, signal.SIG_IGN)
# The platform never renders logs to a terminal. structlog loads `rich` (which fleet-side extras
# install) when it can, and that alone doubles its import: keep it out. structlog itself is
# imported only if the platform logs a warning (strongroom.logs.configure_deferred).
sys.modules.setdefault("rich", None)  # type: ignore[arg-type]

import os
import threading
from pathlib import Path

from agent.channel import Channel, ChannelClosed, ChannelError, check
from agent.hardening import harden_process
from agent.launcher import ChildProcess, EnclaveSpawner
from agent.platform_service import SimulatedPlatform, identity_of, spawn_enclave
from strongroom import logs
from strongroom.errors import StrongroomError
from strongroom.image import MAX_CONTENT_SIZE

log = logs.get_logger()


def _receive_image(host: Channel, size: int) -> bytes:
    if not 0 < size <= MAX_CONTENT_SIZE + 8192:
        raise ChannelError("image size out of range")
    buf = bytearray()
    while len(buf) < size:
        piece = check(host.recv(timeout=30), {"data": bytes})
        buf += piece["data"]
    if len(buf) != size:
        raise ChannelError("image pieces do not add up to the announced size")
    return bytes(buf)


def run(
    platform_dir: Path,
    host: Channel,
    enclave_host_fd: int,
    spawner: EnclaveSpawner | None = None,
) -> int:
    platform = SimulatedPlatform.from_platform_dir(platform_dir)
    proc: ChildProcess | None = None
    try:
        while True:
            try:
                msg = host.recv()
            except ChannelClosed:
                return 0
            if msg["op"] == "shutdown":
                return 0
            if msg["op"] != "launch" or proc is not None:
                host.send({"op": "error", "reason": f"unexpected request {msg['op']!r}"})
                continue
            check(msg, {"size": int})
            try:
                image = platform.verify_image(_receive_image(host, msg["size"]))
            except (StrongroomError, ChannelError) as e:
                log.warning("launch_refused", reason=str(e))
                host.send({"op": "error", "reason": str(e)})
                continue
            identity = identity_of(image)
            proc, chan = spawn_enclave(
                image, enclave_host_fd, show_stderr=identity.debug, spawner=spawner
            )
            os.close(enclave_host_fd)
            threading.Thread(target=platform.serve, args=(identity, chan), daemon=True).start()
            log.info("enclave_launched", mrenclave=identity.mrenclave, svn=identity.svn)
            host.send({"op": "launched", "pid": proc.pid, **identity.__dict__})
    finally:
        if proc is not None:
            proc.stop(3.0)


def main() -> int:
    harden_process()
    logs.configure_deferred("warning")
    platform_dir, host_fd, enclave_fd = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    spawner = EnclaveSpawner(int(sys.argv[4])) if len(sys.argv) > 4 else None
    host = Channel.from_fd(host_fd)
    try:
        return run(platform_dir, host, enclave_fd, spawner)
    except StrongroomError as e:
        host.send({"op": "error", "reason": e.diagnostics()})
        return 3


if __name__ == "__main__":
    sys.exit(main())
