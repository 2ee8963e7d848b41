"""Device enrollment: keys, certificate, simulated platform profile, registry entry and bundle."""

from __future__ import annotations

import os
from pathlib import Path

from provisioning import ca, crl
from provisioning.errors import AlreadyEnrolledError
from provisioning.home import FleetHome
from provisioning.registry import DeviceRecord, Registry
from strongroom import bundle, canonical
from strongroom.fields import check_device_id, parse_firmware
from strongroom.fsutil import (
    PUBLIC_FILE,
    SECRET_FILE,
    ensure_absent,
    make_private_dir,
    read_file,
    staged_dir,
    write_atomic,
)
from strongroom.signing import SigningKey


def enroll_device(
    home: FleetHome,
    device_id: str,
    out: Path,
    *,
    firmware: str = "1.0.0",
    debug_platform: bool = False,
    secure_boot: bool = True,
    force: bool = False,
) -> DeviceRecord:
    """Enroll `device_id`, write its bundle to `out` and register it; return the registry record.

    The bundle is built aside and renamed into place only after the registry entry is written,
    so a failure leaves neither a bundle nor a registration behind. The new certificate is on
    file before it is handed out; once the enrollment is complete, any certificate it replaced
    (`force`) is listed in the fleet CRL as superseded, so the old bundle no longer connects.
    """
    check_device_id(device_id)
    parse_firmware(firmware)
    ensure_absent(out, "bundle")
    registry = Registry(home.registry_dir)
    if registry.exists(device_id) and not force:
        raise AlreadyEnrolledError(f"device {device_id} is already enrolled")

    attestation_key = SigningKey.generate()
    tls = ca.issue(home.ca_issued(), home.fleet_id, device_id)
    crl.record_issued(home, device_id, tls.cert_pem)  # revocable, whatever happens next
    profile = bundle.PlatformProfile(device_id, firmware, debug_platform, secure_boot)
    info = bundle.BundleInfo(
        device_id=device_id,
        fleet_id=home.fleet_id,
        result_key=home.result_verify_key(),
        artifact_signer=home.verify_key("artifact"),
        enclave_signer=home.verify_key("enclave"),
    )
    record = DeviceRecord(
        device_id=device_id,
        attestation_key=attestation_key.verify_key,
        tls_cert_sha256=ca.cert_fingerprint(tls.cert_pem),
        firmware=firmware,
        debug=debug_platform,
        secure_boot=secure_boot,
    )
    previous = registry.get(device_id) if registry.exists(device_id) else None
    registered = False
    try:
        with staged_dir(out.absolute()) as stage:
            _write_bundle(
                stage,
                info=info,
                profile=profile,
                tls=tls,
                attestation_key=attestation_key,
                home=home,
            )
            registry.put(record)
            registered = True
    except BaseException:
        if registered:
            if previous is None:
                registry.delete(device_id)
            else:
                registry.put(previous)
        raise
    crl.sync_device(home, device_id)
    return record


def _write_bundle(
    stage: Path,
    *,
    info: bundle.BundleInfo,
    profile: bundle.PlatformProfile,
    tls: ca.Issued,
    attestation_key: SigningKey,
    home: FleetHome,
) -> None:
    make_private_dir(stage / "tls")
    write_atomic(stage / bundle.TLS_CA_FILE, read_file(home.ca_cert, "CA cert"), PUBLIC_FILE)
    write_atomic(stage / bundle.TLS_CERT_FILE, tls.cert_pem, PUBLIC_FILE)
    write_atomic(stage / bundle.TLS_KEY_FILE, tls.key_pem, SECRET_FILE)
    make_private_dir(stage / bundle.PLATFORM_DIR)
    write_atomic(stage / bundle.PROFILE_FILE, canonical.dumps(profile.to_json_dict()), SECRET_FILE)
    write_atomic(stage / bundle.ROOT_SECRET_FILE, os.urandom(bundle.ROOT_SECRET_SIZE), SECRET_FILE)
    write_atomic(stage / bundle.ATTESTATION_KEY_FILE, attestation_key.to_pem(), SECRET_FILE)
    write_atomic(stage / bundle.BUNDLE_FILE, canonical.dumps(info.to_json_dict()), PUBLIC_FILE)
