"""Numeric options are range-checked when parsed, at both ends: one usage error line naming the
option, exit status 2, before anything runs (`agent run --interval 0` used to hang, and
`agent invoke --timeout 1e10` was an internal error)."""

from __future__ import annotations

import argparse

import pytest

from strongroom import cliargs
from strongroom.cli import EXIT_USAGE, build_parser

from .conftest import RunCli

B = ["--bundle", "/nonexistent-bundle"]
H = ["--home", "/nonexistent-home"]
ENCLAVE_RUN = ["enclave", "run", "m:f", "1", *B, "--image", "i", "--state", "s"]
BUILD = ["enclave", "build", "src", *H, "--svn", "1", "--out", "o"]
SEAL = [
    "artifact",
    "seal",
    "f",
    *H,
    "--name",
    "m",
    "--version",
    "1",
    "--kind",
    "code",
    "--out",
    "o",
]

BAD = [
    (["agent", "run", *B, "--broker", "mqtts://localhost:8883", "--interval", "0"], "--interval"),
    (["agent", "run", *B, "--broker", "mqtts://localhost:8883", "--interval", "nan"], "--interval"),
    (["agent", "run", *B, "--broker", "mqtts://localhost:8883", "--interval", "-5"], "--interval"),
    (["agent", "invoke", "m:f", "1", *B, "--timeout", "0"], "--timeout"),
    ([*ENCLAVE_RUN, "--timeout", "inf"], "--timeout"),
    (["verifier", "run", *H, "--metrics-port", "0"], "--metrics-port"),
    (["verifier", "run", *H, "--metrics-port", "65536"], "--metrics-port"),
    (["verifier", "run", *H, "--instance", "9"], "--instance"),
    (["verifier", "run", *H, "--challenge-interval", "0"], "--challenge-interval"),
    (["broker", "run", *H, "--port", "0"], "--port"),
    (["broker", "run", *H, "--port", "x"], "--port"),
    (["dashboard", *H, "--port", "70000"], "--port"),
    (["dashboard", *H, "--instance", "-1"], "--instance"),
    (["status", *H, "--settle", "-1"], "--settle"),
    (["sim", "run", *H, "--devices", "0"], "--devices"),
    (["sim", "run", *H, "--duration", "0"], "--duration"),
    (["sim", "run", *H, "--interval", "0"], "--interval"),
    (["verifier", "run", *H, "--challenge-interval", "1e-300"], "--challenge-interval"),
    (["verifier", "run", *H, "--challenge-interval", "0.1"], "--challenge-interval"),
    (["sim", "run", *H, "--grace", "-1"], "--grace"),
    (["sim", "run", *H, "--workers", "0"], "--workers"),
    ([*BUILD, "--product-id", "65536"], "--product-id"),
    ([*SEAL, "--min-svn", "-1"], "--min-svn"),
    # no upper bound was an internal error (OverflowError in threading.Event.wait)
    (["agent", "run", *B, "--broker", "mqtts://h:1", "--interval", "1e10"], "--interval"),
    (["agent", "invoke", "m:f", "1", *B, "--timeout", "1e10"], "--timeout"),
    (["agent", "invoke", "m:f", "1", *B, "--timeout", "86401"], "--timeout"),
    ([*ENCLAVE_RUN, "--timeout", "1e10"], "--timeout"),
    (["verifier", "run", *H, "--challenge-interval", "1e10"], "--challenge-interval"),
    (["status", *H, "--settle", "1e10"], "--settle"),
    (["sim", "run", *H, "--duration", "1e10"], "--duration"),
    (["sim", "run", *H, "--duration", "604801"], "--duration"),
    (["sim", "run", *H, "--interval", "604801"], "--interval"),
    (["sim", "run", *H, "--grace", "10000000000"], "--grace"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "option"), BAD, ids=[" ".join(a[:2]) + " " + o for a, o in BAD])
def test_an_out_of_range_number_is_one_usage_error_line(
    run_cli: RunCli, argv: list[str], option: str
) -> None:
    code, out, err = run_cli(argv)
    assert code == EXIT_USAGE
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("strongroom: error: "), err
    assert f"argument {option}:" in err
    assert "Traceback" not in err


def test_numbers_in_range_are_accepted() -> None:
    argv = ["agent", "run", *B, "--broker", "mqtts://h:1", "--interval", "0.5"]
    assert build_parser(argv).parse_args(argv).interval == 0.5
    argv = ["agent", "run", *B, "--broker", "mqtts://h:1", "--interval", "604800"]
    assert build_parser(argv).parse_args(argv).interval == 7 * 86400
    argv = ["agent", "invoke", "m:f", "1", *B, "--timeout", "86400"]
    assert build_parser(argv).parse_args(argv).timeout == 86400
    argv = ["verifier", "run", *H, "--metrics-port", "65535", "--instance", "8"]
    args = build_parser(argv).parse_args(argv)
    assert (args.metrics_port, args.instance) == (65535, 8)
    argv = ["status", *H, "--settle", "0"]
    assert build_parser(argv).parse_args(argv).settle == 0.0
    argv = ["sim", "run", *H, "--duration", "604800", "--interval", "604800", "--grace", "0"]
    args = build_parser(argv).parse_args(argv)
    assert (args.duration, args.interval, args.grace) == (604800, 604800, 0)


def test_a_huge_timeout_is_a_usage_error_not_an_internal_error(run_cli: RunCli) -> None:
    code, _out, err = run_cli(["agent", "invoke", "m:f", "1", *B, "--timeout", "1e10"])
    assert code == EXIT_USAGE
    assert "must be at most 86400 seconds (1 day), not 1e10" in err
    assert "internal error" not in err


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e999", "x", ""])
def test_non_finite_and_non_numbers_are_refused(text: str) -> None:
    for parse in (cliargs.interval_s, cliargs.timeout_s, cliargs.settle_s, cliargs.finite_float):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_seconds_include_their_ends() -> None:
    assert cliargs.timeout_s(str(cliargs.MAX_TIMEOUT_S)) == cliargs.MAX_TIMEOUT_S
    assert cliargs.settle_s("0") == 0
    for parse, text in ((cliargs.timeout_s, "0"), (cliargs.settle_s, "-0.1")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_integer_ranges_include_their_ends() -> None:
    parse = cliargs.int_range(1, 3)
    assert [parse("1"), parse("3")] == [1, 3]
    for text in ("0", "4", "1.5", "0x2"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    assert cliargs.port("1") == 1 and cliargs.port("65535") == 65535
