"""`strongroom doctor`: checks of a device bundle (here) or a fleet home (provisioning/doctor.py),
each finding with its level, what was seen and what to do.

`doctor --bundle DIR [--broker URL]` reads the bundle's files, their permissions, the client
certificate and the CA, the simulated platform (profile, root secret, MAC'd counters), whether an
agent holds the bundle, and with a broker: TCP and TLS with it (no MQTT session, so a running agent
is not disturbed) and this machine's clock against the broker's certificate. `doctor --home HOME`
runs the fleet side's checks, which the composition root (strongroom/cli.py) hands in: the device
side imports nothing of the fleet side. Human output by default, `--json` for scripts; exit 0 when
no finding is an error, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from agent import lock
from strongroom import bundle, canonical
from strongroom.errors import EnvironmentFault, InputError, StrongroomError
from strongroom.mqtt import (
    MqttSettings,
    add_mqtt_version,
    check_broker,
    mqtt_protocol,
    parse_broker_url,
)

Level = Literal["ok", "warning", "error"]
EXPIRY_WARNING_DAYS = 30
SECRET_FILES = (bundle.TLS_KEY_FILE, bundle.ROOT_SECRET_FILE, bundle.ATTESTATION_KEY_FILE)


@dataclass(frozen=True)
class Finding:
    level: Level
    check: str  # a stable name, e.g. "certificate.validity"
    what: str  # what was seen
    todo: str = ""  # what to do (empty when all is well)


# The fleet side's checks of a fleet home, supplied by the composition root.
FleetChecks = Callable[[Path], list[Finding]]


def ok(check: str, what: str) -> Finding:
    return Finding("ok", check, what)


def warning(check: str, what: str, todo: str) -> Finding:
    return Finding("warning", check, what, todo)


def error(check: str, what: str, todo: str) -> Finding:
    return Finding("error", check, what, todo)


def days_left(not_after: dt.datetime, now: dt.datetime) -> float:
    return (not_after - now).total_seconds() / 86400


def validity_finding(
    check: str, what: str, cert: x509.Certificate, now: dt.datetime, renew: str
) -> Finding:
    """A certificate's validity at `now`: error outside it, warning within 30 days of its end."""
    before, after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < before:
        return error(
            check,
            f"{what} is valid only from {before:%Y-%m-%d %H:%M} UTC (this clock says "
            f"{now:%Y-%m-%d %H:%M})",
            "set this machine's clock right (e.g. enable NTP)",
        )
    left = days_left(after, now)
    if left < 0:
        return error(check, f"{what} expired on {after:%Y-%m-%d} ({-left:.0f} days ago)", renew)
    if left < EXPIRY_WARNING_DAYS:
        return warning(check, f"{what} expires on {after:%Y-%m-%d}, in {left:.0f} days", renew)
    return ok(check, f"{what} is valid until {after:%Y-%m-%d} ({left:.0f} days)")


def mode_finding(check: str, path: Path) -> Finding:
    """A secret file must be closed to group and others (like ssh's private keys)."""
    try:
        mode = stat.S_IMODE(path.lstat().st_mode)
    except OSError as e:
        return error(check, f"cannot stat {path}: {e.strerror}", "check the bundle's files")
    if mode & 0o077:
        who = "everyone" if mode & 0o007 else "its group"
        return error(
            check,
            f"{path} (mode {mode:04o}) is open to {who}",
            f"run chmod 600 {path}; if other users could read it, have the device re-enrolled",
        )
    return ok(check, f"{path} is private (mode {mode:04o})")


# -- the device ---------------------------------------------------------------------------------


def _files(root: Path) -> list[Finding]:
    if not root.is_dir():
        return [error("bundle.files", f"{root} is not a directory", "pass the bundle directory")]
    missing = [name for name in bundle.BUNDLE_FILES if not (root / name).is_file()]
    if missing:
        return [
            error(
                "bundle.files",
                f"missing from {root}: {', '.join(missing)}",
                "copy the whole bundle written by `strongroom device enroll` again",
            )
        ]
    found = [ok("bundle.files", f"all {len(bundle.BUNDLE_FILES)} bundle files are present")]
    if not (root / "enclave.img").is_file():
        found.append(
            warning(
                "bundle.image",
                f"no enclave image at {root / 'enclave.img'}",
                "copy the fleet's enclave image there, or pass --image to `agent run`",
            )
        )
    return found


