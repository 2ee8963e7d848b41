"""The simulator's fleet home: created on first use with everything its scenarios need, reused
after. It is a fleet of its own (policy tuned for short runs); the simulator refuses to change a
home it did not create.

    HOME/sim/created                marker: this home belongs to the simulator
    HOME/sim/images/current.img     the fleet's enclave (SVN 2)
    HOME/sim/images/old.img         an older build (SVN 1, below the fleet minimum)
    HOME/sim/images/attacker.img    a modified enclave re-signed with an attacker's key
    HOME/sim/artifacts/model-v2.sealed, model-v1.sealed (below the floor), tampered.sealed
    HOME/sim/devices/<id>/          device bundles, enrolled once and reused
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agent.enclave_source import write_enclave_source
from device_sim.scenarios import SCENARIOS
from provisioning.build import build_enclave
from provisioning.enroll import enroll_device
from provisioning.home import FleetHome, init_home, open_home
from provisioning.policy_file import set_values
from provisioning.registry import Registry
from provisioning.seal import seal_artifact
from strongroom.errors import InputError
from strongroom.fsutil import write_atomic
from verifier.operator import ACTIVE, set_status

MARKER = "created"
MODEL = "sim-model"
FLEET_MIN_FIRMWARE = "1.1.0"
FIRMWARE = {"old-firmware": "1.0.0"}  # passes the enclave's own floor (1.0.0), not the fleet's
HEALTHY_FIRMWARE = "1.2.0"


@dataclass(frozen=True)
class Kit:
    home: FleetHome
    root: Path

    @property
    def image(self) -> Path:
        return self.root / "images" / "current.img"

    @property
    def old_image(self) -> Path:
        return self.root / "images" / "old.img"

    @property
    def attacker_image(self) -> Path:
        return self.root / "images" / "attacker.img"

    @property
    def model(self) -> Path:
        return self.root / "artifacts" / "model-v2.sealed"

    @property
    def old_model(self) -> Path:
        return self.root / "artifacts" / "model-v1.sealed"

    @property
    def tampered_model(self) -> Path:
        return self.root / "artifacts" / "tampered.sealed"

    def bundle(self, device_id: str) -> Path:
        return self.root / "devices" / device_id


def plan_fleet(counts: dict[str, int]) -> dict[str, str]:
    """Device id -> scenario. Ids name their scenario, so a reused bundle always has the
    platform profile its scenario needs."""
    plan = {}
    for scenario, count in counts.items():
        prefix = "sim" if scenario == "healthy" else f"sim-{scenario}"
        plan.update({f"{prefix}-{i:05d}": scenario for i in range(count)})
    return plan


def load_kit(home_dir: Path) -> Kit:
    """The simulator's existing home at `home_dir`; InputError for any other directory."""
    root = home_dir / "sim"
    if not (root / MARKER).exists():
        raise InputError(
            f"{home_dir} is not a fleet home made by the simulator",
            hint="give a new directory: the simulator sets up a fleet of its own there",
        )
    return Kit(open_home(home_dir), root)


def open_kit(home_dir: Path, *, interval_s: int, grace_s: int) -> Kit:
    """The simulator's home at `home_dir`, created (with a policy for runs of minutes: attest
    every `interval_s`, stale after `grace_s` more) if the directory does not exist yet."""
    if home_dir.exists():
        return load_kit(home_dir)
    home = init_home(home_dir)
    kit = Kit(home, home_dir / "sim")
    _prepare(kit, interval_s, grace_s)
    return kit


def _prepare(kit: Kit, interval_s: int, grace_s: int) -> None:
    home, root = kit.home, kit.root
    for d in ("images", "artifacts", "devices", "src"):
        (root / d).mkdir(parents=True, mode=0o700, exist_ok=True)
    src = root / "src" / "enclave"
    write_enclave_source(src, home.verify_key("artifact"), home.result_verify_key())
    build_enclave(home, src, kit.old_image, svn=1)
    build_enclave(home, src, kit.image, svn=2)
    attacker = init_home(root / "attacker-home")
    evil = root / "src" / "attacker"
    write_enclave_source(evil, home.verify_key("artifact"), home.result_verify_key())
    (evil / "strongroom_backdoor.py").write_text("LEAK = True\n")
    build_enclave(attacker, evil, kit.attacker_image, svn=2)
    payload = root / "src" / "model.bin"
    payload.write_bytes(os.urandom(4096))
    seal_artifact(home, payload, kit.old_model, name=MODEL, version=1, kind="model")
    seal_artifact(home, payload, kit.model, name=MODEL, version=2, kind="model")
    data = bytearray(kit.model.read_bytes())
    data[-20] ^= 0x01  # one bit of the last chunk's ciphertext
    write_atomic(kit.tampered_model, bytes(data), 0o644)
    set_values(
        home.policy_path,
        {
            ("enclave", "min_svn"): 2,
            ("platform", "min_firmware"): FLEET_MIN_FIRMWARE,
            ("artifacts", "floors"): {MODEL: 2},
            ("attestation", "interval_s"): interval_s,
            ("keys", "offline_grace_s"): grace_s,
        },
    )
    (root / MARKER).write_text("this fleet home was made by `strongroom sim run`\n")


def enroll(kit: Kit, plan: dict[str, str]) -> None:
    """Enroll the devices of `plan` that are not enrolled yet (bundles are reused), with the
    platform profile their scenario needs; reinstate any revoked by an earlier run."""
    registry = Registry(kit.home.registry_dir)
    for device_id, scenario in plan.items():
        if scenario not in SCENARIOS:
            raise InputError(f"unknown scenario {scenario!r}")
        if kit.bundle(device_id).exists() and registry.exists(device_id):
            set_status(kit.home, device_id, ACTIVE, reason="new simulator run", by="simulator")
            continue
        enroll_device(
            kit.home,
            device_id,
            kit.bundle(device_id),
            firmware=FIRMWARE.get(scenario, HEALTHY_FIRMWARE),
            debug_platform=scenario == "debug-platform",
            force=True,
        )
