"""Payloads of the MQTT protocol other than evidence and results (docs/protocol.md).

All are CBOR maps, size-capped, parsed into frozen objects or rejected with FormatError. Evidence
travels as the raw EAT bytes; results as the raw EAR bytes.
"""

from __future__ import annotations

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
        expires = doc.get("expires")
        if not isinstance(expires, int | float) or isinstance(expires, bool):
            raise FormatError("challenge: field 'expires' must be a number")
        return cls(nonce, float(expires))


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
        try:
            keys = tuple(
                ReleasedKey(str(i), bytes(w), bytes(a), float(u), float(r))
                for i, w, a, u, r in _field(doc, "keys", list, "key response")
            )
            refused = tuple(
                (str(i), str(r)) for i, r in _field(doc, "refused", list, "key response")
            )
        except (TypeError, ValueError) as e:
            raise FormatError("key response: malformed key list") from e
        return cls(_field(doc, "nonce", bytes, "key response"), keys, refused)


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
        at = doc.get("at", 0)
        if not isinstance(report, str) or not isinstance(at, int | float):
            raise FormatError("status: report must be text and at a number")
        return cls(state, float(at), report[:300])


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
            float(doc.get("at", 0) or 0),
        )


def now() -> float:
    return time.time()