def _bundle_info(root: Path) -> tuple[bundle.BundleInfo | None, Finding]:
    try:
        doc = canonical.loads_object((root / bundle.BUNDLE_FILE).read_bytes(), "bundle")
        info = bundle.BundleInfo.from_json_dict(doc)
    except (OSError, StrongroomError) as e:
        return None, error(
            "bundle.readable", f"cannot read {root / bundle.BUNDLE_FILE}: {e}", "copy it again"
        )
    return info, ok(
        "bundle.readable", f"bundle of device {info.device_id} in fleet {info.fleet_id}"
    )


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _certificates(root: Path, info: bundle.BundleInfo | None, now: dt.datetime) -> list[Finding]:
    renew = "have the fleet operator re-enroll this device (`strongroom device enroll --force`)"
    try:
        ca = _load_cert(root / bundle.TLS_CA_FILE)
        cert = _load_cert(root / bundle.TLS_CERT_FILE)
    except (OSError, ValueError) as e:
        return [error("certificate.readable", f"cannot read the TLS certificates: {e}", renew)]
    found = [
        validity_finding("certificate.validity", "the client certificate", cert, now, renew),
        validity_finding("ca.validity", "the fleet CA certificate", ca, now, renew),
    ]
    try:
        cert.verify_directly_issued_by(ca)
        found.append(ok("certificate.issuer", "the client certificate was issued by tls/ca.pem"))
    except (ValueError, TypeError, InvalidSignature):
        found.append(
            error(
                "certificate.issuer",
                "the client certificate was not issued by the bundle's CA (tls/ca.pem)",
                "the bundle mixes files of two fleets or enrollments: copy it whole again",
            )
        )
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else ""
    if info is not None and cn != info.device_id:
        found.append(
            error(
                "certificate.identity",
                f"the certificate names {cn!r}, the bundle device {info.device_id!r}",
                "copy the whole bundle again",
            )
        )
    try:
        key = serialization.load_pem_private_key(
            (root / bundle.TLS_KEY_FILE).read_bytes(), password=None
        )
        same = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) == cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (OSError, ValueError, TypeError) as e:
        return [*found, error("certificate.key", f"cannot read tls/client.key: {e}", renew)]
    if not same:
        found.append(
            error("certificate.key", "tls/client.key does not match tls/client.pem", renew)
        )
    return found


def _platform(root: Path) -> list[Finding]:
    from agent.platform_service import SimulatedPlatform  # noqa: PLC0415 - only for this check

    pdir = root / bundle.PLATFORM_DIR
    if not os.access(pdir, os.R_OK | os.X_OK):
        return [
            warning(
                "platform.health",
                f"{pdir} is not readable by this user (privilege separation gives it to the "
                "platform's user)",
                "run doctor as root to check the platform",
            )
        ]
    try:
        platform = SimulatedPlatform(root)
        seq = platform.counters.read("evidence-seq")
    except StrongroomError as e:
        return [
            error(
                "platform.health",
                f"the platform does not load: {e}",
                "the platform files are damaged or were tampered with: have the device re-enrolled",
            )
        ]
    profile = platform.profile
    return [
        ok(
            "platform.health",
            f"platform loads: root secret {bundle.ROOT_SECRET_SIZE} bytes, counters intact "
            f"(evidence sequence {seq}), firmware {profile.firmware}, debug {profile.debug}, "
            f"secure boot {profile.secure_boot}",
        )
    ]


def _agent(root: Path, state: Path) -> Finding:
    """Whether an agent holds the bundle: read from the kernel's table of locks, never by taking
    the lock (an agent starting at that instant would find it taken and refuse to run)."""
    try:
        pid = lock.holder(root)
    except OSError as e:
        return warning(
            "agent.running",
            f"cannot tell whether an agent is running with {root}: {e.strerror}",
            "check with `systemctl status` or `ps` (this check reads /proc/locks)",
        )
    if pid is not None:
        return ok("agent.running", f"an agent (PID {pid}) is running with {root}")
    path = state / lock.PID_FILE
    try:
        path.lstat()
    except FileNotFoundError:
        return ok("agent.running", f"no agent is running with {root}")
    except OSError as e:
        return warning(
            "agent.running",
            f"no agent holds {root}, and {path} cannot be read: {e.strerror}",
            "run doctor as root or as the agent's user to check the state directory",
        )
    return ok(
        "agent.running",
        f"no agent is running with {root} (the last one did not remove {path}: it was killed)",
    )


