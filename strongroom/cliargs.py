"""Range-checked numbers for command-line options: argparse `type=` functions.

Each turns the option's text into a number or raises `argparse.ArgumentTypeError`, which argparse
prints as one usage error line naming the option (exit status 2). Non-finite floats (nan, inf)
are refused everywhere: a NaN interval or timeout compares false with everything and hangs a loop.
This module only parses; it imports no role.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

MAX_PORT = 65535


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from e
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _int(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from e


def finite_float(text: str) -> float:
    """Any finite number."""
    return _float(text)


def positive_float(text: str) -> float:
    """A finite number above 0 (seconds of an interval or a timeout)."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number, 0 or more."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    """A whole number from `lo` to `hi` (both included)."""

    def parse(text: str) -> int:
        value = _int(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, not {text}")
        return value

    parse.__name__ = f"integer {lo}..{hi}"  # argparse names the type in some messages
    return parse


def positive_int(text: str) -> int:
    """A whole number, 1 or more."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {text}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number, 0 or more."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def port(text: str) -> int:
    """A TCP port to connect to or listen on: 1-65535."""
    value = _int(text)
    if not 1 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"must be a port between 1 and {MAX_PORT}, not {text}")
    return value
