"""Coverage-guided fuzzing with atheris (libFuzzer): one harness per parser of fuzz/targets.py.

    .venv/bin/python -m fuzz.run TARGET [libFuzzer flags]   # one harness, e.g. -runs=10000
    .venv/bin/python -m fuzz.run --all [--seconds 30]       # every harness in turn, then a table

`make fuzz` installs atheris (only there: `make test` does not need it) and runs `--all`. Each
harness starts from its seeds in tests/corpus/<target> (read, never written) and from what earlier
runs found, in out/fuzz/corpus/<target>, where the inputs that reach new coverage are added; an
input that raises anything but the parser's own errors, runs over 10 s or takes over 2 GiB is a
crash, written to out/fuzz/crashes/<target>/. To keep a found input as a regression seed, copy it
into tests/corpus/<target> and commit it. `--all` reports, per harness, the executions, the
coverage (libFuzzer's edge count) and the inputs it added, and exits 1 if any harness crashed.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "fuzz"
# What coverage is measured in: our parsers and the pure-Python parsers they use.
INSTRUMENTED = [
    "strongroom",
    "agent.channel",
    "provisioning.policy_file",
    "fuzz.targets",
    "tomllib",
    "tomlkit",
]
LIBFUZZER_FLAGS = ["-timeout=10", "-rss_limit_mb=2048", "-max_len=16384", "-print_final_stats=1"]


def _target_names() -> list[str]:
    from fuzz import targets  # noqa: PLC0415 - not instrumented here: names only

    return list(targets.TARGETS)


def fuzz_one(name: str, flags: list[str]) -> None:
    """Run one harness in this process until libFuzzer stops it (it exits the process)."""
    import atheris  # noqa: PLC0415 - installed by `make fuzz` only

    with atheris.instrument_imports(include=INSTRUMENTED):
        from fuzz import targets  # noqa: PLC0415 - imported under instrumentation

    target = targets.TARGETS[name]
    expected = target.expected

    def one_input(data: bytes) -> None:
        with contextlib.suppress(expected):  # anything else is a crash
            target.run(data)

    grown, crashes = OUT / "corpus" / name, OUT / "crashes" / name
    grown.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    argv = [sys.argv[0], *LIBFUZZER_FLAGS, f"-artifact_prefix={crashes}/", *flags]
    atheris.Setup([*argv, str(grown), str(targets.CORPUS / name)], one_input)
    atheris.Fuzz()


def _stat(log: str, name: str) -> int:
    found = re.findall(rf"stat::{name}:\s+(\d+)", log)
    return int(found[-1]) if found else 0


def fuzz_all(seconds: int) -> int:
    """Every harness for `seconds` each, in its own process; a summary table at the end."""
    logs = OUT / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows, crashed = [], []
    for name in _target_names():
        print(f"fuzzing {name} for {seconds} s ...", flush=True)
        command = [sys.executable, "-m", "fuzz.run", name, f"-max_total_time={seconds}"]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        log = done.stdout + done.stderr
        (logs / f"{name}.log").write_text(log)
        coverage = re.findall(r"cov: (\d+)", log)
        crashes = sorted(str(p.relative_to(ROOT)) for p in (OUT / "crashes" / name).glob("*"))
        failed = done.returncode != 0
        if failed:
            crashed.append(name)
        rows.append(
            (
                name,
                _stat(log, "number_of_executed_units"),
                int(coverage[-1]) if coverage else 0,
                _stat(log, "new_units_added"),
                "CRASH: " + " ".join(crashes[-1:]) if failed else "none",
            )
        )
    print(f"\n{'harness':<16} {'executions':>11} {'coverage':>9} {'new inputs':>11}  crash")
    for name, runs, cov, new, crash in rows:
        print(f"{name:<16} {runs:>11} {cov:>9} {new:>11}  {crash}")
    print(f"logs: {logs.relative_to(ROOT)}/; grown corpus: out/fuzz/corpus/")
    if crashed:
        print(f"crashed: {', '.join(crashed)} (see out/fuzz/crashes/ and the logs)")
    return 1 if crashed else 0


def main() -> int:
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        fuzz_one(sys.argv[1], sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", required=True, help="every harness")
    parser.add_argument("--seconds", type=int, default=30, help="per harness (default 30)")
    return fuzz_all(parser.parse_args().seconds)


if __name__ == "__main__":
    sys.exit(main())
