"""One fuzz target per parser: bytes in, the parser's object out or one of its own errors.

A target calls a parser the way its real caller does and fails (with any other exception) when the
parser raises something else or accepts a value out of its format's bounds. The hypothesis tests in
`make test` (tests/test_fuzz_*.py) and the atheris harnesses behind `make fuzz` (fuzz/run.py) drive
the same targets, seeded from the corpus of real messages in tests/corpus/<target>/
(fuzz/make_corpus.py makes it with the project's own encoders and signers).

The keys are fixed test keys derived from their names, so a corpus made once verifies forever;
`NOW` is the time at which tokens are checked (the corpus is signed just before it), so `exp` never
turns the claims targets into tests of the clock.
"""

from __future__ import annotations

import hashlib
import io
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cbor2

from agent import channel
from provisioning import policy_file
from strongroom import artifact, commands, cose, ear, evidence, messages, policy
from strongroom.errors import FormatError, IntegrityError, SignatureError, StrongroomError
from strongroom.fields import INT64_MAX, TIME_MAX
from strongroom.signing import SigningKey

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "corpus"
NOW = 1_800_000_000.0
DEVICE_ID = "fuzz-dev-1"


def test_key(name: str) -> SigningKey:
    return SigningKey(hashlib.sha256(b"strongroom/fuzz/" + name.encode()).digest())


DEVICE_KEY = test_key("device")  # the device's attestation key
VERIFIER_KEY = test_key("verifier")  # the verifier's result and command key
ARTIFACT_SIGNER = test_key("artifact-signer")
DATA_KEY = hashlib.sha256(b"strongroom/fuzz/data-key").digest()


class OutOfBounds(Exception):
    """A parser accepted a value its format forbids: a finding, like an unexpected exception."""


def require(ok: bool, what: str) -> None:
    if not ok:
        raise OutOfBounds(what)


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], object]
    expected: tuple[type[BaseException], ...]  # the errors the parser may raise
    doc: str


def corpus(name: str) -> list[bytes]:
    """The seeds of a target, in a stable order."""
    return [p.read_bytes() for p in sorted((CORPUS / name).glob("*.bin"))]


def seed(target: str, name: str) -> bytes:
    """One seed by name (fuzz/make_corpus.py names them)."""
    return (CORPUS / target / f"{name}.bin").read_bytes()


def _bounded_evidence(ev: evidence.Evidence) -> evidence.Evidence:
    """What an accepted evidence must satisfy whatever the bytes were."""
    require(0 <= ev.seq <= INT64_MAX and 0 <= ev.iat < TIME_MAX, "seq or iat")
    require(8 <= len(ev.nonce) <= 64 and len(ev.ueid) == 33, "nonce or ueid")
    require(len(ev.enclave_key) == 32 and len(ev.key_binding) == 64, "enclave key or binding")
    require(len(ev.enclave.mrenclave) == 64 and len(ev.enclave.mrsigner) == 64, "measurements")
    require(len(ev.artifacts) <= evidence.MAX_ARTIFACTS, "artifact count")
    flags = (ev.platform_debug, ev.secure_boot, ev.enclave.debug)
    require(all(type(v) is bool for v in flags), "flags")
    return ev


def run_evidence(token: bytes) -> object:
    """As the verifier: the structure, the kid, then the signature and the claims."""
    parsed = evidence.parse_evidence(token)
    evidence.evidence_kid(parsed)
    return _bounded_evidence(evidence.verify_evidence(parsed, DEVICE_KEY.verify_key, now=NOW))


def run_evidence_claims(payload: bytes) -> object:
    """Claims bytes signed with the device's own key: the signature passes, the claims fuzzed."""
    token = cose.sign_payload(payload, DEVICE_KEY, DEVICE_ID.encode())
    return _bounded_evidence(evidence.verify_evidence(token, DEVICE_KEY.verify_key, now=NOW))


def run_key_request(payload: bytes) -> object:
    request = messages.KeyRequest.decode(payload)
    return run_evidence(request.evidence)


def run_key_response(payload: bytes) -> object:
    response = messages.KeyResponse.decode(payload)
    times = [t for k in response.keys for t in (k.until, k.renew_at)]
    require(all(0 <= t < TIME_MAX for t in times), "lease times")
    return response


def run_challenge(payload: bytes) -> object:
    challenge = messages.Challenge.decode(payload)
    require(16 <= len(challenge.nonce) <= 64 and 0 <= challenge.expires < TIME_MAX, "challenge")
    return challenge


def run_status(payload: bytes) -> object:
    status = messages.Status.decode(payload)
    require(status.state in messages.STATES and 0 <= status.at < TIME_MAX, "state or time")
    require(status.command == b"" or 16 <= len(status.command) <= 64, "command nonce")
    return status


