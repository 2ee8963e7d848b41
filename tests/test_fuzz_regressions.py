"""What fuzzing and the hardening review (issue 13) found, one test each: every one but the first
(the seed, accepted) failed before the schemas of strongroom.fields, with a foreign exception, a
long walk, a huge allocation or an absurd value accepted, and is now a FormatError or a
ChannelError with a one-line message."""

from __future__ import annotations

import io
import math
import time
import tracemalloc
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent import channel
from fuzz.targets import DEVICE_ID, DEVICE_KEY, NOW, VERIFIER_KEY, seed
from provisioning import policy_file
from strongroom import artifact, commands, cose, ear, evidence, messages, policy
from strongroom.errors import FormatError
from strongroom.signing import SigningKey
from tests.verifier_rig import Rig

EVIDENCE = cbor2.loads(cose.parse(seed("evidence", "fresh"), "seed").payload)
RESULT = cbor2.loads(cose.parse(seed("result", "affirming"), "seed").payload)
ENCLAVE = EVIDENCE[evidence.SR_ENCLAVE]
E = evidence


def _signed_evidence(claims: dict[int, Any] | None = None) -> bytes:
    """The corpus' evidence with some claims replaced, signed with the device's own key: a valid
    signature over absurd claims."""
    return cose.sign({**EVIDENCE, **(claims or {})}, DEVICE_KEY, DEVICE_ID.encode())


def _refused(token: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=match) as caught:
        evidence.verify_evidence(token, DEVICE_KEY.verify_key, now=NOW)
    assert "\n" not in str(caught.value)


def test_the_seed_evidence_is_accepted() -> None:
    ev = evidence.verify_evidence(_signed_evidence(), DEVICE_KEY.verify_key, now=NOW)
    assert ev.device_id == DEVICE_ID and ev.seq == 7


@pytest.mark.parametrize("seq", [2**64 + 7, 2**63, -1, 7.0, True, "7"])
def test_a_sequence_number_the_store_cannot_hold_is_refused(seq: object) -> None:
    _refused(_signed_evidence({E.SR_SEQ: seq}), r"seq \(-70000\) must be an integer in \[0, 9223")


@pytest.mark.parametrize("iat", [math.inf, -math.inf, math.nan, 2**40, -1, 1.5e9, 2**64])
def test_an_issue_time_that_is_not_a_finite_time_is_refused(iat: object) -> None:
    _refused(_signed_evidence({E.IAT: iat}), "iat must be a time")


@pytest.mark.parametrize(("claim", "name"), [(E.EXP, "exp"), (E.NBF, "nbf")])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 2**64, "soon"])
def test_validity_times_that_are_not_finite_times_are_refused(
    claim: int, name: str, value: object
) -> None:
    _refused(_signed_evidence({claim: value}), f"malformed time claim: {name}")


def test_nan_expiry_is_refused_by_the_cose_layer_for_every_token() -> None:
    token = cose.sign({4: math.nan, 5: NOW}, VERIFIER_KEY, b"k")
    with pytest.raises(FormatError, match="exp"):
        cose.verify(token, VERIFIER_KEY.verify_key, "token", now=NOW)


def test_an_integer_where_the_nonce_belongs_is_refused_without_allocating_it() -> None:
    token = _signed_evidence({E.EAT_NONCE: 50_000_000})  # bytes(N) made 50 MB of zeros
    tracemalloc.start()
    try:
        _refused(token, "eat_nonce must be a byte string of 8 to 64 bytes")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


@pytest.mark.parametrize(
    ("claims", "match"),
    [
        ({E.EAT_NONCE: b"short"}, "eat_nonce"),
        ({E.UEID: b"\x01" * 32}, "ueid must be a byte string of 33 bytes"),
        ({E.SR_ENCLAVE: {**ENCLAVE, "mrenclave": 10**6}}, "mrenclave"),
        ({E.SR_ENCLAVE: {**ENCLAVE, "svn": 2**64}}, "svn"),
        ({E.SR_ENCLAVE: {**ENCLAVE, "debug": 1}}, "debug must be true or false"),
        ({E.SR_ENCLAVE: {**ENCLAVE, "x": 1}}, "does not define"),
        ({E.SR_ARTIFACTS: [["model", True, bytes(32)]]}, r"artifacts \(-70005\)\[0\]\[1\]"),
        ({E.SR_ARTIFACTS: [["model", 2, b"\xe3" * 31]]}, "must be a byte string of 32 bytes"),
        ({E.SR_ARTIFACTS: [["model", 2, bytes(32)]] * 65}, "array of 0 to 64 items"),
        ({E.SR_SMT: "yes"}, "smt"),
        ({E.SR_SECURE_BOOT: 1}, "secure boot"),
        ({E.SR_ENCLAVE: 42}, r"enclave \(-70004\) must be a map"),
        ({E.SR_ENCLAVE_KEY: b"\x00" * 31}, "enclave key"),
        ({E.SR_FIRMWARE: "1" * 1000}, "firmware"),
        ({E.SUB: "Not A Device"}, "sub"),
        ({E.DBGSTAT: 2**64}, "dbgstat"),
    ],
)
def test_claims_of_the_wrong_type_or_size_are_refused(claims: dict[int, Any], match: str) -> None:
    _refused(_signed_evidence(claims), match)


