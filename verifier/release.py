"""Key release: may this attested enclave have this artifact's data key? Pure."""

from __future__ import annotations

from provisioning.keystore import KeyEntry
from strongroom.errors import InputError
from strongroom.evidence import Evidence
from strongroom.fields import parse_firmware
from strongroom.policy import FleetPolicy


def refusal(  # noqa: PLR0911 - one return per release condition reads best
    entry: KeyEntry, ev: Evidence, policy: FleetPolicy
) -> str | None:
    """None when the key may be released, else the reason it may not."""
    rel, e = entry.release, ev.enclave
    if e.mrsigner not in rel.signers:
        return "enclave signer is not allowed for this key"
    if rel.measurements and e.mrenclave not in rel.measurements:
        return "enclave measurement is not allowed for this key"
    if e.svn < rel.min_svn:
        return f"enclave SVN {e.svn} is below the key's minimum {rel.min_svn}"
    try:
        if parse_firmware(ev.firmware) < parse_firmware(rel.min_firmware):
            return f"firmware {ev.firmware} is below the key's minimum {rel.min_firmware}"
    except InputError:
        return "firmware version is unreadable"
    floor = policy.artifact_floors.get(entry.name)
    if floor is not None and entry.version < floor:
        return f"artifact {entry.name} v{entry.version} is below the floor v{floor} (rollback)"
    if e.debug and not policy.allow_debug_images:
        return "debug enclaves get no keys"
    return None
