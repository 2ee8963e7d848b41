"""Range-checked numbers for command-line options: argparse `type=` functions.

Each turns the option's text into a number or raises `argparse.ArgumentTypeError`, which argparse
prints as one usage error line naming the option (exit status 2). Non-finite floats (nan, inf)
are refused everywhere: a NaN interval or timeout compares false with everything and hangs a loop.
Seconds have an upper bound too (intervals and durations 7 days, timeouts 1 day): a wait of 1e10 s
overflows the C timeout below `threading.Event.wait` and was an internal error.
This module only parses; it imports no role.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

MAX_PORT = 65535
DAY_S = 86400
MAX_INTERVAL_S = 7 * DAY_S  # attestation intervals, grace periods, simulation durations
MAX_TIMEOUT_S = DAY_S  # how long a command waits for an answer


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


def seconds(limit: float, *, zero: bool = False, least: float = 0.0) -> Callable[[str], float]:
    """Seconds above 0 (from 0 if `zero`; from `least` if given) up to `limit`."""

    def parse(text: str) -> float:
        value = _float(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least:g} seconds, not {text}")
        if value < 0 or (value == 0 and not zero):
            least_text = "0 or more" if zero else "more than 0"
            raise argparse.ArgumentTypeError(f"must be {least_text} seconds, not {text}")
        if value > limit:
            raise argparse.ArgumentTypeError(
                f"must be at most {limit:g} seconds ({_days(limit)}), not {text}"
            )
        return value

    parse.__name__ = "seconds"  # argparse names the type in some messages
    return parse


def _days(limit: float) -> str:
    days = limit / DAY_S
    return f"{days:g} day" + ("" if days == 1 else "s")


interval_s = seconds(MAX_INTERVAL_S)  # between attestations, a simulation's length
timeout_s = seconds(MAX_TIMEOUT_S)  # waiting for an answer
settle_s = seconds(MAX_TIMEOUT_S, zero=True)
# the verifier's periodic challenges: its housekeeping tick (0.2 s) is the finest it can keep, and
# a tinier interval made the challenges due per tick overflow the store's LIMIT
challenge_interval_s = seconds(MAX_INTERVAL_S, least=0.2)


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


def port(text: str) -> int:
    """A TCP port to connect to or listen on: 1-65535."""
    value = _int(text)
    if not 1 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"must be a port between 1 and {MAX_PORT}, not {text}")
    return value
