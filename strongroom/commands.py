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

from strongroom.fields import DEVICE_ID_RE, Bytes, Map, Text, Time, decode
from strongroom.signing import SIGNATURE_SIZE, SigningKey, VerifyKey

COMMAND_DOMAIN = b"strongroom/command/v1"
ACTIONS = ("revoke",)
MAX_COMMAND = 4096
MAX_REASON = 500
# The signed envelope, then the body it covers (checked only once the signature verifies).
ENVELOPE = Map({"body": Bytes(1, MAX_COMMAND), "sig": Bytes.exactly(SIGNATURE_SIZE)}, extra=True)
BODY = Map(
    {
        "action": Text(16, choices=ACTIONS),
        "device": Text(64, 1, pattern=DEVICE_ID_RE),
        "reason": Text(MAX_REASON),
        "issued_at": Time(),
        "nonce": Bytes(16, 64),
    }
)


@dataclass(frozen=True)
class Command:
    action: str
    device_id: str
    reason: str
    issued_at: float
    nonce: bytes

    @classmethod
    def revoke(cls, device_id: str, reason: str, now: float) -> Command:
        return cls("revoke", device_id, reason[:MAX_REASON], now, os.urandom(16))

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
    """The command if the verifier signed it; SignatureError or FormatError otherwise (a signed
    body out of its schema too: the action, device, reason, time and nonce are all checked)."""
    outer = decode(payload, ENVELOPE, "command", max_size=MAX_COMMAND, max_depth=2)
    key.verify(COMMAND_DOMAIN, outer["body"], outer["sig"])
    d = decode(outer["body"], BODY, "command body", max_size=MAX_COMMAND, max_depth=2)
    return Command(d["action"], d["device"], d["reason"], d["issued_at"], d["nonce"])