def run_alert(payload: bytes) -> object:
    return messages.Alert.decode(payload)


def run_command(payload: bytes) -> object:
    return commands.verify_command(payload, VERIFIER_KEY.verify_key)


def run_command_body(body: bytes) -> object:
    """A body signed with the verifier's key: the signature passes, the body is fuzzed."""
    sig = VERIFIER_KEY.sign(commands.COMMAND_DOMAIN, body)
    command = commands.verify_command(
        cbor2.dumps({"body": body, "sig": sig}), VERIFIER_KEY.verify_key
    )
    require(0 <= command.issued_at < TIME_MAX and 16 <= len(command.nonce) <= 64, "command")
    return command


def run_result(token: bytes) -> object:
    return ear.verify_result(token, VERIFIER_KEY.verify_key, now=NOW)


def run_result_claims(payload: bytes) -> object:
    token = cose.sign_payload(payload, VERIFIER_KEY, ear.VERIFIER_KID.encode())
    result = ear.verify_result(token, VERIFIER_KEY.verify_key, now=NOW)
    require(result.status in ear.TIERS and 0 <= result.iat < TIME_MAX, "status or iat")
    return result


def run_artifact(container: bytes) -> object:
    """As the enclave: the manifest, its signature, then every chunk to the authenticated end."""
    stream = io.BytesIO(container)
    signed = artifact.read_manifest(stream)
    signed.verify(ARTIFACT_SIGNER.verify_key)
    return sum(len(chunk) for chunk in artifact.open_stream(stream, signed, DATA_KEY))


# The fields the channel target checks decoded messages against (all optional, so a message
# with any of them is checked for type and range, one with another field refused).
_CHANNEL_FIELDS: channel.Schema = {
    "name": str,
    "value": int,
    "timeout": float,
    "token": bytes,
    "show_stderr": bool,
    "artifacts": list,
    "input": object,
}


def run_channel(stream: bytes) -> object:
    """Frames as a peer sends them: every frame of `stream` is read through a real Channel over a
    socket pair that already holds all of it and is shut for writing, so `recv` never waits."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(stream[: 128 * 1024])  # below the socket buffer: sendall cannot block
        theirs.shutdown(socket.SHUT_WR)
        chan = channel.Channel(ours, max_frame=64 * 1024)
        messages_read: list[channel.Message] = []
        while True:
            try:
                msg = chan.recv(timeout=5)
            except channel.ChannelClosed:
                return messages_read
            except channel.ChannelError:
                continue  # an oversized frame was drained: the channel stays in step
            channel.check(msg, {}, _CHANNEL_FIELDS)
            messages_read.append(msg)


def run_channel_payload(payload: bytes) -> object:
    """One frame's payload straight into the decoder and the schema check."""
    return channel.check(channel.decode(payload), {}, _CHANNEL_FIELDS)


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def run_policy(data: bytes) -> object:
    return policy.parse_policy(_text(data))


def run_policy_edit(data: bytes) -> object:
    """The edit `artifact seal` makes (a reference and a floor), on a fuzzed policy text."""
    ref = policy.ArtifactReference("fuzz-model", 3, "ab" * 32, "model")
    return policy_file.edited(_text(data), policy_file.artifact_reference_change(ref, True))


_CHANNEL_ERRORS = (channel.ChannelError,)
TARGETS = {
    t.name: t
    for t in (
        Target("evidence", run_evidence, (FormatError, SignatureError), "EAT tokens, as received"),
        Target("evidence_claims", run_evidence_claims, (FormatError,), "signed EAT claims"),
        Target("key_request", run_key_request, (FormatError, SignatureError), "KeyRequest"),
        Target("key_response", run_key_response, (FormatError,), "KeyResponse"),
        Target("challenge", run_challenge, (FormatError,), "Challenge"),
        Target("status", run_status, (FormatError,), "Status"),
        Target("alert", run_alert, (FormatError,), "Alert"),
        Target("command", run_command, (FormatError, SignatureError), "signed Command"),
        Target("command_body", run_command_body, (FormatError,), "Command bodies, signed"),
        Target("result", run_result, (FormatError, SignatureError), "EAR tokens"),
        Target("result_claims", run_result_claims, (FormatError,), "signed EAR claims"),
        Target("artifact", run_artifact, (IntegrityError,), "artifact containers"),
        Target("channel", run_channel, _CHANNEL_ERRORS, "enclave channel byte streams"),
        Target("channel_payload", run_channel_payload, _CHANNEL_ERRORS, "channel frame payloads"),
        Target("policy", run_policy, (FormatError,), "policy.toml text"),
        Target("policy_edit", run_policy_edit, (FormatError,), "policy.toml edits"),
    )
}
ALL_ERRORS: tuple[type[BaseException], ...] = (StrongroomError, channel.ChannelError)
