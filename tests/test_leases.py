"""Continuous trust: key leases, expiry with wipe and recovery, offline grace, stale devices."""

from __future__ import annotations

from tests.fleet import Fleet, wait_until


def _answer(fleet: Fleet, device_id: str) -> tuple[int, str]:
    done = fleet.invoke(device_id, "vendor:echo", "1")
    return done.returncode, done.stderr


def test_an_expired_lease_wipes_the_enclave_which_recovers_after_attesting_again(
    fleet: Fleet,
) -> None:
    fleet.set_policy("lease_s = 3600", "lease_s = 10")
    fleet.set_policy("renew_margin_s = 300", "renew_margin_s = 3")
    fleet.set_policy("offline_grace_s = 86400", "offline_grace_s = 0")
    fleet.start()
    fleet.enroll("cam-l")
    fleet.agent("cam-l")
    fleet.observer.wait_result("cam-l", "affirming")
    wait_until(lambda: _answer(fleet, "cam-l")[0] == 0, 20, "the first answer")

    fleet.verifier.stop()  # the fleet is out of reach: no renewal
    wait_until(lambda: "lease expired" in _answer(fleet, "cam-l")[1], 30, "the lease to expire")

    # offline beyond the grace, a restart cannot unseal either
    fleet.agents["cam-l"].stop()
    agent = fleet.agent("cam-l")
    wait_until(
        lambda: "expired" in agent.log() and "artifact_needs_key" in agent.log(),
        20,
        "the refused unseal",
    )
    assert _answer(fleet, "cam-l")[0] != 0

    fleet.start_verifier()  # back in reach: a fresh attestation brings the keys back
    wait_until(lambda: _answer(fleet, "cam-l")[0] == 0, 40, "service after re-attestation")


def test_a_lease_is_renewed_by_a_fresh_appraisal_before_it_ends(fleet: Fleet) -> None:
    fleet.set_policy("lease_s = 3600", "lease_s = 10")
    fleet.set_policy("renew_margin_s = 300", "renew_margin_s = 8")
    fleet.set_policy("offline_grace_s = 86400", "offline_grace_s = 0")
    fleet.set_policy("interval_s = 300", "interval_s = 1")
    fleet.start()
    fleet.enroll("cam-r")
    fleet.agent("cam-r")
    fleet.observer.wait_result("cam-r", "affirming")
    wait_until(lambda: fleet.verifier.log().count('"key_released"') >= 3, 30, "two renewals")
    assert _answer(fleet, "cam-r")[0] == 0  # never interrupted
    assert "lease expired" not in fleet.agents["cam-r"].log()


def test_a_silent_device_is_marked_stale(fleet: Fleet) -> None:
    fleet.set_policy("interval_s = 300", "interval_s = 1")
    fleet.set_policy("offline_grace_s = 86400", "offline_grace_s = 1")
    fleet.start()
    fleet.enroll("cam-s")
    agent = fleet.agent("cam-s")
    fleet.observer.wait_result("cam-s", "affirming")
    agent.p.kill()
    stale = fleet.observer.wait_result("cam-s", "none", timeout=20)
    assert stale.reasons[0].startswith("stale:")
