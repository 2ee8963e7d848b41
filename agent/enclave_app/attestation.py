"""Local attestation: does this platform meet the enclave's own (measured) policy?"""

from __future__ import annotations

from dataclasses import dataclass

from strongroom.report import Report


@dataclass(frozen=True)
class EnclavePolicy:
    min_firmware: str = "1.0.0"
    smt: str = "allow"
    require_secure_boot: bool = True


def _firmware(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in value.split("."))
    except ValueError:
        return (-1,)


def platform_problems(report: Report, policy: EnclavePolicy) -> list[str]:
    """Every reason this platform is not trustworthy for this enclave (empty: it is)."""
    claims, identity = report.claims, report.identity
    problems = []
    if _firmware(claims.firmware) < _firmware(policy.min_firmware):
        problems.append(
            f"platform firmware {claims.firmware} is below the minimum {policy.min_firmware}"
        )
    if claims.debug and not identity.debug:
        problems.append("platform is in debug mode and this is not a debug enclave")
    if policy.smt == "deny" and claims.smt is not False:
        state = "unknown" if claims.smt is None else "on"
        problems.append(f"SMT/hyper-threading is {state} and the enclave policy denies it")
    if policy.require_secure_boot and not claims.secure_boot:
        problems.append("secure boot is off")
    return problems
