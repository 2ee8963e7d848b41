"""MQTT topics of the Strongroom protocol (docs/protocol.md). One place, used by every role."""

from __future__ import annotations

from strongroom.errors import FormatError
from strongroom.fields import DEVICE_ID_RE

ROOT = "fleet"
ALERTS = f"{ROOT}/alerts"
SHARE_GROUP = "verifiers"

EVIDENCE = "evidence"
CHALLENGE = "challenge"
KEYS_REQUEST = "keys/request"
KEYS_RESPONSE = "keys/response"
RESULT = "result"
STATUS = "status"
COMMAND = "command"


def device_topic(device_id: str, leaf: str) -> str:
    return f"{ROOT}/{device_id}/{leaf}"


def any_device(leaf: str) -> str:
    return f"{ROOT}/+/{leaf}"


def shared(topic: str, group: str = SHARE_GROUP) -> str:
    return f"$share/{group}/{topic}"


def parse(topic: str) -> tuple[str, str]:
    """Split `fleet/<device>/<leaf>` into (device id, leaf); FormatError for anything else."""
    parts = topic.split("/", 2)
    if len(parts) != 3 or parts[0] != ROOT or not DEVICE_ID_RE.fullmatch(parts[1]):
        raise FormatError(f"not a device topic: {topic[:80]!r}")
    return parts[1], parts[2]
