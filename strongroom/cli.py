"""The `strongroom` command: one parser, subcommands grouped by role.

Each role package contributes its subcommands through a `register(subparsers)` function, and only
the modules of the role called are imported: a device's base install runs `agent` and `enclave
run` without the fleet side, whose commands then answer with the extra to install. This module is
the composition root: the one place in `strongroom` allowed to import the roles (the import
contracts in pyproject.toml say so). It is the only place that turns errors into messages and exit
codes, and (with the daemons' own entry points) the only place that configures logging.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from strongroom import __version__, logs
from strongroom.errors import EnvironmentFault, InputError, StrongroomError

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
TOP_LEVEL = (  # roles that are a command of their own (no COMMAND after them)
    ("status", "the fleet's trust status, from its signed results"),
    ("dashboard", "the fleet dashboard in a web browser"),
    ("doctor", "check a device bundle or a fleet home; each finding says what to do"),
)
FLEET_EXTRA = "pip install 'strongroom[fleet]'"
OWN_PACKAGES = frozenset({"strongroom", "agent", "provisioning", "verifier", "device_sim"})


@dataclass(frozen=True)
class Commands:
    """One module's subcommands: what it registers (`module.register(groups)`, or for a top-level
    module `register(roles)`) and under which roles, so a role's module is imported only when that
    role is called, and a command whose module cannot be imported here (a device install without
    the fleet extra) still gets a one-line answer."""

    module: str
    commands: tuple[tuple[str, str], ...]  # (role, command); command "" for a top-level role
    device: bool = False  # part of a base (device) install


COMMANDS = (
    Commands("agent.cli", (("agent", "run"), ("agent", "invoke"), ("enclave", "run")), True),
    Commands(
        "provisioning.cli",
        (
            ("fleet", "init"),
            ("device", "enroll"),
            ("enclave", "source"),
            ("enclave", "build"),
            ("artifact", "seal"),
            ("artifact", "inspect"),
        ),
    ),
    Commands(
        "verifier.cli",
        (
            ("device", "revoke"),
            ("device", "reinstate"),
            ("device", "reattest"),
            ("audit", "verify"),
            ("audit", "show"),
            ("broker", "run"),
            ("verifier", "run"),
        ),
    ),
    Commands("device_sim.cli", (("sim", "run"),)),
    Commands("verifier.dashboard.cli", (("status", ""), ("dashboard", ""))),
    Commands("agent.doctor", (("doctor", ""),), True),
)


def _role_of(argv: Sequence[str]) -> str | None:
    """The role named on the command line (the first word that is not a global option)."""
    args = iter(argv)
    for arg in args:
        if arg == "--log-level":
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def _import(name: str) -> ModuleType | ImportError:
    """The CLI module, or why this installation cannot import it: a third-party package that is
    missing (an extra not installed) or cannot give what we import from it (a release too old).
    A failing import of Strongroom's own packages is a defect, and raised."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if not e.name or e.name.split(".")[0] in OWN_PACKAGES:
            raise
        return e


def _unavailable(role: str, command: str, missing: ImportError, *, device: bool) -> Handler:
    words = f"{role} {command}".strip()
    if isinstance(missing, ModuleNotFoundError):
        why = f"no module {missing.name!r}"
    else:  # present, but not a release that has what we import from it
        why = f"{missing.name!r} is not a release it can use"
    install = (
        "reinstall it with its dependencies: pip install --upgrade strongroom"
        if device
        else f"it runs on the fleet side: {FLEET_EXTRA}"
    )

    def handler(_args: argparse.Namespace) -> int:
        raise EnvironmentFault(
            f"`strongroom {words}` is not part of this installation ({why})", hint=install
        )

    return handler


def _add_unavailable(parser: argparse.ArgumentParser, handler: Handler) -> None:
    """Whatever follows the command (its options unknown here) goes to `handler`."""
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.set_defaults(handler=handler, unavailable=True)


def _dev_keys(home: Path, enclave: Any, artifact: Path) -> Any:
    """`enclave run --dev-keys-from HOME`: the fleet's development key source, imported only when
    used (a device install has no fleet side)."""
    devkeys = _import("provisioning.devkeys")
    if isinstance(devkeys, ImportError):
        raise EnvironmentFault(
            f"--dev-keys-from reads a fleet home, and this installation has no module "
            f"{devkeys.name!r}",
            hint=f"{FLEET_EXTRA}, or let the verifier release the keys",
        )
    return devkeys.dev_wrapped_key(home, enclave, artifact)


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, as every other error is (`strongroom: error: ...`), with the
    command's --help to read; exit status 2. Subcommand parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("strongroom").strip()
        where = f"{command}: " if command else ""
        self.exit(
            EXIT_USAGE,
            f"strongroom: error: {where}{message}; see `{self.prog} --help`\n",
        )


def _fleet_checks(home: Path) -> Any:
    """`doctor --home HOME`: the fleet side's checks, imported only when asked for (a device
    install has no fleet side, and says so in one line)."""
    doctor = _import("provisioning.doctor")
    if isinstance(doctor, ImportError):
        raise EnvironmentFault(
            f"`strongroom doctor --home` checks a fleet home, and this installation has no "
            f"module {doctor.name!r}",
            hint=FLEET_EXTRA,
        )
    return doctor.check_home(home)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: every role is listed, but only the modules of the role `argv`
    names are imported (all of them when `argv` is None, e.g. for tests of the whole CLI)."""
    parser = _Parser(
        prog="strongroom",
        description="Keep proprietary code and ML models secret on edge devices.",
    )
    parser.add_argument("--version", action="version", version=f"strongroom {__version__}")
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="default: info for daemons (they say at start what they serve, where they connect "
        "and as whom), warning for one-shot commands",
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
    role = None if argv is None else _role_of(argv)
    load_all = argv is None
    top_level = dict(TOP_LEVEL)
    for spec in COMMANDS:
        if not load_all and role not in {r for r, _c in spec.commands}:
            if any(r in top_level for r, _c in spec.commands):
                for r, _c in spec.commands:  # listed in the help; never imported
                    roles.add_parser(r, help=top_level[r])
            continue
        module = _import(spec.module)
        if isinstance(module, ImportError):
            for r, command in spec.commands:
                sub = roles.add_parser(r, help=top_level[r]) if not command else None
                sub = sub or groups[r].add_parser(command, help="(needs the fleet extra)")
                _add_unavailable(sub, _unavailable(r, command, module, device=spec.device))
            continue
        if spec.module == "agent.cli":
            module.register(groups, _dev_keys)
        elif spec.module == "agent.doctor":
            module.register(roles, _fleet_checks)
        else:
            is_top = any(not c for _r, c in spec.commands)
            module.register(roles if is_top else groups)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from device_sim.demo import run_demo  # noqa: PLC0415 - fleet-side imports, only for the demo

    return run_demo(keep=not args.clean, stay=args.stay)


def _log_level(args: argparse.Namespace) -> str:
    """The level asked for, else `info` for a daemon (a command that registered `daemon=True`,
    or a function of its arguments that says whether this run is one) and `warning` for a
    one-shot command, which then prints only its answer."""
    if args.log_level:
        return str(args.log_level)
    daemon = getattr(args, "daemon", False)
    if callable(daemon):
        daemon = daemon(args)
    return "info" if daemon else "warning"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        # building the parser imports the role's modules: a defect there is an internal error
        parser = build_parser(argv)
        args, unknown = parser.parse_known_args(argv)
        if unknown and not getattr(args, "unavailable", False):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        logs.configure(_log_level(args), json=True if args.log_json else None)
        handler: Handler = args.handler
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
