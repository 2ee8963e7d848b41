"""Fleet homes and device enrollment: permissions, refusing to clobber, where secrets live."""

from __future__ import annotations

import base64
import dataclasses
import json
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning import ca, crl
from provisioning.enroll import enroll_device
from provisioning.errors import AlreadyEnrolledError
from provisioning.home import PRIVATE_FILES, SECRET_FILES, FleetHome, init_home, open_home
from provisioning.keystore import Keystore
from provisioning.registry import Registry
from provisioning.seal import seal_artifact
from strongroom import bundle
from strongroom.errors import FormatError, InputError, SignatureError
from strongroom.signing import SigningKey
from verifier.operator import ACTIVE, REVOKED, set_status

BUNDLE_FILES = set(bundle.BUNDLE_FILES)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def secret_forms(secret: bytes) -> list[bytes]:
    """The encodings under which a secret could leak into a file."""
    return [secret, secret.hex().encode(), base64.b64encode(secret)]


def private_key_needles(pem: bytes) -> list[bytes]:
    """The PEM, the DER and the raw private value of a private key, in their likely encodings."""
    key = serialization.load_pem_private_key(pem, password=None)
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    else:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        raw = key.private_numbers().private_value.to_bytes(32, "big")
    pem_body = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
    return [pem, pem_body, *secret_forms(der), *secret_forms(raw)]


def enroll(home: FleetHome, tmp_path: Path, device_id: str = "dev-1", **kwargs: object) -> Path:
    out = tmp_path / f"bundle-{device_id}"
    enroll_device(home, device_id, out, **kwargs)  # type: ignore[arg-type]
    return out


# --- the fleet home ------------------------------------------------------------------------------


def test_fleet_home_directories_are_private(tmp_path: Path, typical_umask: None) -> None:
    home = init_home(tmp_path / "home")

    directories = [home.root, *(p for p in home.root.rglob("*") if p.is_dir())]
    loose = {p.relative_to(tmp_path).as_posix(): oct(mode(p)) for p in directories}
    loose = {p: m for p, m in loose.items() if m != oct(0o700)}
    assert loose == {}


def test_fleet_home_secrets_are_readable_by_the_owner_only(
    tmp_path: Path, typical_umask: None
) -> None:
    home = init_home(tmp_path / "home")

    for rel in PRIVATE_FILES:
        assert mode(home.root / rel) == 0o600, rel
    for path in home.root.rglob("*"):
        if path.is_file():
            public = path.suffix in (".pem", ".pub")
            assert mode(path) == (0o644 if public else 0o600), path


def test_fleet_init_refuses_to_overwrite_an_existing_home(fleet_home: FleetHome) -> None:
    before = files_under(fleet_home.root)

    with pytest.raises(InputError, match="already exists"):
        init_home(fleet_home.root)
    assert files_under(fleet_home.root) == before


def test_fleet_init_with_force_replaces_the_home_and_its_keys(
    fleet_home: FleetHome, tmp_path: Path
) -> None:
    enroll(fleet_home, tmp_path)
    old_ca_key = fleet_home.ca_key.read_bytes()
    old_kek = (fleet_home.keystore_dir / "kek").read_bytes()

    replaced = init_home(fleet_home.root, force=True)

    assert replaced.fleet_id != fleet_home.fleet_id
    assert open_home(fleet_home.root).fleet_id == replaced.fleet_id
    assert replaced.ca_key.read_bytes() != old_ca_key
    assert (replaced.keystore_dir / "kek").read_bytes() != old_kek
    assert Registry(replaced.registry_dir).device_ids() == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_fleet_init_with_force_refuses_to_replace_a_directory_that_is_not_a_fleet_home(
    tmp_path: Path,
) -> None:
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"\xff\xd8 not to be lost")

    with pytest.raises(InputError, match="not a fleet home"):
        init_home(precious, force=True)
    assert (precious / "holiday.jpg").read_bytes() == b"\xff\xd8 not to be lost"
    assert [p.name for p in precious.iterdir()] == ["holiday.jpg"]


