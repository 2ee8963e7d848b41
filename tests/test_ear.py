"""Attestation results (EAR): signed by the verifier, readable by anyone with its public key, and
tiers of AR4SI claim values."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import cwt
import pytest
from cwt import COSEKey

from strongroom.ear import (
    EAR_PROFILE,
    VECTOR_KEYS,
    VERIFIER_KID,
    AttestationResult,
    sign_result,
    tier_of,
    verify_result,
)
from strongroom.errors import FormatError, SignatureError
from strongroom.signing import SigningKey

VERIFIER_KEY = SigningKey(bytes(range(32)))
OTHER_KEY = SigningKey(bytes(range(1, 33)))

RESULT = AttestationResult(
    device_id="dev-a",
    status="warning",
    vector={
        "instance-identity": 2,
        "configuration": 2,
        "executables": 33,
        "file-system": 0,
        "hardware": 2,
        "runtime-opaque": 2,
        "storage-opaque": 2,
        "sourced-data": 0,
    },
    reasons=("artifact extra v1 is not known", "second reason: ünïcode"),
    policy_id="policy-v7",
    iat=int(time.time()),
    details={
        "firmware": "1.4.2",
        "svn": 3,
        "mrenclave": "c1" * 32,
        "artifacts": {"model": 2, "vendor": 1},
        "seq": 41,
        "freshness": "fresh",
    },
    verifier_id="strongroom/9.8.7",
)


def test_a_signed_result_verifies_to_the_same_result() -> None:
    token = sign_result(RESULT, VERIFIER_KEY)
    assert verify_result(token, VERIFIER_KEY.verify_key) == RESULT


@pytest.mark.parametrize("status", ["none", "affirming", "warning", "contraindicated"])
def test_every_status_survives_the_round_trip(status: str) -> None:
    result = replace(RESULT, status=status, details={}, reasons=())
    assert verify_result(sign_result(result, VERIFIER_KEY), VERIFIER_KEY.verify_key) == result


def test_claims_left_out_of_the_vector_read_back_as_no_claim() -> None:
    partial = replace(RESULT, vector={"executables": 96})
    back = verify_result(sign_result(partial, VERIFIER_KEY), VERIFIER_KEY.verify_key)
    assert back.vector == {k: (96 if k == "executables" else 0) for k in VECTOR_KEYS}


def test_a_result_signed_by_another_key_is_a_signature_error() -> None:
    token = sign_result(RESULT, OTHER_KEY)
    with pytest.raises(SignatureError):
        verify_result(token, VERIFIER_KEY.verify_key)


def test_a_tampered_result_does_not_verify() -> None:
    token = bytearray(sign_result(RESULT, VERIFIER_KEY))
    at = bytes(token).find(b"policy-v7")
    assert at > 0
    token[at + len("policy-v")] = ord("9")  # claim policy-v9 instead
    with pytest.raises((SignatureError, FormatError)):
        verify_result(bytes(token), VERIFIER_KEY.verify_key)


@pytest.mark.parametrize(
    "token",
    [b"", b"garbage", b"\x01", b"\xa1\x01\x02", b"\xd2\x84"],
    ids=["empty", "text", "cbor-int", "cbor-map", "truncated-cose"],
)
def test_garbage_is_a_format_error(token: bytes) -> None:
    with pytest.raises(FormatError):
        verify_result(token, VERIFIER_KEY.verify_key)


def test_a_truncated_result_is_a_format_error() -> None:
    token = sign_result(RESULT, VERIFIER_KEY)
    with pytest.raises(FormatError):
        verify_result(token[: len(token) // 2], VERIFIER_KEY.verify_key)


def _signed_claims(claims: dict[int, Any]) -> bytes:
    """A correctly signed CWT with arbitrary claims, to check the parsing behind the signature."""
    cose_key = COSEKey.from_pem(VERIFIER_KEY.to_pem(), alg="EdDSA", kid=VERIFIER_KID)
    token: bytes = cwt.encode(claims, cose_key)
    return token


def _claims(**changes: Any) -> dict[int, Any]:
    now = int(time.time())
    sub = {1000: 2, 1001: {0: 2}, 1003: "policy-v7"}
    claims: dict[int, Any] = {
        265: EAR_PROFILE,
        6: now,
        4: now + 3600,
        1004: {"developer": "strongroom", "build": "1.0"},
        266: {"dev-a": sub},
    }
    if "status" in changes:
        sub[1000] = changes["status"]
    if "profile" in changes:
        claims[265] = changes["profile"]
    if "submods" in changes:
        claims[266] = changes["submods"]
    return claims


def test_the_hand_built_claims_are_a_valid_result() -> None:
    """The baseline for the malformed variants below."""
    result = verify_result(_signed_claims(_claims()), VERIFIER_KEY.verify_key)
    assert (result.device_id, result.status, result.policy_id) == (
        "dev-a",
        "affirming",
        "policy-v7",
    )


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param(_claims(profile="tag:example.com,2023:other"), id="other-profile"),
        pytest.param(_claims(submods={}), id="no-submodule"),
        pytest.param(
            _claims(submods={"dev-a": {1000: 2}, "dev-b": {1000: 2}}), id="two-submodules"
        ),
        pytest.param(_claims(submods={"dev-a": {1000: 2, 1001: {0: 2}}}), id="no-policy-id"),
        pytest.param(_claims(status=5), id="status-not-a-tier"),
        pytest.param(_claims(status="affirming"), id="status-as-text"),
        pytest.param(_claims(submods=["dev-a"]), id="submods-not-a-map"),
    ],
)
def test_a_signed_token_that_is_not_a_strongroom_result_is_a_format_error(
    claims: dict[int, Any],
) -> None:
    with pytest.raises(FormatError):
        verify_result(_signed_claims(claims), VERIFIER_KEY.verify_key)


def test_an_old_result_is_not_reported_as_a_forgery() -> None:
    """A result more than a year old is past its `exp`; it is still the verifier's own signature,
    so the error must not be the one that means "not signed by the fleet verifier"."""
    old = replace(RESULT, iat=int(time.time()) - 2 * 365 * 86400)
    with pytest.raises(FormatError):
        verify_result(sign_result(old, VERIFIER_KEY), VERIFIER_KEY.verify_key)


@pytest.mark.parametrize(
    ("value", "tier"),
    [
        (0, "none"),
        (1, "none"),
        (2, "affirming"),
        (31, "affirming"),
        (32, "warning"),
        (33, "warning"),
        (95, "warning"),
        (96, "contraindicated"),
        (127, "contraindicated"),
        (-1, "none"),
        (-2, "affirming"),
        (-31, "affirming"),
        (-33, "warning"),
        (-95, "warning"),
        (-97, "contraindicated"),
        (-128, "contraindicated"),
    ],
)
def test_claim_values_fall_in_their_ar4si_tier(value: int, tier: str) -> None:
    assert tier_of(value) == tier


@pytest.mark.parametrize(("value", "tier"), [(-32, "affirming"), (-96, "warning")])
def test_negative_tier_boundaries_follow_ar4si(value: int, tier: str) -> None:
    """AR4SI (draft-ietf-rats-ar4si, trustworthiness claim tiers) puts -32..-2 in affirming and
    -96..-33 in warning: the negative ranges are offset by one from the positive ones (as in
    veraison/ear's IsAffirming / IsWarning)."""
    assert tier_of(value) == tier
