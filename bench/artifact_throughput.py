"""Benchmark: seal and open a large artifact, streaming the plaintext to a hashing consumer.

Prints seal and open throughput (GB/s), the peak RSS each phase adds above the interpreter's
baseline, and the single-thread AES-256-GCM figure of `openssl speed -evp` measured in the same
run. Targets (issue "Foundation and provisioning"): open >= 50% of the openssl figure; peak RSS
while streaming < 64 MiB above baseline whatever the artifact size.

Each phase runs in a fresh interpreter so its peak RSS is its own.
    python bench/artifact_throughput.py [--size-mib 256] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provisioning.home import init_home, open_home
from provisioning.keystore import Keystore
from provisioning.seal import seal_artifact
from strongroom import artifact

MIB = 1024 * 1024


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _phase_seal(home: Path, src: Path, out: Path) -> dict[str, float]:

    fleet = open_home(home)
    baseline = _rss_mib()
    t0 = time.perf_counter()
    seal_artifact(fleet, src, out, name="bench-model", version=1, kind="model")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rss_added_mib": _rss_mib() - baseline, "baseline_mib": baseline}


def _phase_open(home: Path, path: Path, consume: str) -> dict[str, float | str]:

    fleet = open_home(home)
    trusted = fleet.verify_key("artifact")
    with path.open("rb") as f:
        key_id = artifact.read_manifest(f).manifest.key_id
    _, data_key = Keystore(fleet.keystore_dir).unwrap(key_id)
    baseline = _rss_mib()
    digest = hashlib.sha256()
    t0 = time.perf_counter()
    with path.open("rb") as f:
        signed = artifact.read_manifest(f)
        signed.verify(trusted)
        for chunk in artifact.open_stream(f, signed, data_key):
            if consume == "sha256":
                digest.update(chunk)
    seconds = time.perf_counter() - t0
    if consume == "sha256" and digest.hexdigest() != signed.manifest.sha256:
        raise SystemExit("benchmark: decrypted plaintext does not match the manifest digest")
    return {"seconds": seconds, "rss_added_mib": _rss_mib() - baseline, "baseline_mib": baseline}


def _openssl_gbps(block: int) -> float | None:
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    out = subprocess.run(
        [
            openssl,
            "speed",
            "-evp",
            "aes-256-gcm",
            "-decrypt",
            "-bytes",
            str(block),
            "-seconds",
            "2",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    match = re.search(r"^AES-256-GCM\s+([\d.]+)k\s*$", out, re.MULTILINE)
    return float(match.group(1)) * 1000 / 1e9 if match else None


def _run_phase(*args: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--phase", *args], capture_output=True, text=True, check=True
    ).stdout
    result: dict[str, float] = json.loads(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        kind, *rest = args.phase
        if kind == "seal":
            result = _phase_seal(Path(rest[0]), Path(rest[1]), Path(rest[2]))
        else:
            result = _phase_open(Path(rest[0]), Path(rest[1]), rest[2])
        print(json.dumps(result))
        return

    size = args.size_mib * MIB
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        init_home(work / "home")
        src = work / "model.bin"
        with src.open("wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MIB))
        sealed = work / "model.sra"
        seal = _run_phase("seal", str(work / "home"), str(src), str(sealed))
        opened = _run_phase("open", str(work / "home"), str(sealed), "sha256")
        decrypt_only = _run_phase("open", str(work / "home"), str(sealed), "none")
    ref_16k, ref_1m = _openssl_gbps(16384), _openssl_gbps(MIB)
    reference = max(r for r in (ref_16k, ref_1m, 0.0) if r is not None)

    def gbps(r: dict[str, float]) -> float:
        return size / r["seconds"] / 1e9

    print(f"artifact throughput, {args.size_mib} MiB artifact, 1 MiB chunks, AES-256-GCM STREAM")
    print(f"  seal (hash pass + encrypt pass)        {gbps(seal):6.2f} GB/s")
    print(f"  open, consumer hashes (SHA-256)        {gbps(opened):6.2f} GB/s")
    print(f"  open, decrypt only                     {gbps(decrypt_only):6.2f} GB/s")
    for label, ref in (("16 KiB", ref_16k), ("1 MiB", ref_1m)):
        shown = f"{ref:6.2f} GB/s" if ref is not None else "   n/a (openssl not installed)"
        print(f"  openssl speed -evp aes-256-gcm {label:6}  {shown}")
    if reference:
        print(
            f"  open (decrypt only) / openssl best     {gbps(decrypt_only) / reference:6.0%}  "
            "(target >= 50%)"
        )
        print(f"  open (with consumer hash) / openssl    {gbps(opened) / reference:6.0%}")
    print(f"  interpreter baseline RSS               {opened['baseline_mib']:6.1f} MiB")
    for label, r in (("seal", seal), ("open", opened)):
        print(
            f"  peak RSS added while {label:4}             {r['rss_added_mib']:6.1f} MiB "
            "(target < 64 MiB)"
        )


if __name__ == "__main__":
    main()