def test_fleet_init_with_force_refuses_to_replace_a_file(tmp_path: Path) -> None:
    target = tmp_path / "home"
    target.write_bytes(b"a file")

    with pytest.raises(InputError, match="not a fleet home"):
        init_home(target, force=True)
    assert target.read_bytes() == b"a file"


def test_fleet_init_uses_an_existing_empty_directory_only_with_force(tmp_path: Path) -> None:
    target = tmp_path / "home"
    target.mkdir()

    with pytest.raises(InputError, match="already exists"):
        init_home(target)
    home = init_home(target, force=True)
    assert open_home(target).fleet_id == home.fleet_id


# --- enrollment ----------------------------------------------------------------------------------


def test_enrollment_writes_the_documented_bundle_layout_with_tight_permissions(
    tmp_path: Path, typical_umask: None
) -> None:
    home = init_home(tmp_path / "home")
    out = enroll(home, tmp_path, "dev-1", firmware="2.1.0")

    assert set(files_under(out)) == BUNDLE_FILES
    for directory in (out, out / "tls", out / bundle.PLATFORM_DIR):
        assert mode(directory) == 0o700, directory
    for secret in (
        bundle.ROOT_SECRET_FILE,
        bundle.ATTESTATION_KEY_FILE,
        bundle.TLS_KEY_FILE,
        bundle.PROFILE_FILE,
    ):
        assert mode(out / secret) == 0o600, secret
    for public in (bundle.BUNDLE_FILE, bundle.TLS_CA_FILE, bundle.TLS_CERT_FILE):
        assert mode(out / public) == 0o644, public
    assert len((out / bundle.ROOT_SECRET_FILE).read_bytes()) == bundle.ROOT_SECRET_SIZE
    SigningKey.from_pem((out / bundle.ATTESTATION_KEY_FILE).read_bytes())  # a valid Ed25519 key

    info = bundle.BundleInfo.from_json_dict(json.loads((out / bundle.BUNDLE_FILE).read_bytes()))
    assert (info.device_id, info.fleet_id) == ("dev-1", home.fleet_id)
    assert info.artifact_signer == home.verify_key("artifact")
    assert info.enclave_signer == home.verify_key("enclave")
    assert info.result_key == home.result_verify_key()
    profile = bundle.PlatformProfile.from_json_dict(
        json.loads((out / bundle.PROFILE_FILE).read_bytes())
    )
    assert profile == bundle.PlatformProfile("dev-1", "2.1.0", debug=False, secure_boot=True)


def test_bundle_client_certificate_names_the_device_and_is_issued_by_the_fleet_ca(
    fleet_home: FleetHome, tmp_path: Path
) -> None:
    out = enroll(fleet_home, tmp_path, "sensor-42")
    cert = x509.load_pem_x509_certificate((out / bundle.TLS_CERT_FILE).read_bytes())
    ca_cert = x509.load_pem_x509_certificate(fleet_home.ca_cert.read_bytes())
    client_key = serialization.load_pem_private_key(
        (out / bundle.TLS_KEY_FILE).read_bytes(), password=None
    )

    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "sensor-42"
    assert cert.issuer == ca_cert.subject
    cert.verify_directly_issued_by(ca_cert)  # raises unless the CA's key signed it
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert client_key.public_key() == cert.public_key()
    assert (out / bundle.TLS_CA_FILE).read_bytes() == fleet_home.ca_cert.read_bytes()


def test_enrollment_registers_the_bundle_attestation_key_and_certificate(
    fleet_home: FleetHome, tmp_path: Path
) -> None:
    out = enroll(fleet_home, tmp_path, "dev-7", firmware="3.0.1", debug_platform=True)
    out_key = SigningKey.from_pem((out / bundle.ATTESTATION_KEY_FILE).read_bytes())

    record = Registry(fleet_home.registry_dir).get("dev-7")
    assert record.attestation_key == out_key.verify_key
    assert record.tls_cert_sha256 == ca.cert_fingerprint((out / bundle.TLS_CERT_FILE).read_bytes())
    assert (record.firmware, record.debug, record.secure_boot) == ("3.0.1", True, True)
    assert record.status == "active"


