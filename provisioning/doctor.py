"""`strongroom doctor --home HOME`: the fleet side's checks of a fleet home.

The home marker; each secret present and closed to group and others; the CA, the broker's
certificate and the CRL valid (the CRL also signed by the CA); the policy and every registry entry
readable; the broker's generated configuration present; devices whose newest certificate expires
within 30 days. Findings and their output are the device side's (agent/doctor.py); this module only
adds the checks that read a fleet home.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509

from agent.doctor import (
    EXPIRY_WARNING_DAYS,
    Finding,
    error,
    mode_finding,
    ok,
    validity_finding,
    warning,
)
from provisioning import ca, crl
from provisioning.broker import broker_user, default_state_dir
from provisioning.crl import REVOKED_STATUS
from provisioning.home import PRIVATE_FILES, FleetHome, open_home
from provisioning.registry import Registry
from strongroom.errors import StrongroomError

RENEW_CA = "the fleet CA cannot be renewed in place: plan a new fleet home and re-enroll devices"


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _permissions(home: FleetHome) -> list[Finding]:
    found = []
    for name in PRIVATE_FILES:
        path = home.root / name
        if not path.exists():
            found.append(
                error("home.files", f"{path} is missing", "restore it from the home's backup")
            )
        else:
            found.append(mode_finding("permissions", path))
    return found


def _authority(home: FleetHome, now: dt.datetime) -> list[Finding]:
    found = []
    try:
        authority = _cert(home.ca_cert)
    except (OSError, ValueError) as e:
        return [error("ca.readable", f"cannot read {home.ca_cert}: {e}", RENEW_CA)]
    found.append(
        validity_finding("ca.validity", "the fleet CA certificate", authority, now, RENEW_CA)
    )
    server = home.root / "broker" / "server.pem"
    try:
        found.append(
            validity_finding(
                "broker.certificate",
                "the broker's TLS certificate",
                _cert(server),
                now,
                "issue the broker a new certificate from the fleet CA (broker/server.pem)",
            )
        )
    except (OSError, ValueError) as e:
        found.append(error("broker.certificate", f"cannot read {server}: {e}", "restore it"))
    try:
        _pem, verified = crl.read_crl(home)
        crl_doc = x509.load_pem_x509_crl(_pem)
    except (StrongroomError, ValueError) as e:
        return [
            *found,
            error(
                "crl.validity",
                f"the fleet CRL does not verify: {e}",
                "revoke or reinstate a device to write a new CRL (its previous copy stays with "
                "the broker until then)",
            ),
        ]
    next_update = crl_doc.next_update_utc
    if next_update is not None and next_update < now:
        found.append(
            error(
                "crl.validity",
                f"the fleet CRL expired on {next_update:%Y-%m-%d}: the broker refuses every client",
                "write a new CRL (e.g. `strongroom device reinstate` of any active device)",
            )
        )
    else:
        until = f", valid until {next_update:%Y-%m-%d}" if next_update else ""
        found.append(
            ok(
                "crl.validity",
                f"CRL number {verified.number}, {len(verified.entries)} entries, signed by the "
                f"fleet CA{until}",
            )
        )
    return found


def _broker_config(home: FleetHome) -> Finding:
    try:
        state = default_state_dir(home, broker_user())
    except StrongroomError as e:
        return warning("broker.config", f"cannot tell where the broker's files are: {e}", e.hint)
    conf = state / "mosquitto.conf"
    try:
        present = conf.is_file()
    except OSError:
        present = False
    if not present:
        return warning(
            "broker.config",
            f"no generated broker configuration at {conf}",
            "`strongroom broker run --home HOME` writes it (pass the same --state-dir if it "
            "uses another one)",
        )
    return ok("broker.config", f"generated broker configuration at {conf}")


def _registry(home: FleetHome, now: dt.datetime) -> list[Finding]:
    registry = Registry(home.registry_dir)
    try:
        ids = registry.device_ids()
    except OSError as e:
        return [error("registry.readable", f"cannot list {home.registry_dir}: {e}", "check it")]
    found, unreadable, expiring = [], [], []
    for device_id in ids:
        try:
            record = registry.get(device_id)
        except StrongroomError as e:
            unreadable.append(f"{device_id} ({e})")
            continue
        if record.status == REVOKED_STATUS:
            continue  # its certificate is on the CRL: nothing to renew
        issued = home.root / "ca" / "issued" / device_id
        try:
            certs = [ca.cert_info(p.read_bytes()) for p in sorted(issued.glob("*.pem"))]
        except (OSError, ValueError):
            certs = []
        if certs:
            newest = max(c.not_after for c in certs)
            left = (newest - now).total_seconds() / 86400
            if left < EXPIRY_WARNING_DAYS:
                when = "expired" if left < 0 else f"expires in {left:.0f} days"
                expiring.append(f"{device_id} ({when}, {newest:%Y-%m-%d})")
    if unreadable:
        found.append(
            error(
                "registry.readable",
                f"unreadable registry entries: {', '.join(unreadable)}",
                "restore them from a backup, or re-enroll those devices",
            )
        )
    else:
        found.append(ok("registry.readable", f"{len(ids)} device(s) in the registry"))
    if expiring:
        found.append(
            warning(
                "devices.expiry",
                f"device certificates expiring within {EXPIRY_WARNING_DAYS} days: "
                f"{', '.join(expiring)}",
                "re-enroll them (`strongroom device enroll --force`) and give them the new bundle",
            )
        )
    else:
        found.append(
            ok("devices.expiry", f"no device certificate expires within {EXPIRY_WARNING_DAYS} days")
        )
    return found


def check_home(root: Path) -> list[Finding]:
    """Every fleet-side check of the home at `root`."""
    now = dt.datetime.now(dt.UTC)
    try:
        home = open_home(root)
    except StrongroomError as e:
        return [error("home.marker", str(e), "pass the directory `strongroom fleet init` made")]
    found = [ok("home.marker", f"fleet home of fleet {home.fleet_id}")]
    found += _permissions(home)
    found += _authority(home, now)
    try:
        home.load_policy()
        found.append(ok("policy.readable", f"{home.policy_path} parses"))
    except StrongroomError as e:
        found.append(error("policy.readable", f"the fleet policy does not load: {e}", e.hint))
    found.append(_broker_config(home))
    found += _registry(home, now)
    return found
