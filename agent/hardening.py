"""Process hardening for the platform and enclave processes (Linux; best effort elsewhere).

- not dumpable (`PR_SET_DUMPABLE` 0): no core dumps, and other processes of the same user cannot
  ptrace it or read `/proc/PID/mem` from then on. Before this call runs they could: that is why
  the platform and the enclave run under users of their own (`agent.privsep`);
- core-dump size limit 0;
- killed when its parent dies (`PR_SET_PDEATHSIG`), so no orphan holds plaintext;
- memory locked (`mlockall`) only where the memlock limit is unlimited: with a small limit, locking
  future allocations would make the interpreter fail to allocate. Otherwise reported as not locked.
"""

from __future__ import annotations

import ctypes
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
MCL_CURRENT = 1
MCL_FUTURE = 2


def _libc() -> ctypes.CDLL:
    """The C library's functions: those of the running interpreter, which links it (no search
    with `ctypes.util.find_library`, which imports subprocess and runs `ldconfig -p`)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "prctl"):  # an interpreter that does not export libc's symbols
        from ctypes.util import find_library  # noqa: PLC0415 - the fallback only

        libc = ctypes.CDLL(find_library("c") or "libc.so.6", use_errno=True)
    return libc


def harden_process() -> dict[str, bool]:
    """Apply every hardening step available; return which ones took effect."""
    status = {"not_dumpable": False, "no_core_dumps": False, "memory_locked": False}
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        status["no_core_dumps"] = True
    except (ValueError, OSError):
        pass
    if not sys.platform.startswith("linux"):
        return status
    libc = _libc()
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0:
        status["not_dumpable"] = True
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY and libc.mlockall(MCL_CURRENT | MCL_FUTURE) == 0:
        status["memory_locked"] = True
    return status


def is_dumpable() -> bool:
    if not sys.platform.startswith("linux"):
        return True
    return bool(_libc().prctl(3, 0, 0, 0, 0))  # PR_GET_DUMPABLE
