"""`strongroom broker run`: Mosquitto as a child process under the broker's own user, told to
reload whenever the fleet CRL changes.

Mosquitto re-reads its `crlfile` on SIGHUP (2.0.11: a new TLS context, so a lifted hold is
lifted too) but never on its own. Whoever signals it must also be able to copy the new CRL into
its state directory and to signal a process of the broker's user. The commands that revoke (the
verifier, `device revoke`/`reinstate`, `device enroll --force`, the dashboard) run as the fleet
home's owner, which may be neither; `broker run` started the broker, so it can. It polls the
CRL's directory entry (a stat every quarter second), checks a new CRL's signature, copies it and
sends SIGHUP, once Mosquitto handles that signal (until then, early in its start, SIGHUP would kill
it). SIGHUP sent to `broker run` itself does the same, SIGTERM and SIGINT are passed on, and it
exits with Mosquitto's status. The child is started as the broker's user (so it never
holds root, not even while it reads its configuration) and dies with its parent.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from provisioning import crl
from provisioning.broker import BrokerFiles, find_mosquitto, stage_crl
from provisioning.home import FleetHome
from strongroom.errors import StrongroomError

log = structlog.get_logger()

POLL_S = 0.25
_PR_SET_PDEATHSIG = 1


def run_broker(home: FleetHome, files: BrokerFiles, *, poll_s: float = POLL_S) -> int:
    """Run Mosquitto until it exits; return its exit status (128 + signal if it was killed)."""
    binary = find_mosquitto()
    user, as_user = files.user, dict[str, Any]()
    if not user.is_current:  # started as root: the child changes uid before exec
        groups = [g for g in user.groups if g != user.gid]
        as_user = {"user": user.uid, "group": user.gid, "extra_groups": groups}
    stamp = files.crl_version  # the version write_broker_config staged
    reload_requested, failed = False, list[str]()
    started: list[subprocess.Popen[bytes]] = []
    pending: list[int] = []  # a stop asked for before the broker was started

    def pass_on(signum: int, _frame: FrameType | None) -> None:
        if not started:
            pending.append(signum)
        elif started[0].returncode is None:
            started[0].send_signal(signum)

    def request_reload(_signum: int, _frame: FrameType | None) -> None:
        nonlocal reload_requested
        reload_requested = True

    # installed before the broker starts, so that no Ctrl-C falls between the two
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, pass_on),
        signal.SIGINT: signal.signal(signal.SIGINT, pass_on),
        signal.SIGHUP: signal.signal(signal.SIGHUP, request_reload),
    }
    try:
        child = subprocess.Popen(
            [binary, "-c", str(files.config)],
            umask=0o077,
            preexec_fn=_child_setup(os.getpid()),  # noqa: PLW1509 - single-threaded here
            **as_user,
        )
        started.append(child)
        for signum in pending:
            child.send_signal(signum)
        log.info(
            "broker_started",
            pid=child.pid,
            user=user.name,
            config=str(files.config),
            crl=str(files.crl),
            state=str(files.state_dir),
        )
        while True:
            try:
                code = child.wait(poll_s)
            except subprocess.TimeoutExpired:
                pass
            else:
                return code if code >= 0 else 128 - code
            now = crl.version(home)
            if now != stamp or reload_requested:
                stamp = now  # taken before the read: no version is missed
                reload_requested = not _reload(home, files, child, failed)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for child in started:
            if child.poll() is None:  # leaving on an exception: do not leave it behind
                child.terminate()
                try:
                    child.wait(10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()


def _reload(
    home: FleetHome, files: BrokerFiles, child: subprocess.Popen[bytes], failed: list[str]
) -> bool:
    """Hand Mosquitto the current CRL; False if it cannot take a SIGHUP yet or the CRL could not
    be staged (try again). `failed` keeps the last staging error, logged once, not per poll."""
    if not _handles(child.pid, signal.SIGHUP):  # starting: SIGHUP would still kill it
        return False
    try:
        crl = stage_crl(home, files)
    except StrongroomError as e:  # the broker keeps the last list that verified; again later
        reason = e.diagnostics()
        if failed != [reason]:
            log.error("crl_not_reloaded", reason=reason)
        failed[:] = [reason]
        return False
    failed.clear()
    child.send_signal(signal.SIGHUP)
    log.info("crl_reloaded", number=crl.number, entries=len(crl.entries))
    return True


def _handles(pid: int, signum: int) -> bool:
    """Whether process `pid` has installed a handler for `signum` (its caught-signals mask)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(
        (line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0"
    )
    return bool(int(caught, 16) >> (signum - 1) & 1)


def _child_setup(parent: int) -> Callable[[], None]:
    """In the child before exec, after its uid changed (which would clear the setting): receive
    SIGTERM when `broker run` dies, even by SIGKILL, so no broker is left holding the port; and
    the open-file limit raised to its hard limit (one descriptor per connected device)."""

    def setup() -> None:
        # a stop passed on before Mosquitto installs its handlers must still stop it: the default
        # action, even where this process was started with SIGINT ignored (a shell's background
        # job), which an exec would otherwise hand down
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # it died before the call
            os._exit(1)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    return setup