def test_no_fleet_secret_reaches_the_bundle(fleet_home: FleetHome, tmp_path: Path) -> None:
    model = tmp_path / "model.bin"
    model.write_bytes(b"weights" * 100)
    signed = seal_artifact(
        fleet_home, model, tmp_path / "model.art", name="model", version=1, kind="model"
    )
    _, data_key = Keystore(fleet_home.keystore_dir).unwrap(signed.manifest.key_id)
    out = enroll(fleet_home, tmp_path, "dev-1")

    needles: dict[str, list[bytes]] = {"artifact data key": secret_forms(bytes(data_key))}
    for rel in SECRET_FILES:
        content = (fleet_home.root / rel).read_bytes()
        raw = rel in ("keystore/kek", "dashboard/operator-token")
        needles[rel] = secret_forms(content) if raw else private_key_needles(content)
    for key_file in (fleet_home.keystore_dir / "keys").glob("*.json"):
        needles[key_file.name] = [key_file.read_bytes()]

    bundle_files = files_under(out)
    assert set(bundle_files) == BUNDLE_FILES
    leaks = [
        (secret, name)
        for secret, forms in needles.items()
        for name, content in bundle_files.items()
        if any(form in content for form in forms)
    ]
    assert leaks == []


def test_fleet_home_never_holds_the_device_platform_secrets(
    fleet_home: FleetHome, tmp_path: Path
) -> None:
    out = enroll(fleet_home, tmp_path, "dev-1")
    root_secret = (out / bundle.ROOT_SECRET_FILE).read_bytes()
    attestation_pem = (out / bundle.ATTESTATION_KEY_FILE).read_bytes()
    needles = secret_forms(root_secret) + private_key_needles(attestation_pem)

    home_files = files_under(fleet_home.root)
    assert [
        name for name, content in home_files.items() if any(n in content for n in needles)
    ] == []


def test_re_enrolling_without_force_is_refused_and_changes_nothing(
    fleet_home: FleetHome, tmp_path: Path
) -> None:
    enroll(fleet_home, tmp_path, "dev-1")
    registry = Registry(fleet_home.registry_dir)
    before = registry.get("dev-1")

    with pytest.raises(AlreadyEnrolledError):
        enroll_device(fleet_home, "dev-1", tmp_path / "second-bundle")
    assert registry.get("dev-1") == before
    assert not (tmp_path / "second-bundle").exists()


def test_re_enrolling_with_force_issues_new_keys(fleet_home: FleetHome, tmp_path: Path) -> None:
    first = enroll(fleet_home, tmp_path, "dev-1")
    old = Registry(fleet_home.registry_dir).get("dev-1")

    record = enroll_device(fleet_home, "dev-1", tmp_path / "new-bundle", force=True)

    new_key = SigningKey.from_pem(
        (tmp_path / "new-bundle" / bundle.ATTESTATION_KEY_FILE).read_bytes()
    )
    assert Registry(fleet_home.registry_dir).get("dev-1") == record
    assert record.attestation_key == new_key.verify_key != old.attestation_key
    assert record.tls_cert_sha256 != old.tls_cert_sha256
    assert (tmp_path / "new-bundle" / bundle.ROOT_SECRET_FILE).read_bytes() != (
        first / bundle.ROOT_SECRET_FILE
    ).read_bytes()


BAD_DEVICE_IDS = [
    "",
    "Dev-1",
    "-dev",
    "dev_1",
    "dev.1",
    "dev 1",
    "dev/1",
    "../dev",
    "_verifier",
    "_dashboard",
    "dév",
    "a" * 65,
    "dev-1\n",
]