def _broker(root: Path, url: str, protocol: Any, now: dt.datetime) -> list[Finding]:
    host, port = parse_broker_url(url)
    settings = MqttSettings(
        host,
        port,
        root / bundle.TLS_CA_FILE,
        root / bundle.TLS_CERT_FILE,
        root / bundle.TLS_KEY_FILE,
        "doctor",
        protocol=protocol,
    )
    try:
        checked = check_broker(settings)
    except StrongroomError as e:
        return [error("broker.connection", str(e), e.hint)]
    found = []
    if checked.problem is None:
        found.append(
            ok(
                "broker.connection",
                f"{checked.where}: TLS with our CA and identity accepted (no MQTT session opened)",
            )
        )
    else:
        p = checked.problem
        found.append(error("broker.connection", f"{p.cause}: {p.detail}", p.hint))
    before, after = checked.broker_not_before, checked.broker_not_after
    if before is None or after is None:
        return found
    compared = (
        f"this clock ({now:%Y-%m-%d %H:%M} UTC) against the broker certificate's validity "
        f"({before:%Y-%m-%d %H:%M} to {after:%Y-%m-%d}; MQTT carries no time, so only a clock "
        "outside that window shows)"
    )
    if not before <= now <= after:
        found.append(
            error("clock.skew", f"compared {compared}: outside it", "set this clock (NTP)")
        )
    else:
        found.append(ok("clock.skew", f"compared {compared}: inside it"))
    return found


def check_bundle(
    root: Path, broker: str | None = None, protocol: Any = 5, state: Path | None = None
) -> list[Finding]:
    """Every device check of the bundle at `root` (and of its broker, if given)."""
    now = dt.datetime.now(dt.UTC)
    found = _files(root)
    if found[0].level == "error":
        return found
    info, readable = _bundle_info(root)
    found.append(readable)
    found += [mode_finding("permissions", root / name) for name in SECRET_FILES]
    found += _certificates(root, info, now)
    found += _platform(root)
    found.append(_agent(root, state or root / "state"))
    if broker:
        found += _broker(root, broker, protocol, now)
    return found


# -- output -------------------------------------------------------------------------------------

_MARKS = {"ok": "ok     ", "warning": "WARNING", "error": "ERROR  "}


def report(findings: Iterable[Finding], as_json: bool) -> int:
    """Print the findings; 1 if any is an error, else 0."""
    findings = list(findings)
    if as_json:
        print(json.dumps({"findings": [asdict(f) for f in findings]}, indent=2))
    else:
        for f in findings:
            print(f"{_MARKS[f.level]} {f.check}: {f.what}")
            if f.todo:
                print(f"        -> {f.todo}")
        errors = sum(f.level == "error" for f in findings)
        warnings = sum(f.level == "warning" for f in findings)
        print(f"{errors} error(s), {warnings} warning(s)")
    return 1 if any(f.level == "error" for f in findings) else 0


def _doctor(args: argparse.Namespace) -> int:
    if args.bundle is None and args.home is None:
        raise InputError("doctor needs --bundle DIR (a device) or --home HOME (the fleet)")
    if args.broker and args.bundle is None:
        raise InputError("--broker checks a device's connection: give its --bundle too")
    if args.broker:
        parse_broker_url(args.broker)  # a usage error before any check, whatever they find
    findings: list[Finding] = []
    if args.bundle is not None:
        findings += check_bundle(args.bundle, args.broker, mqtt_protocol(args.mqtt), args.state)
    if args.home is not None:
        checks: FleetChecks | None = args.fleet_checks
        if checks is None:
            raise EnvironmentFault(
                "`strongroom doctor --home` checks a fleet home, and the fleet side is not "
                "installed here",
                hint="pip install 'strongroom[fleet]'",
            )
        findings += checks(args.home)
    return report(findings, args.json)


def register(roles: Any, fleet_checks: FleetChecks | None = None) -> None:
    """Add the top-level `doctor`; `fleet_checks` serves `--home`."""
    p = roles.add_parser(
        "doctor", help="check a device bundle or a fleet home; each finding says what to do"
    )
    p.add_argument("--bundle", type=Path, metavar="DIR", help="a device bundle to check")
    p.add_argument("--broker", metavar="URL", help="with --bundle: also check this broker")
    p.add_argument("--state", type=Path, help="with --bundle: the agent's state directory")
    p.add_argument("--home", type=Path, metavar="HOME", help="a fleet home to check")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    add_mqtt_version(p)
    p.set_defaults(handler=_doctor, fleet_checks=fleet_checks)
