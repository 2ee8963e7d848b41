"""The `strongroom` command: one parser, subcommands grouped by role.

Each role package contributes its subcommands through a `register(subparsers)` function. This is
the only place that turns errors into messages and exit codes, and (with the daemons' own entry
points) the only place that configures logging.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from agent import cli as agent_cli
from device_sim import cli as sim_cli
from provisioning import cli as provisioning_cli
from strongroom import __version__, logs
from strongroom.errors import EnvironmentFault, InputError, StrongroomError
from verifier import cli as verifier_cli
from verifier.dashboard import cli as dashboard_cli

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]
ROLE_GROUPS = (
    ("fleet", "fleet home and root of trust"),
    ("device", "device enrollment"),
    ("enclave", "enclave source, images and local runs"),
    ("artifact", "encrypted code and model artifacts"),
    ("broker", "the fleet's MQTT broker"),
    ("verifier", "the fleet verifier and key broker"),
    ("agent", "the on-device agent daemon and its local API"),
    ("audit", "the verifier's hash-chained audit log"),
    ("sim", "simulated fleets, healthy and attacked, with a scorecard"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strongroom",
        description="Keep proprietary code and ML models secret on edge devices.",
    )
    parser.add_argument("--version", action="version", version=f"strongroom {__version__}")
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--log-json", action="store_true", help="log JSON lines even on a terminal")
    roles = parser.add_subparsers(dest="role", metavar="ROLE", required=True)
    groups = {
        name: roles.add_parser(name, help=text).add_subparsers(
            dest="command", metavar="COMMAND", required=True
        )
        for name, text in ROLE_GROUPS
    }
    p = roles.add_parser("demo", help="a small fleet end to end, in under a minute")
    p.add_argument("--clean", action="store_true", help="delete the demo's files afterwards")
    p.add_argument(
        "--stay",
        action="store_true",
        help="keep the fleet and its dashboard running after the story, until Ctrl-C",
    )
    p.set_defaults(handler=_demo)
    dashboard_cli.register(roles)
    provisioning_cli.register(groups)
    agent_cli.register(groups)
    verifier_cli.register(groups)
    sim_cli.register(groups)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from device_sim.demo import run_demo  # noqa: PLC0415 - fleet-side imports, only for the demo

    return run_demo(keep=not args.clean, stay=args.stay)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_level, json=True if args.log_json else None)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("strongroom: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except StrongroomError as e:
        print(f"strongroom: error: {e.diagnostics()}", file=sys.stderr)
        if isinstance(e, InputError):
            return EXIT_USAGE
        if isinstance(e, EnvironmentFault):
            return EXIT_ENVIRONMENT
        return EXIT_FAILED
    except Exception as e:
        if os.environ.get("STRONGROOM_DEBUG"):
            raise
        print(
            f"strongroom: internal error ({type(e).__name__}); rerun with STRONGROOM_DEBUG=1 "
            "for details and report it",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