@pytest.mark.parametrize("device_id", BAD_DEVICE_IDS)
def test_bad_device_id_is_refused_before_anything_is_written(
    fleet_home: FleetHome, tmp_path: Path, device_id: str
) -> None:
    out = tmp_path / "bundle"
    with pytest.raises(InputError, match="invalid device id"):
        enroll_device(fleet_home, device_id, out)
    assert not out.exists()
    assert list(fleet_home.registry_dir.iterdir()) == []


@pytest.mark.parametrize("device_id", ["0", "a" * 64, "edge-cam-0001"])
def test_device_ids_at_the_limits_are_accepted(
    fleet_home: FleetHome, tmp_path: Path, device_id: str
) -> None:
    enroll(fleet_home, tmp_path, device_id)
    assert Registry(fleet_home.registry_dir).device_ids() == [device_id]


def test_enrollment_refuses_an_existing_bundle_path_and_registers_nothing(
    fleet_home: FleetHome, tmp_path: Path
) -> None:
    out = tmp_path / "bundle"
    out.mkdir()

    with pytest.raises(InputError, match="already exists"):
        enroll_device(fleet_home, "dev-1", out)
    assert list(out.iterdir()) == []
    assert not Registry(fleet_home.registry_dir).exists("dev-1")


def test_enrollment_into_a_missing_directory_registers_nothing(
    fleet_home: FleetHome, tmp_path: Path
) -> None:
    with pytest.raises(InputError, match="parent directory does not exist"):
        enroll_device(fleet_home, "dev-1", tmp_path / "missing" / "bundle")
    assert not Registry(fleet_home.registry_dir).exists("dev-1")


@pytest.mark.parametrize("firmware", ["1.0", "1.0.0.0", "v1.0.0", "1..0", "1.0.-1", "1234567.0.0"])
def test_enrollment_refuses_a_malformed_firmware_version(
    fleet_home: FleetHome, tmp_path: Path, firmware: str
) -> None:
    with pytest.raises(InputError, match="invalid firmware"):
        enroll_device(fleet_home, "dev-1", tmp_path / "bundle", firmware=firmware)
    assert not (tmp_path / "bundle").exists()


# --- the fleet CRL -------------------------------------------------------------------------------


def _serial(bundle_dir: Path) -> int:
    return ca.cert_info((bundle_dir / bundle.TLS_CERT_FILE).read_bytes()).serial


def _listed(home: FleetHome) -> dict[int, str]:
    return {e.serial: e.reason for e in crl.read_crl(home)[1].entries}


def test_a_new_fleet_has_an_empty_crl_signed_by_its_ca(fleet_home: FleetHome) -> None:
    pem, listed = crl.read_crl(fleet_home)
    assert listed.entries == () and listed.number == 1
    parsed = x509.load_pem_x509_crl(pem)
    ca_cert = x509.load_pem_x509_certificate(fleet_home.ca_cert.read_bytes())
    assert parsed.issuer == ca_cert.subject
    assert parsed.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
    assert mode(fleet_home.crl_path) == 0o644


def test_re_enrolling_lists_the_replaced_certificate_as_superseded(
    fleet_home: FleetHome, tmp_path: Path
) -> None:
    old = enroll(fleet_home, tmp_path, "dev-1")
    other = enroll(fleet_home, tmp_path, "dev-2")
    assert _listed(fleet_home) == {}  # enrolling a new device lists nothing

    new = tmp_path / "new-bundle"
    enroll_device(fleet_home, "dev-1", new, force=True)

    assert _listed(fleet_home) == {_serial(old): ca.SUPERSEDED}
    assert _serial(new) not in _listed(fleet_home) and _serial(other) not in _listed(fleet_home)
    assert crl.read_crl(fleet_home)[1].number == 2


