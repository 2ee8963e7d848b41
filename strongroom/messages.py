"""Payloads of the MQTT protocol other than evidence and results (docs/protocol.md).

All are CBOR maps with text keys, size-capped, decoded by `strongroom.fields.decode` (no tags, no
shared references, bounded nesting) and checked against one schema per message before anything
reads them: every field's type, range and length, times finite and in [0, 2^40). They are parsed
into frozen objects or rejected with FormatError. Fields a message does not define are ignored.
Evidence travels as the raw EAT bytes; results as the raw EAR bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import cbor2

from strongroom.fields import (
    KEY_ID_RE,
    MAX_EVIDENCE,
    Array,
    Bytes,
    Map,
    Text,
    Time,
    Tuple,
    decode,
)

MAX_PAYLOAD = 64 * 1024
MAX_KEYS_PER_REQUEST = 64
MAX_REPORT = 1024  # a status report is kept to its first 300 characters
MAX_REASON = 4096
STATES = ("online", "offline", "revoked")
SEVERITIES = ("info", "warning", "critical")


def _schema(required: dict[str, Any], optional: dict[str, Any] | None = None) -> Map:
    return Map(required, optional or {}, extra=True, hi=16)


_KEY_ID = Text(64, 1, pattern=KEY_ID_RE)
_NONCE = Bytes(16, 64)
CHALLENGE = _schema({"nonce": _NONCE, "expires": Time()})
KEY_REQUEST = _schema(
    {
        "evidence": Bytes(1, MAX_EVIDENCE),
        "key_ids": Array(_KEY_ID, MAX_KEYS_PER_REQUEST, 1),
    }
)
KEY_RESPONSE = _schema(
    {
        "nonce": Bytes(8, 64),  # the evidence's nonce (eat_nonce: 8 to 64 bytes)
        "keys": Array(
            Tuple((_KEY_ID, Bytes(1, 4096), Bytes(0, 512), Time(), Time())),
            MAX_KEYS_PER_REQUEST,
        ),
        "refused": Array(Tuple((_KEY_ID, Text(MAX_REASON))), MAX_KEYS_PER_REQUEST),
    }
)
STATUS = _schema(
    {"state": Text(16, choices=STATES)},
    {"at": Time(), "report": Text(MAX_REPORT), "command": _NONCE},
)
ALERT = _schema(
    {
        "severity": Text(16, choices=SEVERITIES),
        "device": Text(64),  # the topic's device level, which may not be a valid id ("?")
        "reason": Text(MAX_REASON),
    },
    {"at": Time()},
)


@dataclass(frozen=True)
class Challenge:
    nonce: bytes
    expires: float

    def encode(self) -> bytes:
        return cbor2.dumps({"nonce": self.nonce, "expires": self.expires})

    @classmethod
    def decode(cls, payload: bytes) -> Challenge:
        doc = decode(payload, CHALLENGE, "challenge", max_size=MAX_PAYLOAD)
        return cls(doc["nonce"], doc["expires"])


@dataclass(frozen=True)
class KeyRequest:
    evidence: bytes
    key_ids: tuple[str, ...]

    def encode(self) -> bytes:
        return cbor2.dumps({"evidence": self.evidence, "key_ids": list(self.key_ids)})

    @classmethod
    def decode(cls, payload: bytes) -> KeyRequest:
        doc = decode(payload, KEY_REQUEST, "key request", max_size=MAX_PAYLOAD)
        return cls(doc["evidence"], tuple(doc["key_ids"]))


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
        doc = decode(payload, KEY_RESPONSE, "key response", max_size=MAX_PAYLOAD)
        return cls(
            doc["nonce"],
            tuple(ReleasedKey(*k) for k in doc["keys"]),
            tuple((key_id, reason) for key_id, reason in doc["refused"]),
        )


@dataclass(frozen=True)
class Status:
    state: str  # "online" | "offline" | "revoked" (the enclave confirmed a revocation)
    at: float
    report: str = ""  # something the device wants the fleet to know (a forged command, ...)
    command: bytes = b""  # with "revoked": the nonce of the revoke command the enclave obeyed

    def encode(self) -> bytes:
        doc: dict[str, Any] = {"state": self.state, "at": self.at}
        if self.report:
            doc["report"] = self.report
        if self.command:
            doc["command"] = self.command
        return cbor2.dumps(doc)

    @classmethod
    def decode(cls, payload: bytes) -> Status:
        doc = decode(payload, STATUS, "status", max_size=MAX_PAYLOAD)
        return cls(
            doc["state"], doc.get("at", 0.0), doc.get("report", "")[:300], doc.get("command", b"")
        )


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
        doc = decode(payload, ALERT, "alert", max_size=MAX_PAYLOAD)
        return cls(doc["severity"], doc["device"], doc["reason"], doc.get("at", 0.0))


def now() -> float:
    return time.time()
