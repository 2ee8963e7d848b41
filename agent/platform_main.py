"""Entry point of the platform process: `python -m agent.platform_main BUNDLE HOST_FD ENCLAVE_FD`.

The host starts it with two descriptors: its channel to the platform, and the end of the host's
channel that the enclave will own. The platform loads its secrets, receives the image from the host,
verifies and measures it, launches the enclave from the measured bytes, and serves the enclave's
requests until the host says `shutdown` or goes away; then it stops the enclave.
"""

# ruff: noqa: E402 - one statement must run before the imports (see below)
from __future__ import annotations

import sys

# The platform never renders logs to a terminal. structlog loads `rich` (which fleet-side extras
# install) when it can, and that alone doubles this process's start-up: keep it out.
sys.modules.setdefault("rich", None)  # type: ignore[arg-type]

import os
import subprocess
import sys
import threading
from pathlib import Path

import structlog

from agent.channel import Channel, ChannelClosed, ChannelError, check
from agent.hardening import harden_process
from agent.platform_service import SimulatedPlatform, identity_of, spawn_enclave
from strongroom import logs
from strongroom.errors import StrongroomError
from strongroom.image import MAX_CONTENT_SIZE

log = structlog.get_logger()


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


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(bundle_dir: Path, host: Channel, enclave_host_fd: int) -> int:
    platform = SimulatedPlatform(bundle_dir)
    proc: subprocess.Popen[bytes] | None = None
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
            proc, chan = spawn_enclave(image, enclave_host_fd, show_stderr=identity.debug)
            os.close(enclave_host_fd)
            threading.Thread(target=platform.serve, args=(identity, chan), daemon=True).start()
            log.info("enclave_launched", mrenclave=identity.mrenclave, svn=identity.svn)
            host.send({"op": "launched", "pid": proc.pid, **identity.__dict__})
    finally:
        _stop(proc)


def main() -> int:
    harden_process()
    logs.configure("warning")
    bundle_dir, host_fd, enclave_fd = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    host = Channel.from_fd(host_fd)
    try:
        return run(bundle_dir, host, enclave_fd)
    except StrongroomError as e:
        host.send({"op": "error", "reason": e.diagnostics()})
        return 3


if __name__ == "__main__":
    sys.exit(main())
