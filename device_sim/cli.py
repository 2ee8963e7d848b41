"""`strongroom sim run`: a simulated fleet under attack, and its scorecard."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from device_sim.scenarios import SCENARIOS, parse_scenarios
from strongroom.cliargs import MAX_INTERVAL_S, int_range, interval_s, positive_int

SMALL_FLEET = 16  # up to this many devices, enclaves run as processes by default


def _sim_run(args: argparse.Namespace) -> int:
    from device_sim.runner import SimConfig, run  # noqa: PLC0415 - aiomqtt only when simulating

    enclave = args.enclave or ("process" if args.devices <= SMALL_FLEET else "inline")
    workers = args.workers or (1 if args.devices <= 500 else 2)
    config = SimConfig(
        home=args.home,
        devices=args.devices,
        scenarios=parse_scenarios(args.scenarios),
        duration_s=args.duration,
        report=args.report,
        enclave=enclave,
        broker_url=args.broker,
        interval_s=args.interval,
        grace_s=args.grace,
        workers=workers,
    )
    return run(config)


def register(groups: dict[str, Any]) -> None:
    p = groups["sim"].add_parser(
        "run", help="run virtual devices (healthy and attacked) and write a scorecard"
    )
    p.add_argument("--home", type=Path, required=True, help="the simulator's fleet home (created)")
    p.add_argument("--devices", type=positive_int, default=len(SCENARIOS))
    p.add_argument(
        "--scenarios", default="all", help=f"comma-separated, or all: {', '.join(SCENARIOS)}"
    )
    p.add_argument("--duration", type=interval_s, default=30.0, metavar="S")
    p.add_argument("--report", type=Path, default=Path("scorecard.json"), metavar="FILE")
    p.add_argument(
        "--enclave",
        choices=["inline", "process"],
        help=f"default: process up to {SMALL_FLEET} devices, inline above",
    )
    p.add_argument("--broker", metavar="URL", help="use this broker and its verifier")
    p.add_argument(
        "--interval",
        type=int_range(1, MAX_INTERVAL_S),
        default=30,
        help="attestation interval of a new simulator home's policy (s)",
    )
    p.add_argument(
        "--grace",
        type=int_range(0, MAX_INTERVAL_S),
        default=5,
        help="offline grace of a new simulator home (seconds)",
    )
    p.add_argument(
        "--workers", type=positive_int, help="device processes (default: 1, 2 above 500)"
    )
    p.set_defaults(handler=_sim_run)
