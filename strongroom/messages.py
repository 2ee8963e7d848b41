"""Payloads of the MQTT protocol other than evidence and results (docs/protocol.md).

All are CBOR maps, size-capped, parsed into frozen objects or rejected with FormatError. Evidence
travels as the raw EAT bytes; results as the raw EAR bytes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import cbor2

from strongroom.errors import FormatError

MAX_PAYLOAD = 64 * 1024
MAX_KEYS_PER_REQUEST = 64


def _load(payload: bytes, what: str) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD:
        raise FormatError(f"{what} is larger than {MAX_PAYLOAD} bytes")
    try:
        doc = cbor2.loads(payload)
    except Exception as e:  # cbor2 raises several types for malformed input
        raise FormatError(f"{what} is not valid CBOR") from e
    if not isinstance(doc, dict):
        raise FormatError(f"{what} is not a CBOR map")
    return doc


def _number(value: Any, what: str) -> float:
    """A finite number (int or float, not bool)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise FormatError(f"{what} must be a number")
    try:
        number = float(value)
    except OverflowError as e:
        raise FormatError(f"{what} is out of range") from e
    if not math.isfinite(number):
        raise FormatError(f"{what} must be finite")
    return number


def _field(doc: dict[str, Any], key: str, kind: type, what: str) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FormatError(f"{what}: field {key!r} must be {kind.__name__}")
    return value


@dataclass(frozen=True)
class Challenge:
    nonce: bytes
    expires: float

    def encode(self) -> bytes:
        return cbor2.dumps({"nonce": self.nonce, "expires": self.expires})

    @classmethod
    def decode(cls, payload: bytes) -> Challenge:
        doc = _load(payload, "challenge")
        nonce = _field(doc, "nonce", bytes, "challenge")
        if not 16 <= len(nonce) <= 64:
            raise FormatError("challenge: a nonce has 16 to 64 bytes")
        return cls(nonce, _number(doc.get("expires"), "challenge: field 'expires'"))


@dataclass(frozen=True)
class KeyRequest:
    evidence: bytes
    key_ids: tuple[str, ...]

    def encode(self) -> bytes:
        return cbor2.dumps({"evidence": self.evidence, "key_ids": list(self.key_ids)})

    @classmethod
    def decode(cls, payload: bytes) -> KeyRequest:
        doc = _load(payload, "key request")
        ids = _field(doc, "key_ids", list, "key request")
        if not 0 < len(ids) <= MAX_KEYS_PER_REQUEST or not all(
            isinstance(i, str) and i.isalnum() and i.isascii() and len(i) <= 64 for i in ids
        ):
            raise FormatError("key request: key_ids must list 1 to 64 key ids")
        return cls(_field(doc, "evidence", bytes, "key request"), tuple(ids))


@dataclass(frozen=True)
class ReleasedKey:
    key_id: str
    wrapped: bytes
    aad: bytes
    until: float  # lease end, in clear for the agent's scheduling (the enclave reads its own copy)
    renew_at: float  # when the agent should ask again


@dataclass(frozen=True)
class KeyResponse:
    nonce: bytes
    keys: tuple[ReleasedKey, ...]
    refused: tuple[tuple[str, str], ...]  # (key id, reason)

    def encode(self) -> bytes:
        return cbor2.dumps(
            {
                "nonce": self.nonce,
                "keys": [[k.key_id, k.wrapped, k.aad, k.until, k.renew_at] for k in self.keys],
                "refused": [list(r) for r in self.refused],
            }
        )

    @classmethod
    def decode(cls, payload: bytes) -> KeyResponse:
        doc = _load(payload, "key response")
        what = "key response"
        keys, refused = [], []
        for item in _field(doc, "keys", list, what):
            if not isinstance(item, list) or len(item) != 5:
                raise FormatError(f"{what}: a key is [key_id, wrapped, aad, until, renew_at]")
            key_id, wrapped, aad, until, renew_at = item
            if not (
                isinstance(key_id, str) and isinstance(wrapped, bytes) and isinstance(aad, bytes)
            ):
                raise FormatError(f"{what}: malformed key entry")
            keys.append(
                ReleasedKey(key_id, wrapped, aad, _number(until, what), _number(renew_at, what))
            )
        for item in _field(doc, "refused", list, what):
            if not (
                isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)
            ):
                raise FormatError(f"{what}: a refusal is [key_id, reason]")
            refused.append((item[0], item[1]))
        return cls(_field(doc, "nonce", bytes, what), tuple(keys), tuple(refused))


STATES = ("online", "offline", "revoked")


@dataclass(frozen=True)
class Status:
    state: str  # "online" | "offline" | "revoked" (the enclave confirmed a revocation)
    at: float
    report: str = ""  # something the device wants the fleet to know (a forged command, ...)

    def encode(self) -> bytes:
        doc: dict[str, Any] = {"state": self.state, "at": self.at}
        if self.report:
            doc["report"] = self.report
        return cbor2.dumps(doc)

    @classmethod
    def decode(cls, payload: bytes) -> Status:
        doc = _load(payload, "status")
        state = _field(doc, "state", str, "status")
        if state not in STATES:
            raise FormatError(f"status: state must be one of {', '.join(STATES)}")
        report = doc.get("report", "")
        if not isinstance(report, str):
            raise FormatError("status: report must be text")
        return cls(state, _number(doc.get("at", 0), "status: at"), report[:300])


@dataclass(frozen=True)
class Alert:
    severity: str  # "info" | "warning" | "critical"
    device_id: str
    reason: str
    at: float

    def encode(self) -> bytes:
        return cbor2.dumps(
            {
                "severity": self.severity,
                "device": self.device_id,
                "reason": self.reason,
                "at": self.at,
            }
        )

    @classmethod
    def decode(cls, payload: bytes) -> Alert:
        doc = _load(payload, "alert")
        return cls(
            _field(doc, "severity", str, "alert"),
            _field(doc, "device", str, "alert"),
            _field(doc, "reason", str, "alert"),
            _number(doc.get("at", 0), "alert: at"),
        )


def now() -> float:
    return time.time()
