"""Run a command as this user without privileges, also when the tests run as root."""

from __future__ import annotations

import os
import shutil

import pytest


def unprivileged(argv: list[str]) -> list[str]:
    """As root: uid 0 with an empty capability set, which file permissions and ptrace treat like
    any unprivileged user (another uid could not run the interpreter, which lives under /root).
    As any other user: the command unchanged."""
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root needs setpriv (util-linux) to drop capabilities")
    return [setpriv, "--inh-caps=-all", "--bounding-set=-all", "--", *argv]
