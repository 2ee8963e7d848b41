"""The fleet's certificate revocation list (CRL) in the fleet home, kept from the record of the
TLS client certificates issued to each device.

Layout, in the fleet home::

    ca/crl.pem                          the CRL, signed by the fleet CA (public)
    ca/crl.lock                         held (flock) while the CRL is rewritten
    ca/issued/<device id>/<serial>.pem  every client certificate issued to the device

What the CRL says about a device follows from its registry entry (`sync_device`), so every
command that changes the entry ends by calling it, and calling it again repairs a CRL that an
earlier failure left behind:

- the current certificate (the fingerprint in the registry) of a revoked device is listed as
  `certificateHold`, and the entry is removed when the device is reinstated;
- every other certificate issued to the device (replaced by a re-enrollment, or left by a failed
  one), or all of them once the device is no longer registered, as `superseded`;
- a final reason, once listed, stays: a superseded certificate never comes back. Certificates
  past their expiry are dropped from the list (TLS refuses them anyway).

The broker never reads this file: `strongroom broker run` checks each new version and hands it
to Mosquitto (provisioning/broker_supervisor.py). Devices enrolled before the record existed
have no certificate on file; they are listed only after they are enrolled again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

import structlog

from provisioning import ca
from provisioning.home import FleetHome
from provisioning.registry import Registry
from strongroom.errors import EnvironmentFault
from strongroom.fields import check_device_id
from strongroom.fsutil import PUBLIC_FILE, SECRET_FILE, make_private_dir, read_file, write_atomic

log = structlog.get_logger()

_FINAL = (ca.SUPERSEDED, ca.KEY_COMPROMISE)
REVOKED_STATUS = "revoked"  # the registry status of a revoked device (verifier.operator.REVOKED)
MAX_CRL_BYTES = 16 * 1024 * 1024
LOCK_TIMEOUT_S = 10.0


def _issued_dir(home: FleetHome, device_id: str) -> Path:
    return home.root / "ca" / "issued" / check_device_id(device_id)


def version(home: FleetHome) -> tuple[int, int, int] | None:
    """Which version of the CRL is in place (it is replaced by rename, never edited); None if
    there is none. Taken before the CRL is read, it names a version no later than the one read."""
    try:
        st = os.stat(home.crl_path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def read_crl(home: FleetHome) -> tuple[bytes, ca.Crl]:
    """The CRL's bytes and its verified content; raise if it is missing, corrupt or foreign."""
    pem = read_file(home.crl_path, "fleet CRL", MAX_CRL_BYTES)
    return pem, ca.read_crl(pem, read_file(home.ca_cert, "CA cert"))


def ensure_crl(home: FleetHome) -> None:
    """Create the empty CRL in a fleet home made before there was one."""
    with _locked(home):
        if not home.crl_path.exists():
            write_atomic(home.crl_path, ca.make_crl(home.ca_issued(), 1, ()), PUBLIC_FILE)


def record_issued(home: FleetHome, device_id: str, cert_pem: bytes) -> None:
    """Keep a copy of a client certificate issued to `device_id`, so it can be revoked later."""
    directory = _issued_dir(home, device_id)
    make_private_dir(directory)
    write_atomic(directory / f"{ca.cert_info(cert_pem).serial:x}.pem", cert_pem, PUBLIC_FILE)


def sync_device(home: FleetHome, device_id: str, now: dt.datetime | None = None) -> bool:
    """Make the CRL list what the registry says of `device_id`'s certificates (see the module
    docstring); True if the CRL changed. Safe to call at any time, from any process."""
    now = now or dt.datetime.now(dt.UTC)
    directory = _issued_dir(home, device_id)
    registry = Registry(home.registry_dir)
    with _locked(home):
        record = registry.get(device_id) if registry.exists(device_id) else None
        issued = _issued(directory)
        ours = {info.serial for info in issued}
        live = {info.serial: info.sha256 for info in issued if info.not_after > now}
        current_fp = record.tls_cert_sha256 if record is not None else None
        if current_fp is not None and current_fp not in live.values():
            log.warning("certificate_not_on_file", device=device_id)
        crl = read_crl(home)[1] if home.crl_path.exists() else ca.Crl(0, ())
        wanted: dict[int, str] = {}
        for serial, fingerprint in live.items():
            reason = crl.reason(serial)
            if reason in _FINAL:
                wanted[serial] = reason
            elif fingerprint != current_fp:
                wanted[serial] = ca.SUPERSEDED
            elif record is not None and record.status == REVOKED_STATUS:
                wanted[serial] = ca.HOLD
        others = [e for e in crl.entries if e.serial not in ours]
        kept = [e for e in crl.entries if wanted.get(e.serial) == e.reason]  # with their dates
        new = [ca.Revoked(s, now, r) for s, r in wanted.items() if crl.reason(s) != r]
        entries = others + kept + new
        if {(e.serial, e.reason) for e in entries} == {(e.serial, e.reason) for e in crl.entries}:
            return False
        write_atomic(
            home.crl_path, ca.make_crl(home.ca_issued(), crl.number + 1, entries, now), PUBLIC_FILE
        )
    log.info("crl_updated", device=device_id, number=crl.number + 1, entries=len(entries))
    return True


def _issued(directory: Path) -> list[ca.CertInfo]:
    """The device's certificates on file."""
    if not directory.is_dir():
        return []
    return [
        ca.cert_info(read_file(p, "issued certificate")) for p in sorted(directory.glob("*.pem"))
    ]


@contextlib.contextmanager
def _locked(home: FleetHome) -> Iterator[None]:
    """Hold the CRL's lock: the verifier, the CLI and the dashboard may revoke at once."""
    path = home.root / "ca" / "crl.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, SECRET_FILE)
    except OSError as e:
        raise EnvironmentFault(f"cannot open {path}: {e.strerror}") from e
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:  # bounded: a stuck holder must not hang the verifier's revocations
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as e:
                if time.monotonic() > deadline:
                    raise EnvironmentFault(
                        f"the CRL is locked by another process for over {LOCK_TIMEOUT_S:g} s",
                        hint=f"check for a stuck strongroom command holding {path}",
                    ) from e
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)