def test_a_poison_pill_is_rejected_with_an_alert_and_the_verifier_goes_on(
    rig: Rig, tmp_path: Path
) -> None:
    """The attack of issue 13: one device's own key signs `iat` = +inf (then `seq` = 2^64+7);
    the verifier rejects both, alerts, and appraises the next good evidence as usual."""
    device_key = SigningKey.from_pem((tmp_path / "cam-a/platform/attestation.key").read_bytes())
    good = rig.evidence("cam-a")
    claims = cbor2.loads(cose.parse(good.payload, "evidence").payload)
    pills = []
    for key, value in ((evidence.IAT, math.inf), (evidence.SR_SEQ, 2**64 + 7)):
        token = cose.sign({**claims, key: value}, device_key, b"cam-a")
        pills.append(type(good)(good.topic, token, False))
    rig.verifier.handle_batch(pills)
    assert rig.verifier.counts["rejected"] == 2
    assert [t for t, _p, _r in rig.mqtt.published if t.endswith("/alerts")] == ["fleet/alerts"] * 2
    rig.verifier.handle_batch([good])
    assert rig.mqtt.results(rig.home) == [("cam-a", 1)]


def _signed_result(sub_changes: dict[int, Any]) -> bytes:
    ((device, sub),) = RESULT[ear.SUBMODS].items()
    claims = {**RESULT, ear.SUBMODS: {device: {**sub, **sub_changes}}}
    return cose.sign(claims, VERIFIER_KEY, ear.VERIFIER_KID.encode())


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({ear.EAR_STATUS: math.inf}, "ear.status"),  # int(inf): OverflowError
        ({ear.EAR_STATUS: 3}, "ear.status must be one of"),
        ({ear.EAR_VECTOR: {0: 2**70}}, "trustworthiness-vector"),
        ({ear.EAR_VECTOR: {9: 2}}, "does not define"),
        ({ear.SR_REASONS: [b"bytes"]}, "reasons"),
        ({ear.SR_DETAILS: {"seq": 2**64}}, "seq"),
        ({ear.SR_DETAILS: {"artifacts": {"model": "two"}}}, "artifacts"),
    ],
)
def test_results_with_absurd_claims_are_refused(changes: dict[int, Any], match: str) -> None:
    with pytest.raises(FormatError, match=match):
        ear.verify_result(_signed_result(changes), VERIFIER_KEY.verify_key, now=NOW)


def _shared_dag(width: int, depth: int, level: int = 0) -> Any:
    """`depth` levels of a list holding the level below `width` times, as CBOR shared references
    (tag 28 marks a value shareable, tag 29 refers to the n-th marked one): a few hundred bytes,
    width^depth items to whoever walks the decoded value."""
    if level == depth:
        return [1]
    inner = cbor2.CBORTag(28, _shared_dag(width, depth, level + 1))
    return [inner] + [cbor2.CBORTag(29, level)] * (width - 1)


def test_shared_references_cannot_blow_up_a_result_into_its_consumers() -> None:
    """Its consumers walk `details` (the dashboard renders it as JSON): 32^4 items, 400 bytes."""
    ((device, sub),) = RESULT[ear.SUBMODS].items()
    details = {"freshness": "fresh", "extra": _shared_dag(32, 4)}
    claims = {**RESULT, ear.SUBMODS: {device: {**sub, ear.SR_DETAILS: details}}}
    payload = cbor2.dumps(claims)
    assert len(payload) < 1024
    token = cose.sign_payload(payload, VERIFIER_KEY, ear.VERIFIER_KID.encode())
    with pytest.raises(FormatError, match="CBOR tag"):
        ear.verify_result(token, VERIFIER_KEY.verify_key, now=NOW)


