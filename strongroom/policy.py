"""The fleet policy: reference values and limits the verifier and key broker appraise against.

The policy lives in a human-editable TOML file in the fleet home. This module parses and validates
it into frozen objects; it never writes (see `provisioning.policy_file` for edits). Unknown keys are
errors, so a typo cannot silently weaken the policy.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from strongroom.errors import FormatError, InputError
from strongroom.fields import ARTIFACT_NAME_RE, HEX_RE, MAX_VERSION, parse_firmware

SMT_CHOICES = ("allow", "deny")
MAX_POLICY = 1024 * 1024


@dataclass(frozen=True)
class EnclaveReference:
    mrenclave: str
    svn: int
    product_id: int = 1
    debug: bool = False


@dataclass(frozen=True)
class ArtifactReference:
    name: str
    version: int
    sha256: str
    kind: str


@dataclass(frozen=True)
class FleetPolicy:
    version: int = 1
    min_firmware: str = "1.0.0"
    allow_debug_platform: bool = False
    require_secure_boot: bool = True
    smt: str = "allow"
    min_svn: int = 1
    allowed_signers: tuple[str, ...] = ()
    allow_debug_images: bool = False
    enclave_references: tuple[EnclaveReference, ...] = ()
    artifact_floors: Mapping[str, int] = field(default_factory=dict)
    artifact_references: tuple[ArtifactReference, ...] = ()
    attestation_interval_s: int = 300
    nonce_ttl_s: int = 60
    lease_s: int = 3600
    renew_margin_s: int = 300
    offline_grace_s: int = 86400

    @property
    def min_firmware_tuple(self) -> tuple[int, int, int]:
        return parse_firmware(self.min_firmware)


class _Table:
    """Typed, exhaustive access to one TOML table: every key must be read or it is an error."""

    def __init__(self, doc: Any, where: str) -> None:
        if not isinstance(doc, dict):
            raise FormatError(f"policy: [{where}] must be a table")
        self._doc, self._where, self._seen = doc, where, set[str]()

    def get(self, key: str, kind: type, default: Any) -> Any:
        self._seen.add(key)
        value = self._doc.get(key, default)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise FormatError(f"policy: {self._where}.{key} must be of type {kind.__name__}")
        return value

    def count(self, key: str, default: int, lo: int = 0, hi: int = MAX_VERSION) -> int:
        value: int = self.get(key, int, default)
        if not lo <= value <= hi:
            raise FormatError(f"policy: {self._where}.{key} must be between {lo} and {hi}")
        return value

    def hex32(self, key: str) -> str:
        value: str = self.get(key, str, None)
        if len(value) != 64 or not HEX_RE.fullmatch(value):
            raise FormatError(f"policy: {self._where}.{key} must be 64 lowercase hex digits")
        return value

    def names(self) -> list[str]:
        return list(self._doc)

    def table(self, key: str) -> _Table:
        self._seen.add(key)
        return _Table(self._doc.get(key, {}), f"{self._where}.{key}".lstrip("."))

    def rows(self, key: str) -> list[_Table]:
        self._seen.add(key)
        value = self._doc.get(key, [])
        if not isinstance(value, list):
            raise FormatError(f"policy: {self._where}.{key} must be an array of tables")
        return [_Table(v, f"{self._where}.{key}[{i}]".lstrip(".")) for i, v in enumerate(value)]

    def done(self) -> None:
        unknown = sorted(set(self._doc) - self._seen)
        if unknown:
            raise FormatError(
                f"policy: unknown key {self._where + '.' if self._where else ''}{unknown[0][:64]}"
            )


def _platform(t: _Table) -> dict[str, Any]:
    min_firmware = t.get("min_firmware", str, "1.0.0")
    try:
        parse_firmware(min_firmware)
    except InputError as e:
        raise FormatError(f"policy: platform.min_firmware: {e}") from e
    smt = t.get("smt", str, "allow")
    if smt not in SMT_CHOICES:
        raise FormatError("policy: platform.smt must be 'allow' or 'deny'")
    out = {
        "min_firmware": min_firmware,
        "smt": smt,
        "allow_debug_platform": t.get("allow_debug", bool, False),
        "require_secure_boot": t.get("require_secure_boot", bool, True),
    }
    t.done()
    return out


def _enclave(t: _Table) -> dict[str, Any]:
    signers = t.get("allowed_signers", list, [])
    if not all(isinstance(s, str) and len(s) == 64 and HEX_RE.fullmatch(s) for s in signers):
        raise FormatError("policy: enclave.allowed_signers must list 64-hex-digit fingerprints")
    references = []
    for row in t.rows("reference"):
        references.append(
            EnclaveReference(
                mrenclave=row.hex32("mrenclave"),
                svn=row.count("svn", 1, 1),
                product_id=row.count("product_id", 1, 0, 65535),
                debug=row.get("debug", bool, False),
            )
        )
        row.done()
    out = {
        "min_svn": t.count("min_svn", 1, 1),
        "allowed_signers": tuple(signers),
        "allow_debug_images": t.get("allow_debug_images", bool, False),
        "enclave_references": tuple(references),
    }
    t.done()
    return out


def _artifacts(t: _Table) -> dict[str, Any]:
    floors_table = t.table("floors")
    floors = {}
    for name in floors_table.names():
        if not ARTIFACT_NAME_RE.fullmatch(name):
            raise FormatError(
                f"policy: artifacts.floors has an invalid artifact name {name[:64]!r}"
            )
        floors[name] = floors_table.count(name, 1, 1)
    floors_table.done()
    references = []
    for row in t.rows("reference"):
        name = row.get("name", str, "")
        kind = row.get("kind", str, "")
        if not ARTIFACT_NAME_RE.fullmatch(name) or kind not in ("code", "model"):
            raise FormatError("policy: artifacts.reference needs a valid name and kind")
        references.append(
            ArtifactReference(name, row.count("version", 1, 1), row.hex32("sha256"), kind)
        )
        row.done()
    t.done()
    return {"artifact_floors": floors, "artifact_references": tuple(references)}


def _timing(attestation: _Table, keys: _Table) -> dict[str, Any]:
    out = {
        "attestation_interval_s": attestation.count("interval_s", 300, 1, 86400),
        "nonce_ttl_s": attestation.count("nonce_ttl_s", 60, 1, 3600),
        "lease_s": keys.count("lease_s", 3600, 10, 30 * 86400),
        "renew_margin_s": keys.count("renew_margin_s", 300, 1, 30 * 86400),
        "offline_grace_s": keys.count("offline_grace_s", 86400, 0, 365 * 86400),
    }
    attestation.done()
    keys.done()
    if out["renew_margin_s"] >= out["lease_s"]:
        raise FormatError("policy: keys.renew_margin_s must be shorter than keys.lease_s")
    return out


def parse_policy(text: str) -> FleetPolicy:
    """Parse and validate policy TOML; raise FormatError naming the offending key."""
    if len(text) > MAX_POLICY:
        raise FormatError(f"policy is larger than {MAX_POLICY} characters")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FormatError(f"policy is not valid TOML: {e}") from e
    except (ValueError, RecursionError) as e:  # a 4,300-digit number, arrays nested too deep
        raise FormatError(
            "policy is not valid TOML: a value is too long or nests too deeply"
        ) from e
    root = _Table(doc, "")
    fields = {
        "version": root.count("version", 1, 1),
        **_platform(root.table("platform")),
        **_enclave(root.table("enclave")),
        **_artifacts(root.table("artifacts")),
        **_timing(root.table("attestation"), root.table("keys")),
    }
    root.done()
    return FleetPolicy(**fields)
