"""The device registry: one JSON file per enrolled device, holding only public material.

An entry names the device's attestation public key, the fingerprint of its TLS client certificate
and its platform profile as enrolled (firmware, debug, secure boot). Platform secrets never reach
the fleet home.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strongroom import canonical
from strongroom.errors import FormatError
from strongroom.fields import check_device_id, get_bool, get_hex, get_str
from strongroom.fsutil import SECRET_FILE, read_file, write_atomic
from strongroom.signing import VerifyKey

ENTRY_FORMAT = "strongroom-device/1"
_WHAT = "registry entry"


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    attestation_key: VerifyKey
    tls_cert_sha256: str
    firmware: str
    debug: bool
    secure_boot: bool
    status: str = "active"

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": ENTRY_FORMAT,
            "device_id": self.device_id,
            "attestation_key": self.attestation_key.raw.hex(),
            "tls_cert_sha256": self.tls_cert_sha256,
            "profile": {
                "firmware": self.firmware,
                "debug": self.debug,
                "secure_boot": self.secure_boot,
            },
            "status": self.status,
        }

    @classmethod
    def from_json_dict(cls, doc: dict[str, Any]) -> DeviceRecord:
        profile = doc.get("profile")
        if doc.get("format") != ENTRY_FORMAT or not isinstance(profile, dict):
            raise FormatError(f"{_WHAT} has an unexpected format")
        return cls(
            device_id=check_device_id(get_str(doc, "device_id", _WHAT)),
            attestation_key=VerifyKey(get_hex(doc, "attestation_key", _WHAT, 32)),
            tls_cert_sha256=get_hex(doc, "tls_cert_sha256", _WHAT, 32).hex(),
            firmware=get_str(profile, "firmware", _WHAT),
            debug=get_bool(profile, "debug", _WHAT),
            secure_boot=get_bool(profile, "secure_boot", _WHAT),
            status=get_str(doc, "status", _WHAT),
        )


class Registry:
    def __init__(self, root: Path) -> None:
        self._root = root

    def _path(self, device_id: str) -> Path:
        return self._root / f"{check_device_id(device_id)}.json"

    def exists(self, device_id: str) -> bool:
        return self._path(device_id).is_file()

    def put(self, record: DeviceRecord) -> None:
        write_atomic(
            self._path(record.device_id), canonical.dumps(record.to_json_dict()), SECRET_FILE
        )

    def delete(self, device_id: str) -> None:
        self._path(device_id).unlink(missing_ok=True)

    def get(self, device_id: str) -> DeviceRecord:
        path = self._path(device_id)
        return DeviceRecord.from_json_dict(
            canonical.loads_object(read_file(path, f"device {device_id}"), _WHAT)
        )

    def device_ids(self) -> list[str]:
        return sorted(p.stem for p in self._root.glob("*.json"))

    def stamps(self) -> dict[str, tuple[int, int, int]]:
        """Device id -> (inode, mtime ns, size) of its entry, from one directory scan: which
        entries changed since an earlier look (entries are replaced by rename, never edited)."""
        found = {}
        with os.scandir(self._root) as entries:
            for entry in entries:
                if entry.name.endswith(".json") and entry.is_file():
                    st = entry.stat()
                    found[entry.name[: -len(".json")]] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return found
