"""`strongroom enclave source`: write the standard enclave source tree, ready for `enclave build`.

The tree holds the enclave runtime (`agent.enclave_app`), every Strongroom module it imports, an
entry point, and `enclave_policy.py`: the enclave's own policy (minimum firmware, SMT, secure boot,
the fleet's artifact-signing key, sealing policy). Because all of it is in the image, all of it is
covered by MRENCLAVE; vendors may add modules of their own before building.
"""

from __future__ import annotations

from pathlib import Path

import agent
import strongroom
from strongroom.errors import InputError
from strongroom.fields import parse_firmware
from strongroom.fsutil import (
    PUBLIC_FILE,
    ensure_absent,
    make_private_dir,
    read_file,
    staged_dir,
    write_atomic,
)
from strongroom.signing import VerifyKey

RUNTIME_MODULES = (
    "agent/__init__.py",
    "agent/channel.py",
    "agent/memimport.py",
    "agent/enclave_app/__init__.py",
    "agent/enclave_app/attestation.py",
    "agent/enclave_app/runtime.py",
    "agent/enclave_app/sealing.py",
    "strongroom/__init__.py",
    "strongroom/artifact.py",
    "strongroom/canonical.py",
    "strongroom/commands.py",
    "strongroom/errors.py",
    "strongroom/fields.py",
    "strongroom/image.py",
    "strongroom/keywrap.py",
    "strongroom/report.py",
    "strongroom/signing.py",
)

_MAIN = '''"""Enclave entry point (run by the platform's loader from the measured image)."""
import sys

import enclave_policy
from agent.enclave_app.runtime import main

sys.exit(main(enclave_policy))
'''

_POLICY = '''"""This enclave's own policy: part of the image, so changing it changes MRENCLAVE."""
MIN_FIRMWARE = {min_firmware!r}  # local attestation fails on older platform firmware
SMT = {smt!r}  # "allow" or "deny" SMT/hyper-threading
REQUIRE_SECURE_BOOT = {secure_boot!r}
ARTIFACT_SIGNER = {signer!r}  # raw Ed25519 public key of the fleet's artifact-signing key
VERIFIER_KEY = {verifier!r}  # raw Ed25519 public key whose commands (revoke) the enclave obeys
SEAL_POLICY = {seal_policy!r}  # "signer" (MRSIGNER + product + SVN) or "measurement" (MRENCLAVE)
'''


def _source_root() -> Path:
    return Path(agent.__file__).resolve().parent.parent


def write_enclave_source(
    out: Path,
    artifact_signer: VerifyKey,
    verifier_key: VerifyKey,
    *,
    min_firmware: str = "1.0.0",
    smt: str = "allow",
    require_secure_boot: bool = True,
    seal_policy: str = "signer",
) -> list[str]:
    """Write the tree to `out` (which must not exist); return the paths written."""
    parse_firmware(min_firmware)
    if smt not in ("allow", "deny"):
        raise InputError("SMT policy must be 'allow' or 'deny'")
    if seal_policy not in ("signer", "measurement"):
        raise InputError("sealing policy must be 'signer' or 'measurement'")
    ensure_absent(out, "enclave source directory")
    root = _source_root()
    if Path(strongroom.__file__).resolve().parent.parent != root:
        raise InputError("the agent and strongroom packages are installed in different places")
    written = []
    with staged_dir(out.absolute()) as stage:
        for rel in RUNTIME_MODULES:
            make_private_dir((stage / rel).parent)
            write_atomic(stage / rel, read_file(root / rel, "runtime module"), PUBLIC_FILE)
            written.append(rel)
        write_atomic(stage / "__main__.py", _MAIN.encode(), PUBLIC_FILE)
        policy = _POLICY.format(
            min_firmware=min_firmware,
            smt=smt,
            secure_boot=require_secure_boot,
            signer=artifact_signer.raw.hex(),
            verifier=verifier_key.raw.hex(),
            seal_policy=seal_policy,
        )
        write_atomic(stage / "enclave_policy.py", policy.encode(), PUBLIC_FILE)
        written += ["__main__.py", "enclave_policy.py"]
    return written
