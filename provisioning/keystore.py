"""The key broker's keystore: artifact data keys wrapped under a key-encryption key (KEK).

One JSON file per data key. The data key is wrapped with AES-256-GCM under the KEK, with the key id
and the artifact's identity as associated data, so a wrapped key cannot be moved to another entry.
The release policy sits beside it in clear so operators can read and tighten it. The KEK is a file
(0600) in the fleet home: the stand-in for an HSM or cloud KMS, which would hold it in production.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from provisioning.errors import KeystoreError
from strongroom import canonical
from strongroom.errors import FormatError, InputError
from strongroom.fields import get_hex, get_int, get_str
from strongroom.fsutil import SECRET_FILE, read_file, write_atomic

ENTRY_FORMAT = "strongroom-keystore-entry/1"
_WHAT = "keystore entry"


@dataclass(frozen=True)
class ReleasePolicy:
    """Who may receive a data key: enclaves by these signers (and, if listed, these exact
    measurements), at or above `min_svn`, on platforms at or above `min_firmware`."""

    signers: tuple[str, ...]
    measurements: tuple[str, ...] = ()
    min_svn: int = 1
    min_firmware: str = "0.0.0"

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "signers": list(self.signers),
            "measurements": list(self.measurements),
            "min_svn": self.min_svn,
            "min_firmware": self.min_firmware,
        }


@dataclass(frozen=True)
class KeyEntry:
    key_id: str
    name: str
    version: int
    kind: str
    sha256: str
    release: ReleasePolicy

    def identity(self) -> bytes:
        return canonical.dumps(
            {
                "key_id": self.key_id,
                "name": self.name,
                "version": self.version,
                "sha256": self.sha256,
            }
        )


class Keystore:
    """Wrapped data keys in `root/keys`, under the KEK in `root/kek`."""

    def __init__(self, root: Path) -> None:
        self._root = root

    def _path(self, key_id: str) -> Path:
        if not key_id.isalnum() or not key_id.isascii():
            raise InputError(f"invalid key id {key_id!r}")
        return self._root / "keys" / f"{key_id}.json"

    def _kek(self) -> AESGCM:
        return AESGCM(read_file(self._root / "kek", "keystore key-encryption key", limit=32))

    def put(self, entry: KeyEntry, data_key: bytes | bytearray) -> None:
        nonce = os.urandom(12)
        wrapped = self._kek().encrypt(nonce, bytes(data_key), entry.identity())
        doc = {
            "format": ENTRY_FORMAT,
            "key_id": entry.key_id,
            "artifact": {
                "name": entry.name,
                "version": entry.version,
                "kind": entry.kind,
                "sha256": entry.sha256,
            },
            "release": entry.release.to_json_dict(),
            "wrapped": {"alg": "A256GCM", "nonce": nonce.hex(), "ciphertext": wrapped.hex()},
        }
        write_atomic(self._path(entry.key_id), canonical.dumps(doc), SECRET_FILE)

    def delete(self, key_id: str) -> None:
        self._path(key_id).unlink(missing_ok=True)

    def _load(self, key_id: str) -> tuple[KeyEntry, dict[str, Any]]:
        doc = canonical.loads_object(read_file(self._path(key_id), _WHAT), _WHAT)
        if doc.get("format") != ENTRY_FORMAT or doc.get("key_id") != key_id:
            raise FormatError(f"{_WHAT} {key_id} has an unexpected format")
        art, rel, wrapped = (doc.get(k) for k in ("artifact", "release", "wrapped"))
        if not (isinstance(art, dict) and isinstance(rel, dict) and isinstance(wrapped, dict)):
            raise FormatError(f"{_WHAT} {key_id} is incomplete")
        signers, measurements = rel.get("signers"), rel.get("measurements", [])
        if not isinstance(signers, list) or not isinstance(measurements, list):
            raise FormatError(f"{_WHAT} {key_id}: release signers and measurements must be lists")
        entry = KeyEntry(
            key_id=key_id,
            name=get_str(art, "name", _WHAT),
            version=get_int(art, "version", _WHAT, 1),
            kind=get_str(art, "kind", _WHAT),
            sha256=get_str(art, "sha256", _WHAT),
            release=ReleasePolicy(
                signers=tuple(str(s) for s in signers),
                measurements=tuple(str(m) for m in measurements),
                min_svn=get_int(rel, "min_svn", _WHAT, 0),
                min_firmware=get_str(rel, "min_firmware", _WHAT),
            ),
        )
        return entry, wrapped

    def entry(self, key_id: str) -> KeyEntry:
        return self._load(key_id)[0]

    def unwrap(self, key_id: str) -> tuple[KeyEntry, bytearray]:
        """The entry and its data key; the caller wipes the returned bytearray after use."""
        entry, wrapped = self._load(key_id)
        nonce = get_hex(wrapped, "nonce", _WHAT, 12)
        try:
            ciphertext = bytes.fromhex(get_str(wrapped, "ciphertext", _WHAT))
        except ValueError as e:
            raise KeystoreError(f"{_WHAT} {key_id}: wrapped key is not hex") from e
        try:
            key = bytearray(self._kek().decrypt(nonce, ciphertext, entry.identity()))
        except InvalidTag as e:
            raise KeystoreError(f"{_WHAT} {key_id} failed to unwrap") from e
        return entry, key
