"""Appraisal: a pure function of (verified evidence, fleet policy, registry record) -> result.

Each check sets one AR4SI trustworthiness claim; the result's status is the worst tier among them.
No I/O, no clock, no state: freshness (nonces, sequence numbers) is checked by the service against
the state store, and the signature before this is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from provisioning.registry import DeviceRecord
from strongroom.ear import TIERS, VECTOR_KEYS, tier_of
from strongroom.errors import InputError
from strongroom.evidence import Evidence
from strongroom.fields import parse_firmware
from strongroom.policy import FleetPolicy
from strongroom.report import key_binding

AFFIRMING, WARNING, CONTRAINDICATED = 2, 32, 96
UNRECOGNIZED = 33  # AR4SI executables: not recognized, but not known bad


@dataclass(frozen=True)
class Appraisal:
    status: str
    vector: dict[str, int]
    reasons: tuple[str, ...]


@lru_cache(maxsize=1024)  # a fleet reports few distinct versions; parsed once each
def _firmware(value: str) -> tuple[int, int, int]:
    try:
        return parse_firmware(value)
    except InputError:  # an unparsable firmware claim sorts below every minimum
        return (-1, -1, -1)


class _Vector:
    """AR4SI claims being filled in; each claim keeps the worst value it was given."""

    def __init__(self) -> None:
        self.values = dict.fromkeys(VECTOR_KEYS, 0)
        self.reasons: list[str] = []

    def set(self, key: str, value: int, reason: str | None = None) -> None:
        current = self.values[key]
        if value != current and tier_weight(value) >= tier_weight(current):
            self.values[key] = value
        if reason:
            self.reasons.append(reason)


@dataclass(frozen=True)
class _References:
    """What appraisal looks up in a policy, indexed once per policy rather than per evidence."""

    min_firmware: tuple[int, int, int]
    signers: frozenset[str]
    enclaves: frozenset[tuple[str, int, bool, int]]
    artifacts: dict[tuple[str, int], str]


_indexed: tuple[FleetPolicy, _References] | None = None  # the last policy seen, and its index


def _references(policy: FleetPolicy) -> _References:
    """The policy's index, made again only when the verifier holds another policy object (a
    policy is immutable, and replaced as a whole when its file is read again)."""
    global _indexed  # noqa: PLW0603 - a memo of a pure function of an immutable value
    if _indexed is not None and _indexed[0] is policy:
        return _indexed[1]
    refs = _References(
        min_firmware=policy.min_firmware_tuple,
        signers=frozenset(policy.allowed_signers),
        enclaves=frozenset(
            (r.mrenclave, r.svn, r.debug, r.product_id) for r in policy.enclave_references
        ),
        artifacts={(a.name, a.version): a.sha256 for a in policy.artifact_references},
    )
    _indexed = (policy, refs)
    return refs


def _platform(v: _Vector, ev: Evidence, policy: FleetPolicy) -> None:
    v.set("hardware", AFFIRMING)
    if _firmware(ev.firmware) < _references(policy).min_firmware:
        v.set(
            "hardware",
            CONTRAINDICATED,
            f"firmware {ev.firmware} is below the fleet minimum {policy.min_firmware}",
        )
    v.set("configuration", AFFIRMING)
    if ev.platform_debug and not policy.allow_debug_platform:
        v.set("configuration", CONTRAINDICATED, "platform is in debug mode")
    if policy.require_secure_boot and not ev.secure_boot:
        v.set("configuration", CONTRAINDICATED, "secure boot is off")
    if policy.smt == "deny" and ev.smt is not False:
        v.set("configuration", CONTRAINDICATED, "SMT is on or unknown and the policy denies it")


def _enclave(v: _Vector, ev: Evidence, policy: FleetPolicy) -> None:
    v.set("executables", AFFIRMING)
    e, references = ev.enclave, _references(policy)
    if e.mrsigner not in references.signers:
        v.set("executables", CONTRAINDICATED, "enclave signer is not allowed by the policy")
    if (e.mrenclave, e.svn, e.debug, e.product_id) not in references.enclaves:
        v.set(
            "executables",
            CONTRAINDICATED,
            f"enclave measurement {e.mrenclave[:16]} (SVN {e.svn}) is not a reference value",
        )
    if e.svn < policy.min_svn:
        v.set(
            "executables",
            CONTRAINDICATED,
            f"enclave SVN {e.svn} is below the fleet minimum {policy.min_svn}",
        )
    if e.debug and not policy.allow_debug_images:
        v.set("executables", CONTRAINDICATED, "debug enclave image")


def _artifacts(v: _Vector, ev: Evidence, policy: FleetPolicy) -> None:
    refs = _references(policy).artifacts
    for a in ev.artifacts:
        floor = policy.artifact_floors.get(a.name)
        if floor is not None and a.version < floor:
            v.set(
                "executables",
                CONTRAINDICATED,
                f"artifact {a.name} v{a.version} is below the floor v{floor} (rollback)",
            )
        expected = refs.get((a.name, a.version))
        if expected is None:
            v.set("executables", UNRECOGNIZED, f"artifact {a.name} v{a.version} is not known")
        elif expected != a.sha256:
            v.set(
                "executables",
                CONTRAINDICATED,
                f"artifact {a.name} v{a.version} does not match its reference digest",
            )


def appraise(ev: Evidence, policy: FleetPolicy, device: DeviceRecord) -> Appraisal:
    v = _Vector()
    v.set("instance-identity", AFFIRMING)
    if device.status != "active":
        v.set("instance-identity", CONTRAINDICATED, f"device is {device.status}")
    _platform(v, ev, policy)
    _enclave(v, ev, policy)
    _artifacts(v, ev, policy)
    v.set("runtime-opaque", AFFIRMING)
    if ev.local_attestation != "passed":
        v.set("runtime-opaque", CONTRAINDICATED, "enclave local attestation did not pass")
    if ev.key_binding != key_binding(ev.enclave_key, ev.nonce):
        v.set("runtime-opaque", CONTRAINDICATED, "enclave key is not bound to the nonce")
    v.set("storage-opaque", AFFIRMING)
    worst = max(v.values.values(), key=tier_weight)
    return Appraisal(tier_of(worst), v.values, tuple(v.reasons))


def tier_weight(value: int) -> int:
    weight = _WEIGHTS.get(value)
    return TIERS[tier_of(value)] if weight is None else weight


_WEIGHTS = {v: TIERS[tier_of(v)] for v in (0, AFFIRMING, WARNING, UNRECOGNIZED, CONTRAINDICATED)}
