"""The fleet home: the directory that holds a fleet's root of trust, policy, keystore and registry.

Layout (directories 0700, secrets 0600, certificates and public keys 0644)::

    fleet.json                     marker: format and fleet id
    policy.toml                    human-editable fleet policy
    ca/ca.pem, ca/ca.key           fleet CA (ECDSA P-256)
    ca/crl.pem                     its certificate revocation list (provisioning/crl.py)
    ca/issued/<id>/<serial>.pem    the client certificates issued to each device
    broker/server.pem, .key        broker TLS server certificate (localhost)
    verifier/client.pem, .key      verifier MQTT identity (CN "_verifier")
    verifier/result-signing.key    Ed25519 key that signs attestation results (+ .pub)
    dashboard/client.pem, .key     read-only consumer identity (CN "_dashboard"; "_dashboard-N"
                                   in client-N.pem, .key, issued on first use)
    dashboard/operator-token       bearer token of the web dashboard's operator actions
    signing/enclave.key, .pub      Ed25519 enclave-signing key
    signing/artifact.key, .pub     Ed25519 artifact-signing key
    keystore/kek                   key-encryption key of the key broker's keystore
    keystore/keys/<key id>.json    artifact data keys, wrapped under the KEK
    registry/devices/<id>.json     enrolled devices: public keys and platform profile

Role identities start with "_", which no device id may, so a device can never take a role's name.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from provisioning import ca
from provisioning.errors import NotAFleetHomeError
from provisioning.policy_file import initial_policy
from strongroom import canonical
from strongroom.errors import EnvironmentFault, FormatError, InputError
from strongroom.fields import get_str
from strongroom.fsutil import (
    PUBLIC_FILE,
    SECRET_FILE,
    make_private_dir,
    read_file,
    staged_dir,
    write_atomic,
)
from strongroom.policy import FleetPolicy, parse_policy
from strongroom.signing import SigningKey, VerifyKey

HOME_FORMAT = "strongroom-fleet-home/1"
VERIFIER_CN = "_verifier"
MAX_VERIFIER_INSTANCES = 8  # extra verifier identities "_verifier-1" .. "_verifier-8"
DASHBOARD_CN = "_dashboard"
MAX_DASHBOARD_INSTANCES = 8  # extra read-only identities "_dashboard-1" .. "_dashboard-8"
OPERATOR_TOKEN_FILE = "operator-token"  # noqa: S105 - a file name, not a secret
BROKER_NAMES = ("localhost", "127.0.0.1", "::1")
KEK_SIZE = 32
# The home's secrets, written by init_home with mode 0600; no bundle ever carries one
SECRET_FILES = (
    "ca/ca.key",
    "broker/server.key",
    "verifier/client.key",
    "verifier/result-signing.key",
    "dashboard/client.key",
    f"dashboard/{OPERATOR_TOKEN_FILE}",
    "signing/enclave.key",
    "signing/artifact.key",
    "keystore/kek",
)
# Also mode 0600 without being secret: the marker (fleet id) and the policy
PRIVATE_FILES = ("fleet.json", "policy.toml", *SECRET_FILES)
OPERATOR_TOKEN_BYTES = 32


@dataclass(frozen=True)
class FleetHome:
    """Paths and loaders of one fleet home. Construct with `open_home` or `init_home`."""

    root: Path
    fleet_id: str

    @property
    def policy_path(self) -> Path:
        return self.root / "policy.toml"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def crl_path(self) -> Path:
        return self.root / "ca" / "crl.pem"

    @property
    def registry_dir(self) -> Path:
        return self.root / "registry" / "devices"

    @property
    def keystore_dir(self) -> Path:
        return self.root / "keystore"

    def signing_key(self, role: str) -> SigningKey:
        """The fleet's private signing key for `role` ("enclave" or "artifact")."""
        return SigningKey.from_pem(read_file(self.root / "signing" / f"{role}.key", f"{role} key"))

    def verify_key(self, role: str) -> VerifyKey:
        return VerifyKey.from_pem(read_file(self.root / "signing" / f"{role}.pub", f"{role} key"))

    def result_verify_key(self) -> VerifyKey:
        return VerifyKey.from_pem(
            read_file(self.root / "verifier" / "result-signing.pub", "result key")
        )

    @property
    def operator_token_path(self) -> Path:
        return self.root / "dashboard" / OPERATOR_TOKEN_FILE

    def verifier_identity(self, instance: int = 0) -> tuple[str, Path, Path]:
        """(CN, certificate, key) of verifier process `instance` (0: the default identity).

        MQTT client ids must differ between connected clients, and the broker makes the
        certificate CN the client id, so each verifier process needs an identity of its own;
        instances 1-8 are issued on first use."""
        return self._role_identity(VERIFIER_CN, "verifier", instance, MAX_VERIFIER_INSTANCES)

    def dashboard_identity(self, instance: int = 0) -> tuple[str, Path, Path]:
        """(CN, certificate, key) of read-only consumer `instance` (0: `_dashboard`).

        As for verifiers, consumers connected at the same time (the web dashboard, `strongroom
        status`, a monitoring script) each need their own identity; 1-8 are issued on first use."""
        return self._role_identity(DASHBOARD_CN, "dashboard", instance, MAX_DASHBOARD_INSTANCES)

    def _role_identity(
        self, base_cn: str, directory: str, instance: int, maximum: int
    ) -> tuple[str, Path, Path]:
        d = self.root / directory
        if instance == 0:
            return base_cn, d / "client.pem", d / "client.key"
        if not 1 <= instance <= maximum:
            raise InputError(f"{directory} instance must be between 0 and {maximum}")
        cn = f"{base_cn}-{instance}"
        cert, key = d / f"client-{instance}.pem", d / f"client-{instance}.key"
        if not cert.exists():
            issued = ca.issue(self.ca_issued(), self.fleet_id, cn)
            write_atomic(key, issued.key_pem, SECRET_FILE)
            write_atomic(cert, issued.cert_pem, PUBLIC_FILE)
        return cn, cert, key

    def ca_issued(self) -> ca.Issued:
        return ca.Issued(read_file(self.ca_key, "CA key"), read_file(self.ca_cert, "CA cert"))

    def load_policy(self) -> FleetPolicy:
        data = read_file(self.policy_path, "fleet policy")
        try:
            text = data.decode()
        except UnicodeDecodeError as e:
            raise FormatError(f"{self.policy_path} is not UTF-8 text") from e
        return parse_policy(text)


