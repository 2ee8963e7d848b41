"""The device bundle: what one device needs, written by `strongroom device enroll`.

Layout (directories 0700, secrets 0600)::

    bundle.json              device id, fleet id, the fleet public keys the device trusts
    tls/ca.pem               fleet CA certificate
    tls/client.pem, .key     the device's MQTT client certificate (CN = device id) and key
    platform/                readable only by the platform component (the simulated root of trust)
      profile.json           firmware version, debug and secure-boot flags
      root-secret            256-bit platform root secret (the stand-in for fused hardware keys)
      attestation.key        Ed25519 device attestation key

No fleet secret is ever in a bundle. This module defines and parses the documents; it does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from strongroom.errors import FormatError, InputError
from strongroom.fields import check_device_id, get_bool, get_hex, get_str, parse_firmware
from strongroom.signing import VerifyKey

BUNDLE_FORMAT = "strongroom-device-bundle/1"
PROFILE_FORMAT = "strongroom-platform-profile/1"
BUNDLE_FILE = "bundle.json"
PLATFORM_DIR = "platform"
PROFILE_FILE = "platform/profile.json"
ROOT_SECRET_FILE = "platform/root-secret"  # noqa: S105 - a file name, not a secret
ATTESTATION_KEY_FILE = "platform/attestation.key"
TLS_CA_FILE = "tls/ca.pem"
TLS_CERT_FILE = "tls/client.pem"
TLS_KEY_FILE = "tls/client.key"
# Every file `strongroom device enroll` writes into a bundle, and nothing else
BUNDLE_FILES = (
    BUNDLE_FILE,
    TLS_CA_FILE,
    TLS_CERT_FILE,
    TLS_KEY_FILE,
    PROFILE_FILE,
    ROOT_SECRET_FILE,
    ATTESTATION_KEY_FILE,
)
ROOT_SECRET_SIZE = 32


@dataclass(frozen=True)
class BundleInfo:
    device_id: str
    fleet_id: str
    result_key: VerifyKey
    artifact_signer: VerifyKey
    enclave_signer: VerifyKey

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "device_id": self.device_id,
            "fleet_id": self.fleet_id,
            "trust": {
                "result_key": self.result_key.raw.hex(),
                "artifact_signer": self.artifact_signer.raw.hex(),
                "enclave_signer": self.enclave_signer.raw.hex(),
            },
        }

    @classmethod
    def from_json_dict(cls, doc: dict[str, Any]) -> BundleInfo:
        trust = doc.get("trust")
        if doc.get("format") != BUNDLE_FORMAT or not isinstance(trust, dict):
            raise FormatError("not a Strongroom device bundle")
        what = "bundle"
        try:
            device_id = check_device_id(get_str(doc, "device_id", what))
        except InputError as e:
            raise FormatError(f"bundle: {e}") from e
        return cls(
            device_id=device_id,
            fleet_id=get_str(doc, "fleet_id", what),
            result_key=VerifyKey(get_hex(trust, "result_key", what, 32)),
            artifact_signer=VerifyKey(get_hex(trust, "artifact_signer", what, 32)),
            enclave_signer=VerifyKey(get_hex(trust, "enclave_signer", what, 32)),
        )


@dataclass(frozen=True)
class PlatformProfile:
    """The simulated platform's fixed properties, as fused at enrollment."""

    device_id: str
    firmware: str
    debug: bool
    secure_boot: bool
    smt: bool | None = None  # None: report the host's real SMT state

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "smt": self.smt,
            "format": PROFILE_FORMAT,
            "device_id": self.device_id,
            "firmware": self.firmware,
            "debug": self.debug,
            "secure_boot": self.secure_boot,
        }

    @classmethod
    def from_json_dict(cls, doc: dict[str, Any]) -> PlatformProfile:
        if doc.get("format") != PROFILE_FORMAT:
            raise FormatError("not a Strongroom platform profile")
        what = "platform profile"
        firmware = get_str(doc, "firmware", what)
        try:
            parse_firmware(firmware)
        except InputError as e:
            raise FormatError(f"platform profile: {e}") from e
        return cls(
            device_id=get_str(doc, "device_id", what),
            firmware=firmware,
            debug=get_bool(doc, "debug", what),
            secure_boot=get_bool(doc, "secure_boot", what),
            smt=None if doc.get("smt") is None else get_bool(doc, "smt", what),
        )
