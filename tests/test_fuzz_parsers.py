"""Every parser, fuzzed: it returns its object or raises its own error, nothing else, quickly and
without large allocations (fuzz/targets.py names the parsers and their errors).

Seeded from the corpus of real messages in tests/corpus/ (fuzz/make_corpus.py). Derandomized, no
example database, a fixed number of examples and a deadline per example: the same examples every
run, a bounded time. `make fuzz` runs the same targets coverage-guided for longer (atheris).
"""

from __future__ import annotations

import math
import time
import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import targets
from fuzz.targets import DEVICE_ID, DEVICE_KEY, NOW, TARGETS, VERIFIER_KEY, Target
from strongroom import commands, cose, ear, evidence
from strongroom.errors import FormatError

FUZZ = settings(
    max_examples=60,
    deadline=timedelta(seconds=2),  # each example takes milliseconds; two seconds is a hang
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
STRUCTURED = settings(FUZZ, max_examples=150)
MAX_PEAK = 16 * 1024 * 1024  # bytes a parser may allocate for one input of at most 64 KiB


def _run(target: Target, data: bytes) -> Any:
    """The target's outcome (its object or its error) after checking its time and memory."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        return target.run(data)
    except target.expected as e:
        return e
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < MAX_PEAK, f"{target.name}: {peak} bytes allocated for {len(data)} bytes"
        assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    ("name", "seed"),
    [(name, i) for name in TARGETS for i in range(len(targets.corpus(name)))],
)
def test_every_seed_of_the_corpus_is_accepted(name: str, seed: int) -> None:
    """The corpus is real messages: each parses (else the fuzzing would start from garbage)."""
    outcome = _run(TARGETS[name], targets.corpus(name)[seed])
    assert not isinstance(outcome, BaseException), outcome


SEEDS = {name: targets.corpus(name) for name in TARGETS}


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with a few byte-level edits: flips, overwrites, cuts, insertions, splices."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "splice", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x1B, 0x5B, 0x9F, 0xBF]))
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "splice":
            other = draw(st.sampled_from(seeds))
            start = draw(st.integers(0, len(other)))
            data[at:] = other[start:]
        else:
            del data[at:]
    return bytes(data)


@pytest.mark.parametrize("name", list(TARGETS))
@FUZZ
@given(data=st.data())
def test_mutated_messages_give_the_object_or_the_parsers_own_error(
    name: str, data: st.DataObject
) -> None:
    _run(TARGETS[name], data.draw(mutated(SEEDS[name]) | st.binary(max_size=256)))


# -- structured fuzzing: signed claims whose values are drawn, absurd ones included -----------

_HUGE = [2**64 + 7, 2**63, 2**63 - 1, -1, -(2**63) - 1, 2**40, 10**30, 2**200, 10**6]
EXTREMES = st.sampled_from(
    [*_HUGE, math.inf, -math.inf, math.nan, 1.5, -0.0, True, False, None, b""]
)
SCALARS = (
    EXTREMES
    | st.integers()
    | st.floats()
    | st.binary(max_size=80)
    | st.text(max_size=40)
    | st.booleans()
    | st.none()
)
JUNK = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.integers(-8, 8) | st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _drawn_claims(
    draw: Callable[[st.SearchStrategy[Any]], Any], base: dict[Any, Any], nested: tuple[Any, ...]
) -> dict[Any, Any]:
    """`base` with some claims replaced by junk, some removed, some added, and some fields of its
    nested maps and arrays (`nested` names them) replaced too."""
    claims = dict(base)
    keys = sorted(base, key=str)
    for key in draw(st.lists(st.sampled_from(keys), max_size=3)) if keys else ():
        claims[key] = draw(JUNK)
    for key in draw(st.lists(st.sampled_from(keys), max_size=2)) if keys else ():
        claims.pop(key, None)
    claims.update(
        draw(st.dictionaries(st.integers(-70010, 300) | st.text(max_size=4), JUNK, max_size=2))
    )
    for key in nested:
        inner = claims.get(key)
        if isinstance(inner, dict) and inner:
            inner = dict(inner)
            inner[draw(st.sampled_from(sorted(inner, key=str)))] = draw(JUNK)
            claims[key] = inner
        elif isinstance(inner, list) and inner:
            inner = [list(x) if isinstance(x, list) else x for x in inner]
            item = draw(st.integers(0, len(inner) - 1))
            if isinstance(inner[item], list) and inner[item]:
                inner[item][draw(st.integers(0, len(inner[item]) - 1))] = draw(JUNK)
            else:
                inner[item] = draw(JUNK)
            claims[key] = inner
    return claims


def _claims_of(token: bytes) -> dict[Any, Any]:
    claims: dict[Any, Any] = cbor2.loads(cose.parse(token, "seed").payload)
    return claims


EVIDENCE_CLAIMS = [_claims_of(t) for t in SEEDS["evidence"]]
RESULT_CLAIMS = [_claims_of(t) for t in SEEDS["result"]]


@STRUCTURED
@given(data=st.data())
def test_signed_evidence_with_any_claims_is_evidence_or_a_format_error(data: st.DataObject) -> None:
    """Signed with the device's own key, so only the claims stand between the token and the
    verifier: huge integers, infinities, NaN, wrong types and nested junk are FormatErrors."""
    base = data.draw(st.sampled_from(EVIDENCE_CLAIMS))
    claims = _drawn_claims(data.draw, base, (evidence.SR_ENCLAVE, evidence.SR_ARTIFACTS))
    token = cose.sign(claims, DEVICE_KEY, DEVICE_ID.encode())
    outcome = _run(TARGETS["evidence"], token)
    assert not isinstance(outcome, BaseException) or isinstance(outcome, FormatError), outcome
    if claims == base:
        assert isinstance(outcome, evidence.Evidence)


@STRUCTURED
@given(data=st.data())
def test_signed_results_with_any_claims_are_results_or_format_errors(data: st.DataObject) -> None:
    base = data.draw(st.sampled_from(RESULT_CLAIMS))
    claims = _drawn_claims(data.draw, base, (ear.SUBMODS, ear.EAR_VERIFIER_ID))
    submods = claims.get(ear.SUBMODS)
    if isinstance(submods, dict) and len(submods) == 1 and data.draw(st.booleans()):
        ((device, sub),) = submods.items()
        if isinstance(sub, dict):
            nested = (ear.EAR_VECTOR, ear.SR_DETAILS, ear.SR_REASONS)
            claims[ear.SUBMODS] = {device: _drawn_claims(data.draw, sub, nested)}
    token = cose.sign(claims, VERIFIER_KEY, ear.VERIFIER_KID.encode())
    outcome = _run(TARGETS["result"], token)
    assert not isinstance(outcome, BaseException) or isinstance(outcome, FormatError), outcome


@STRUCTURED
@given(data=st.data())
def test_signed_commands_with_any_fields_are_commands_or_format_errors(data: st.DataObject) -> None:
    base: dict[Any, Any] = cbor2.loads(SEEDS["command_body"][0])
    body = cbor2.dumps(_drawn_claims(data.draw, base, ()))
    outcome = _run(TARGETS["command_body"], body)
    assert not isinstance(outcome, BaseException) or isinstance(outcome, FormatError), outcome
    if isinstance(outcome, commands.Command):
        assert 16 <= len(outcome.nonce) <= 64


@pytest.mark.parametrize(
    "name", ["key_request", "key_response", "challenge", "status", "alert", "channel_payload"]
)
@settings(FUZZ, max_examples=40)
@given(
    fields=st.dictionaries(
        st.text(max_size=12)
        | st.sampled_from(
            [
                "op",
                "nonce",
                "expires",
                "evidence",
                "key_ids",
                "keys",
                "refused",
                "state",
                "at",
                "report",
                "command",
                "severity",
                "device",
                "reason",
                "value",
                "timeout",
                "token",
            ]
        ),
        JUNK,
        max_size=6,
    )
)
def test_maps_of_any_fields_give_the_message_or_the_parsers_own_error(
    name: str, fields: dict[str, Any]
) -> None:
    _run(TARGETS[name], cbor2.dumps(fields))


def test_the_structured_strategies_reach_acceptance() -> None:
    """The seeds these strategies start from are accepted as they are (NOW is their time)."""
    for claims in EVIDENCE_CLAIMS:
        token = cose.sign(claims, DEVICE_KEY, DEVICE_ID.encode())
        assert isinstance(
            evidence.verify_evidence(token, DEVICE_KEY.verify_key, now=NOW), evidence.Evidence
        )
    for claims in RESULT_CLAIMS:
        token = cose.sign(claims, VERIFIER_KEY, ear.VERIFIER_KID.encode())
        assert ear.verify_result(token, VERIFIER_KEY.verify_key, now=NOW).device_id == DEVICE_ID