@pytest.mark.parametrize(
    "tagged",
    [
        b"\xc4\x82\x01\xc2\x59\xf0\x00" + b"\xff" * 0xF000,  # decimal fraction, 60 KiB mantissa
        b"\xd8\x23\x79\xf0\x00" + b"(a*)*" * (0xF000 // 5) + b"a",  # regular expression
    ],
)
def test_tags_are_refused_before_cbor2_builds_what_they_ask_for(tagged: bytes) -> None:
    """cbor2 spent about a second of CPU on either before (and then ignored the unknown field):
    one such status per second from one device would have kept a verifier busy."""
    payload = b"\xa2" + cbor2.dumps("state") + cbor2.dumps("online") + cbor2.dumps("x") + tagged
    assert len(payload) < messages.MAX_PAYLOAD
    started = time.monotonic()
    with pytest.raises(FormatError, match="CBOR tag"):
        messages.Status.decode(payload)
    assert time.monotonic() - started < 0.5  # it takes microseconds: room for a loaded machine


def test_a_channel_frame_of_shared_references_is_refused_at_once() -> None:
    payload = cbor2.dumps({"op": "x", "input": _shared_dag(32, 4)})
    started = time.monotonic()
    with pytest.raises(channel.ChannelError, match="shared references"):
        channel.decode(payload)  # was a walk of 32^4 items (and 32^6 would have been hours)
    assert time.monotonic() - started < 0.5


def test_a_signed_command_with_a_nan_time_or_an_integer_nonce_is_refused() -> None:
    for field, value in (("issued_at", math.nan), ("nonce", 10**7), ("device", "../x")):
        body = {**cbor2.loads(seed("command_body", "revoke")), field: value}
        raw = cbor2.dumps(body, canonical=True)
        signed = cbor2.dumps({"body": raw, "sig": VERIFIER_KEY.sign(commands.COMMAND_DOMAIN, raw)})
        with pytest.raises(FormatError, match=field):
            commands.verify_command(signed, VERIFIER_KEY.verify_key)


def test_a_status_carries_the_confirmed_commands_nonce() -> None:
    nonce = bytes(range(16))
    revoked = messages.Status.decode(messages.Status("revoked", NOW, "wiped", nonce).encode())
    assert revoked == messages.Status("revoked", NOW, "wiped", nonce)
    assert messages.Status.decode(messages.Status("online", NOW).encode()).command == b""
    for bad in (b"short", bytes(65), 16, "nonce" * 4):
        with pytest.raises(FormatError, match=r"status\.command"):
            messages.Status.decode(cbor2.dumps({"state": "revoked", "at": NOW, "command": bad}))


@pytest.mark.parametrize(
    "doc",
    [
        {"state": "online", "at": 2**1000},  # float(): OverflowError, as "out of range"
        {"state": "online", "report": "x" * 1025},  # was cut to 300 characters, whatever its size
    ],
)
def test_a_status_out_of_bounds_is_refused(doc: dict[str, Any]) -> None:
    with pytest.raises(FormatError, match="status"):
        messages.Status.decode(cbor2.dumps(doc))


def test_an_artifact_header_with_a_huge_number_is_a_format_error() -> None:
    header = b'{"size":' + b"9" * 5000 + b"}"  # json: ValueError (4,300-digit limit)
    data = artifact.MAGIC + len(header).to_bytes(4, "big") + header + bytes(64)
    with pytest.raises(FormatError, match="not valid JSON"):
        artifact.read_manifest(io.BytesIO(data))


@pytest.mark.parametrize(
    "text",
    [
        "version = " + "9" * 5000,  # tomllib: ValueError
        "x = " + "[" * 3000 + "]" * 3000,  # tomllib: RecursionError
        "x = " + "{a = " * 2000 + "1" + "}" * 2000,
    ],
)
def test_a_policy_tomllib_cannot_read_is_a_format_error(text: str) -> None:
    with pytest.raises(FormatError, match="not valid TOML"):
        policy.parse_policy(text)


@pytest.mark.parametrize("text", [b"version = [", b"version = 1\n\xff\xfe", b"version = 1.5"])
def test_editing_a_policy_that_cannot_be_edited_is_a_format_error(
    tmp_path: Path, text: bytes
) -> None:
    path = tmp_path / "policy.toml"
    path.write_bytes(text)
    with pytest.raises(FormatError):
        policy_file.set_values(path, {("keys", "lease_s"): 7200})
    assert path.read_bytes() == text
