"""Numeric options are range-checked when parsed: one usage error line naming the option, exit
status 2, before anything runs (`agent run --interval 0` used to hang)."""

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
    (["sim", "run", *H, "--grace", "-1"], "--grace"),
    (["sim", "run", *H, "--workers", "0"], "--workers"),
    ([*BUILD, "--product-id", "65536"], "--product-id"),
    ([*SEAL, "--min-svn", "-1"], "--min-svn"),
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
    argv = ["verifier", "run", *H, "--metrics-port", "65535", "--instance", "8"]
    args = build_parser(argv).parse_args(argv)
    assert (args.metrics_port, args.instance) == (65535, 8)
    argv = ["status", *H, "--settle", "0"]
    assert build_parser(argv).parse_args(argv).settle == 0.0


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e999", "x", ""])
def test_non_finite_and_non_numbers_are_refused(text: str) -> None:
    for parse in (cliargs.positive_float, cliargs.non_negative_float, cliargs.finite_float):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_integer_ranges_include_their_ends() -> None:
    parse = cliargs.int_range(1, 3)
    assert [parse("1"), parse("3")] == [1, 3]
    for text in ("0", "4", "1.5", "0x2"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    assert cliargs.port("1") == 1 and cliargs.port("65535") == 65535
