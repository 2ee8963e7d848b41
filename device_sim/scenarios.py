"""The simulator's scenarios: what each kind of virtual device does and the verdict expected of
the fleet (or of the device's own platform) for it. Pure data."""

from __future__ import annotations

from dataclasses import dataclass

from strongroom.errors import InputError

# Verdicts, as the scorecard observes them
AFFIRMING = "affirming"  # trusted: affirming results (and released keys open in the enclave)
CONTRAINDICATED = "contraindicated"  # the verifier appraised it untrustworthy (and revoked it)
REJECTED = "rejected"  # the verifier refused its messages (alerts name the device)
KEYS_REFUSED = "keys-refused"  # the key broker refused the keys it asked for
REFUSED_LOCALLY = "refused-locally"  # its own platform or enclave refused (launch, open, unseal)
DENIED = "denied"  # the broker's ACL stopped it
RECOVERED = "recovered"  # a fault scenario's expected recovery was seen
NOT_RECOVERED = "not-recovered"
SKIPPED = "skipped"


@dataclass(frozen=True)
class Scenario:
    name: str
    expected: str
    attack: bool  # whether detecting it counts as a detection (not a fault)
    summary: str


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("healthy", AFFIRMING, False, "attests, gets its keys, opens its artifact"),
        Scenario(
            "tampered-image",
            CONTRAINDICATED,
            True,
            "runs a modified enclave image re-signed with the attacker's key",
        ),
        Scenario(
            "tampered-artifact",
            REFUSED_LOCALLY,
            True,
            "holds a modified copy of its artifact: the enclave refuses to open it",
        ),
        Scenario(
            "rollback-artifact",
            KEYS_REFUSED,
            True,
            "asks for the key of an artifact version below the policy floor",
        ),
        Scenario(
            "rollback-svn", CONTRAINDICATED, True, "runs an older enclave below the minimum SVN"
        ),
        Scenario("old-firmware", CONTRAINDICATED, True, "platform firmware below the minimum"),
        Scenario(
            "debug-platform",
            REFUSED_LOCALLY,
            True,
            "platform in debug mode: the enclave's local attestation refuses it",
        ),
        Scenario("replay", REJECTED, True, "re-sends evidence captured earlier"),
        Scenario("impersonate", REJECTED, True, "signs evidence with a key not registered to it"),
        Scenario(
            "clone",
            REJECTED,
            True,
            "a copy of the bundle on another platform secret, counters lost, attests again",
        ),
        Scenario(
            "stolen-sealed-keys",
            REFUSED_LOCALLY,
            True,
            "tries to unseal another device's sealed key blob",
        ),
        Scenario(
            "cross-topic", DENIED, True, "publishes and subscribes on another device's topics"
        ),
        Scenario("malformed", REJECTED, True, "garbage, oversized and truncated evidence"),
        Scenario(
            "broker-restart",
            RECOVERED,
            False,
            "the broker restarts mid-run: results before and after, nothing lost",
        ),
        Scenario(
            "offline",
            RECOVERED,
            False,
            "drops off within the grace (not stale), then beyond it (stale), then returns",
        ),
    )
}
DEFAULT = tuple(SCENARIOS)


def parse_scenarios(text: str) -> tuple[str, ...]:
    """A comma-separated list of scenario names ("all" for every one); healthy always runs."""
    names = DEFAULT if text.strip() == "all" else tuple(n.strip() for n in text.split(",") if n)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise InputError(
            f"unknown scenario {unknown[0]!r}", hint=f"choose from: {', '.join(SCENARIOS)}"
        )
    return ("healthy", *(n for n in names if n != "healthy"))


def shares(devices: int, names: tuple[str, ...]) -> dict[str, int]:
    """Devices per scenario: each attack or fault gets 1% of the fleet (at least one device),
    healthy devices the rest (at least one)."""
    others = [n for n in names if n != "healthy"]
    share = max(1, devices // 100)
    counts = {"healthy": max(1, devices - share * len(others))}
    counts.update(dict.fromkeys(others, share))
    return counts
