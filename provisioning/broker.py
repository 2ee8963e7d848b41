"""`strongroom broker run`: write the generated Mosquitto configuration and run Mosquitto in the
foreground (it replaces this process, so signals and exit codes are Mosquitto's own)."""

from __future__ import annotations

import getpass
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from provisioning.broker_config import BrokerSettings, acl_text, mosquitto_conf
from provisioning.home import (
    DASHBOARD_CN,
    MAX_DASHBOARD_INSTANCES,
    MAX_VERIFIER_INSTANCES,
    VERIFIER_CN,
    FleetHome,
)
from strongroom.errors import EnvironmentFault
from strongroom.fsutil import SECRET_FILE, make_private_dir, write_atomic

DEFAULT_PORT = 8883


@dataclass(frozen=True)
class BrokerFiles:
    config: Path
    acl: Path
    data_dir: Path


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
    )
    if found is None:
        raise EnvironmentFault(
            "mosquitto is not installed",
            hint="install it (e.g. apt-get install mosquitto), or use --embedded for a demo broker",
        )
    return found


def write_broker_config(
    home: FleetHome, *, port: int = DEFAULT_PORT, bind: str = "127.0.0.1", tag: str = ""
) -> BrokerFiles:
    """Write `broker/mosquitto<tag>.conf`, its ACL and data directory into the fleet home."""
    directory = home.root / "broker"
    data = directory / f"data{tag}"
    make_private_dir(data)
    acl = directory / f"acl{tag}"
    config = directory / f"mosquitto{tag}.conf"
    settings = BrokerSettings(
        port=port,
        bind=bind,
        ca=home.ca_cert,
        cert=directory / "server.pem",
        key=directory / "server.key",
        acl=acl,
        data_dir=data,
        user=getpass.getuser(),
    )
    verifiers = _instances(VERIFIER_CN, MAX_VERIFIER_INSTANCES)
    dashboards = _instances(DASHBOARD_CN, MAX_DASHBOARD_INSTANCES)
    write_atomic(acl, acl_text(verifiers, dashboards).encode(), SECRET_FILE)
    write_atomic(config, mosquitto_conf(settings).encode(), SECRET_FILE)
    return BrokerFiles(config, acl, data)


def _instances(cn: str, maximum: int) -> tuple[str, ...]:
    """A role's identities: the default one and its numbered instances (issued on first use)."""
    return (cn, *(f"{cn}-{i}" for i in range(1, maximum + 1)))


def exec_mosquitto(files: BrokerFiles) -> None:
    binary = find_mosquitto()
    os.execv(binary, [binary, "-c", str(files.config)])  # noqa: S606 - fixed argv, no shell
