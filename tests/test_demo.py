"""`strongroom demo` runs the whole story and ends cleanly, leaving no process behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.fleet import require_mosquitto


def test_the_demo_shows_trust_a_prediction_and_a_revocation() -> None:
    require_mosquitto()
    done = subprocess.run(
        [sys.executable, "-m", "strongroom.cli", "demo", "--clean"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "cam-001  result  affirming" in out and "cam-002  result  affirming" in out
    assert "cam-003  result  contraindicated" in out and "cam-003  status  revoked" in out
    assert "cam-004  refused at launch" in out
    assert '{"class": ' in out  # the protected model answered
    assert "this enclave was revoked" in out
    assert out.rstrip().endswith("stopped cleanly")
    assert _processes_mentioning("strongroom-demo-") == []


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().replace(b"\x00", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in argv:
            found.append(argv)
    return found
