"""Edits of the fleet policy file that keep the operator's comments and layout (tomlkit).

Every edit bumps the policy `version`, is validated by `strongroom.policy.parse_policy` before it
is written, and is written atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import tomlkit
from tomlkit.items import AoT, Table

from strongroom.errors import FormatError
from strongroom.fields import MAX_VERSION
from strongroom.fsutil import SECRET_FILE, read_file, write_atomic
from strongroom.policy import MAX_POLICY, ArtifactReference, EnclaveReference, parse_policy

_TEMPLATE = """\
# Strongroom fleet policy. Edit by hand; `strongroom enclave build` and `strongroom artifact seal`
# add reference values. `version` goes up with every change and is named in attestation results.
version = 1

[platform]
min_firmware = "1.0.0"      # devices below this firmware fail appraisal
allow_debug = false         # platforms in debug mode fail appraisal
require_secure_boot = true
smt = "allow"               # "allow" or "deny" SMT/hyper-threading (side-channel exposure)

[enclave]
min_svn = 1                 # enclaves below this security version get no keys
allowed_signers = ["{signer}"]
allow_debug_images = false
# [[enclave.reference]] rows are added by `strongroom enclave build`

[artifacts]
# [artifacts.floors] maps an artifact name to the lowest version devices may run (anti-rollback).
# `strongroom artifact seal` sets a floor for a new name; raise floors by hand to retire versions.
floors = {{}}
# [[artifacts.reference]] rows are added by `strongroom artifact seal`

[attestation]
interval_s = 300            # devices attest at least this often
nonce_ttl_s = 60            # a challenge nonce expires after this

[keys]
lease_s = 3600              # a released data key is valid for this long
renew_margin_s = 300        # enclaves renew this long before the lease ends
offline_grace_s = 86400     # how long a device may keep serving without reaching the fleet
"""


def initial_policy(enclave_signer: str) -> str:
    text = _TEMPLATE.format(signer=enclave_signer)
    parse_policy(text)
    return text


def _append_row(doc: tomlkit.TOMLDocument, section: str, row: dict[str, object]) -> None:
    table = doc.get(section)
    if not isinstance(table, Table):
        table = tomlkit.table()
        doc[section] = table
    rows = table.get("reference")
    if not isinstance(rows, AoT):
        rows = tomlkit.aot()
        table.append("reference", rows)
    rows.append(tomlkit.item(row))


Change = Callable[[tomlkit.TOMLDocument], None]


def edited(text: str, change: Change) -> str:
    """The policy `text` with `change` applied and its version bumped, validated as a whole.

    Pure: FormatError (never tomlkit's own errors) for a text tomlkit cannot edit or an edit
    that leaves the policy invalid."""
    if len(text) > MAX_POLICY:
        raise FormatError(f"policy is larger than {MAX_POLICY} characters")
    try:
        doc = tomlkit.parse(text)
        change(doc)
        version = doc.get("version", 1)
        if (
            not isinstance(version, int)
            or isinstance(version, bool)
            or not 1 <= version < MAX_VERSION
        ):
            raise FormatError(f"policy: version must be an integer between 1 and {MAX_VERSION - 1}")
        doc["version"] = int(version) + 1
        result = tomlkit.dumps(doc)
    except FormatError:
        raise
    except Exception as e:  # tomlkit raises its own errors, and Python's for odd documents
        raise FormatError("policy cannot be edited: it is not valid TOML") from e
    parse_policy(result)
    return result


def _edit(path: Path, change: Change) -> None:
    write_atomic(path, edited(_read(path), change).encode(), SECRET_FILE)


def _read(path: Path) -> str:
    try:
        return read_file(path, "fleet policy").decode()
    except UnicodeDecodeError as e:
        raise FormatError("policy is not UTF-8 text") from e


def set_values(path: Path, values: dict[tuple[str, str], object]) -> None:
    """Set `[section] key = value` entries (validated as a whole, version bumped)."""

    def change(doc: tomlkit.TOMLDocument) -> None:
        for (section, key), value in values.items():
            table = doc.get(section)
            if not isinstance(table, Table):
                table = tomlkit.table()
                doc[section] = table
            table[key] = value

    _edit(path, change)


def add_enclave_reference(path: Path, ref: EnclaveReference) -> bool:
    """Register an enclave build as a reference value; False if it was already registered."""
    policy = parse_policy(_read(path))
    if ref in policy.enclave_references:
        return False

    def change(doc: tomlkit.TOMLDocument) -> None:
        _append_row(
            doc,
            "enclave",
            {
                "mrenclave": ref.mrenclave,
                "svn": ref.svn,
                "product_id": ref.product_id,
                "debug": ref.debug,
            },
        )

    _edit(path, change)
    return True


def add_artifact_reference(path: Path, ref: ArtifactReference) -> None:
    """Register a sealed artifact; a name seen for the first time gets its version as floor."""
    policy = parse_policy(_read(path))
    _edit(path, artifact_reference_change(ref, ref.name not in policy.artifact_floors))


def artifact_reference_change(ref: ArtifactReference, new_name: bool) -> Change:
    """The edit that registers `ref` (and, for a `new_name`, its version as the name's floor)."""

    def change(doc: tomlkit.TOMLDocument) -> None:
        _append_row(
            doc,
            "artifacts",
            {"name": ref.name, "version": ref.version, "sha256": ref.sha256, "kind": ref.kind},
        )
        if new_name:
            artifacts = doc["artifacts"]
            assert isinstance(artifacts, Table)  # noqa: S101 - _append_row made it a table
            floors = artifacts.get("floors")
            if floors is None:
                floors = tomlkit.inline_table()
                artifacts["floors"] = floors
            floors[ref.name] = ref.version

    return change