def _write_issued(directory: Path, stem: str, issued: ca.Issued) -> None:
    make_private_dir(directory)
    write_atomic(directory / f"{stem}.key", issued.key_pem, SECRET_FILE)
    write_atomic(directory / f"{stem}.pem", issued.cert_pem, PUBLIC_FILE)


def _write_signing_key(directory: Path, stem: str) -> SigningKey:
    make_private_dir(directory)
    key = SigningKey.generate()
    write_atomic(directory / f"{stem}.key", key.to_pem(), SECRET_FILE)
    write_atomic(directory / f"{stem}.pub", key.verify_key.to_pem(), PUBLIC_FILE)
    return key


def _write_operator_token(path: Path) -> None:
    write_atomic(path, secrets.token_urlsafe(OPERATOR_TOKEN_BYTES).encode(), SECRET_FILE)


def ensure_operator_token(home: FleetHome) -> bool:
    """Create the dashboard's operator token if this home has none (homes made before the
    dashboard); True if it was created. The token itself is never returned or printed here."""
    path = home.operator_token_path
    if path.exists():
        return False
    make_private_dir(path.parent)
    _write_operator_token(path)
    return True


def read_operator_token(home: FleetHome) -> bytes:
    """The operator token, refused if other users could read it (like ssh's private keys)."""
    path = home.operator_token_path
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as e:
        raise InputError(
            f"{path} does not exist", hint="run `strongroom dashboard`, which creates it"
        ) from e
    if mode & 0o077:
        raise EnvironmentFault(
            f"{path} is readable by other users", hint=f"run chmod 600 {path}, then rotate it"
        )
    token = read_file(path, "operator token").strip()
    if len(token) < OPERATOR_TOKEN_BYTES:
        raise InputError(f"{path} holds no usable token", hint="delete it; a new one is made")
    return token


def _is_fleet_home(path: Path) -> bool:
    return (path / "fleet.json").is_file()


def init_home(path: Path, *, force: bool = False) -> FleetHome:
    """Create a new fleet home at `path`, built aside and renamed into place when complete."""
    path = path.absolute()
    if path.exists():
        if not force:
            raise InputError(
                f"{path} already exists",
                hint="choose another path, or pass --force to replace it (destroys its keys)",
            )
        if not path.is_dir() or (any(path.iterdir()) and not _is_fleet_home(path)):
            raise InputError(
                f"{path} exists and is not a fleet home; refusing to replace it",
                hint="choose another path",
            )
    fleet_id = secrets.token_hex(8)
    with staged_dir(path, replace=force) as stage:
        authority = ca.make_ca(fleet_id)
        _write_issued(stage / "ca", "ca", authority)
        write_atomic(stage / "ca" / "crl.pem", ca.make_crl(authority, 1, ()), PUBLIC_FILE)
        make_private_dir(stage / "ca" / "issued")
        _write_issued(
            stage / "broker",
            "server",
            ca.issue(authority, fleet_id, "broker", server_names=BROKER_NAMES),
        )
        _write_issued(stage / "verifier", "client", ca.issue(authority, fleet_id, VERIFIER_CN))
        _write_issued(stage / "dashboard", "client", ca.issue(authority, fleet_id, DASHBOARD_CN))
        _write_operator_token(stage / "dashboard" / OPERATOR_TOKEN_FILE)
        _write_signing_key(stage / "verifier", "result-signing")
        enclave_key = _write_signing_key(stage / "signing", "enclave")
        _write_signing_key(stage / "signing", "artifact")
        make_private_dir(stage / "keystore" / "keys")
        write_atomic(stage / "keystore" / "kek", os.urandom(KEK_SIZE), SECRET_FILE)
        make_private_dir(stage / "registry" / "devices")
        write_atomic(
            stage / "policy.toml",
            initial_policy(enclave_key.verify_key.fingerprint).encode(),
            SECRET_FILE,
        )
        write_atomic(
            stage / "fleet.json",
            canonical.dumps({"format": HOME_FORMAT, "fleet_id": fleet_id}),
            SECRET_FILE,
        )
    return FleetHome(path, fleet_id)


def open_home(path: Path) -> FleetHome:
    """Open an existing fleet home, or raise NotAFleetHomeError."""
    path = path.absolute()
    marker = path / "fleet.json"
    if not path.is_dir() or not marker.is_file():
        raise NotAFleetHomeError(f"{path} is not a Strongroom fleet home")
    doc = canonical.loads_object(read_file(marker, "fleet marker"), "fleet marker")
    if doc.get("format") != HOME_FORMAT:
        raise NotAFleetHomeError(f"{path} holds an unsupported fleet home format")
    return FleetHome(path, get_str(doc, "fleet_id", "fleet marker"))