def test_revoking_holds_the_current_certificate_and_reinstating_lifts_only_the_hold(
    fleet_home: FleetHome, tmp_path: Path
) -> None:
    first = enroll(fleet_home, tmp_path, "dev-1")
    current = tmp_path / "current"
    enroll_device(fleet_home, "dev-1", current, force=True)

    set_status(fleet_home, "dev-1", REVOKED, reason="lost", by="operator")
    assert _listed(fleet_home) == {_serial(first): ca.SUPERSEDED, _serial(current): ca.HOLD}

    set_status(fleet_home, "dev-1", ACTIVE, reason="", by="operator")
    assert _listed(fleet_home) == {_serial(first): ca.SUPERSEDED}  # replaced stays replaced

    enroll_device(fleet_home, "dev-1", tmp_path / "third", force=True)  # a held one is final
    set_status(fleet_home, "dev-1", REVOKED, reason="lost", by="operator")
    enroll_device(fleet_home, "dev-1", tmp_path / "fourth", force=True)
    assert _listed(fleet_home)[_serial(tmp_path / "third")] == ca.SUPERSEDED


def test_repeating_a_revocation_repairs_a_crl_that_missed_it(
    fleet_home: FleetHome, tmp_path: Path
) -> None:
    device = enroll(fleet_home, tmp_path, "dev-1")
    registry = Registry(fleet_home.registry_dir)  # revoked without the CRL (an older version,
    registry.put(dataclasses.replace(registry.get("dev-1"), status=REVOKED))  # a crash)

    outcome = set_status(fleet_home, "dev-1", REVOKED, reason="lost", by="operator")

    assert not outcome.changed
    assert _listed(fleet_home) == {_serial(device): ca.HOLD}
    assert crl.sync_device(fleet_home, "dev-1") is False  # in line: nothing rewritten


def test_a_failed_enrollment_leaves_its_certificate_revocable(
    fleet_home: FleetHome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = enroll(fleet_home, tmp_path, "dev-1")

    def fail(*_args: object, **_kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("provisioning.enroll._write_bundle", fail)
    with pytest.raises(OSError, match="disk full"):
        enroll_device(fleet_home, "dev-1", tmp_path / "never", force=True)
    monkeypatch.undo()

    assert (
        Registry(fleet_home.registry_dir).get("dev-1").tls_cert_sha256
        == ca.cert_info((device / bundle.TLS_CERT_FILE).read_bytes()).sha256
    )
    assert _listed(fleet_home) == {}  # the old bundle still works
    crl.sync_device(fleet_home, "dev-1")
    issued = list((fleet_home.root / "ca" / "issued" / "dev-1").glob("*.pem"))
    assert len(issued) == 2  # the one never handed out is on file and listed as superseded
    assert list(_listed(fleet_home).values()) == [ca.SUPERSEDED]
    assert _serial(device) not in _listed(fleet_home)


def test_a_crl_signed_by_another_ca_is_refused(
    fleet_home: FleetHome, other_fleet_home: FleetHome
) -> None:
    fleet_home.crl_path.write_bytes(other_fleet_home.crl_path.read_bytes())
    with pytest.raises(SignatureError):
        crl.read_crl(fleet_home)
    fleet_home.crl_path.write_bytes(b"-----BEGIN X509 CRL-----\nnot one\n-----END X509 CRL-----\n")
    with pytest.raises(FormatError):
        crl.read_crl(fleet_home)


def test_revocations_made_at_the_same_time_are_all_listed(
    fleet_home: FleetHome, tmp_path: Path
) -> None:
    devices = [f"dev-{i}" for i in range(8)]
    bundles = {d: enroll(fleet_home, tmp_path, d) for d in devices}
    start = threading.Barrier(len(devices))

    def revoke(device_id: str) -> None:
        start.wait()
        set_status(fleet_home, device_id, REVOKED, reason="lost", by="operator")

    threads = [threading.Thread(target=revoke, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert _listed(fleet_home) == {_serial(b): ca.HOLD for b in bundles.values()}
    assert crl.read_crl(fleet_home)[1].number == 1 + len(devices)
