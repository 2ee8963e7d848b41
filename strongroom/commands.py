"""Commands from the verifier to a device (`fleet/<id>/command`), signed with the verifier's key.

Wire form: CBOR `{"body": bstr, "sig": bstr}`, where `body` is the canonical CBOR of
`{"action", "device", "reason", "issued_at", "nonce"}` and `sig` the verifier's Ed25519 signature
over it (domain `strongroom/command/v1`). The agent and the enclave each check the signature with
the verifier key they were provisioned with (bundle and measured enclave policy). Pure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cbor2

from strongroom.errors import FormatError
from strongroom.signing import SigningKey, VerifyKey

COMMAND_DOMAIN = b"strongroom/command/v1"
ACTIONS = ("revoke",)
MAX_COMMAND = 4096


@dataclass(frozen=True)
class Command:
    action: str
    device_id: str
    reason: str
    issued_at: float
    nonce: bytes

    @classmethod
    def revoke(cls, device_id: str, reason: str, now: float) -> Command:
        return cls("revoke", device_id, reason[:500], now, os.urandom(16))

    def body(self) -> bytes:
        return cbor2.dumps(
            {
                "action": self.action,
                "device": self.device_id,
                "reason": self.reason,
                "issued_at": self.issued_at,
                "nonce": self.nonce,
            },
            canonical=True,
        )


def sign_command(command: Command, key: SigningKey) -> bytes:
    body = command.body()
    return cbor2.dumps({"body": body, "sig": key.sign(COMMAND_DOMAIN, body)})


def verify_command(payload: bytes, key: VerifyKey) -> Command:
    """The command if the verifier signed it; SignatureError or FormatError otherwise."""
    if len(payload) > MAX_COMMAND:
        raise FormatError("command is too large")
    try:
        outer = cbor2.loads(payload)
        body, sig = outer["body"], outer["sig"]
        if not isinstance(body, bytes) or not isinstance(sig, bytes):
            raise TypeError("body and sig must be bytes")
    except Exception as e:  # any malformed command is the same failure
        raise FormatError("command is malformed") from e
    key.verify(COMMAND_DOMAIN, body, sig)
    try:
        d = cbor2.loads(body)
        command = Command(
            str(d["action"]),
            str(d["device"]),
            str(d["reason"]),
            float(d["issued_at"]),
            bytes(d["nonce"]),
        )
    except Exception as e:  # signed but unreadable: still refused
        raise FormatError("command body is malformed") from e
    if command.action not in ACTIONS:
        raise FormatError(f"unknown command {command.action!r}")
    return command
