"""Operator actions on the fleet home: revoke, reinstate, request re-attestation.

One implementation for every front end (the CLI, the dashboard). Revocation and reinstatement
change the device's registry entry, which every verifier process reloads at once (it watches the
registry directory) and acts on: a signed revoke command, or a fresh challenge. They also put the
device's certificate on hold in the fleet CRL or lift the hold (provisioning/crl.py), which
`strongroom broker run` hands to the broker, so a revoked device is refused at TLS. A re-attestation
request is a small file in the verifier's request directory that exactly one verifier process
claims (by renaming it) and answers with a challenge. Each action is written to the audit log.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from provisioning import crl
from provisioning.home import FleetHome
from provisioning.registry import Registry
from strongroom.errors import InputError
from strongroom.fsutil import read_file, write_atomic
from strongroom.signing import SigningKey
from verifier.audit import AuditLog

REVOKED, ACTIVE = "revoked", "active"


@dataclass(frozen=True)
class Outcome:
    device_id: str
    status: str
    changed: bool

    def to_json_dict(self) -> dict[str, object]:
        return {"device": self.device_id, "status": self.status, "changed": self.changed}


def audit_path(home: FleetHome) -> Path:
    return home.root / "verifier" / "audit.log"


def requests_dir(home: FleetHome) -> Path:
    return home.root / "verifier" / "requests"


def _audit(home: FleetHome) -> AuditLog:
    key = SigningKey.from_pem(read_file(home.root / "verifier" / "result-signing.key", "key"))
    return AuditLog(audit_path(home), key)


def _enrolled(home: FleetHome, device_id: str) -> Registry:
    registry = Registry(home.registry_dir)
    if not registry.exists(device_id):
        raise InputError(f"device {device_id} is not enrolled", hint="check the device id")
    return registry


def set_status(home: FleetHome, device_id: str, status: str, *, reason: str, by: str) -> Outcome:
    """Revoke (`REVOKED`) or reinstate (`ACTIVE`) a device; no change if it already is.

    The CRL is brought in line with the registry either way, so repeating a command whose CRL
    update failed (a full disk) completes it."""
    if status not in (REVOKED, ACTIVE):
        raise InputError(f"unknown device status {status!r}")
    registry = _enrolled(home, device_id)
    record = registry.get(device_id)
    changed = record.status != status
    if changed:
        registry.put(replace(record, status=status))
        event = "revoked" if status == REVOKED else "reinstated"
        _audit(home).append(event, device_id, reason=reason, by=by)
    crl.sync_device(home, device_id)
    return Outcome(device_id, status, changed)


def request_reattestation(home: FleetHome, device_id: str, *, by: str) -> Outcome:
    """Ask the verifier to challenge a device now (it answers with fresh evidence)."""
    registry = _enrolled(home, device_id)
    status = registry.get(device_id).status
    if status == REVOKED:
        raise InputError(
            f"device {device_id} is revoked", hint="reinstate it first; it then attests afresh"
        )
    directory = requests_dir(home)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(directory / f"{device_id}.json", json.dumps({"by": by}).encode())
    _audit(home).append("reattestation_requested", device_id, by=by)
    return Outcome(device_id, status, True)


def claim_requests(home: FleetHome) -> list[str]:
    """The devices with pending re-attestation requests that this process claimed (a rename
    succeeds for exactly one process), the request files removed."""
    directory = requests_dir(home)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    claimed = []
    for name in names:
        if not name.endswith(".json"):
            continue
        path = directory / name
        taken = directory / f".{name}.{os.getpid()}"
        try:
            os.rename(path, taken)
        except FileNotFoundError:
            continue  # another verifier took it
        taken.unlink(missing_ok=True)
        claimed.append(name.removesuffix(".json"))
    return claimed
