"""Validation of identifiers and typed fields that appear in commands and documents."""

from __future__ import annotations

import re
from typing import Any

from strongroom.errors import FormatError, InputError

DEVICE_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
ARTIFACT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
HEX_RE = re.compile(r"[0-9a-f]*")
FIRMWARE_RE = re.compile(r"[0-9]{1,6}\.[0-9]{1,6}\.[0-9]{1,6}", re.ASCII)
MAX_VERSION = 2**31 - 1


def check_device_id(value: str) -> str:
    """Return `value` if it is a valid device id, else raise InputError.

    Device ids are 1-64 lowercase letters, digits and dashes, starting with a letter or digit, so
    that they are safe as file names, MQTT topic levels and certificate common names.
    """
    if not DEVICE_ID_RE.fullmatch(value):
        raise InputError(
            f"invalid device id {value!r}",
            hint="use 1-64 lowercase letters, digits and dashes, starting with a letter or digit",
        )
    return value


def check_artifact_name(value: str) -> str:
    if not ARTIFACT_NAME_RE.fullmatch(value):
        raise InputError(
            f"invalid artifact name {value!r}",
            hint="use 1-64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit",
        )
    return value


def check_version(value: int, what: str = "version") -> int:
    if not 1 <= value <= MAX_VERSION:
        raise InputError(f"{what} must be between 1 and {MAX_VERSION}, got {value}")
    return value


def parse_firmware(value: str) -> tuple[int, int, int]:
    """Parse a firmware version 'X.Y.Z' into a comparable tuple."""
    if not FIRMWARE_RE.fullmatch(value):
        raise InputError(
            f"invalid firmware version {value!r}", hint="use the form X.Y.Z, e.g. 1.4.2"
        )
    major, minor, patch = (int(p) for p in value.split("."))
    return major, minor, patch


# Typed getters for documents parsed from untrusted bytes: each raises FormatError naming the field.


def get_str(doc: dict[str, Any], key: str, what: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise FormatError(f"{what}: field {key!r} must be a string")
    return value


def get_int(doc: dict[str, Any], key: str, what: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise FormatError(f"{what}: field {key!r} must be an integer in [{lo}, {hi}]")
    return value


def get_bool(doc: dict[str, Any], key: str, what: str) -> bool:
    value = doc.get(key)
    if not isinstance(value, bool):
        raise FormatError(f"{what}: field {key!r} must be true or false")
    return value


def get_hex(doc: dict[str, Any], key: str, what: str, size: int) -> bytes:
    """A lowercase hex string encoding exactly `size` bytes."""
    value = doc.get(key)
    if not isinstance(value, str) or len(value) != 2 * size or not HEX_RE.fullmatch(value):
        raise FormatError(f"{what}: field {key!r} must be {size} bytes of lowercase hex")
    return bytes.fromhex(value)
