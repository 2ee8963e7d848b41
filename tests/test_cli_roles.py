"""The umbrella CLI loads a role's modules only when that role is called, and a command whose
module this installation lacks answers with the extra to install."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from strongroom import cli
from strongroom.errors import EnvironmentFault


def _registered(module: str) -> set[tuple[str, str]]:
    """(role, command) pairs the module really registers."""
    parser = cli.build_parser([])  # every role listed, no module imported
    roles = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    before = {name: set(_commands(p)) for name, p in roles.choices.items()}
    spec = next(s for s in cli.COMMANDS if s.module == module)
    mod = cli._import(module)
    assert not isinstance(mod, ImportError)
    groups = {
        name: next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        for name, p in roles.choices.items()
        if any(isinstance(a, argparse._SubParsersAction) for a in p._actions)
    }
    top_level = any(not c for _r, c in spec.commands)
    if top_level:
        fresh = argparse.ArgumentParser().add_subparsers()
        mod.register(fresh)
        return {(name, "") for name in fresh.choices}
    if module == "agent.cli":
        mod.register(groups, None)
    else:
        mod.register(groups)
    after = {name: set(_commands(p)) for name, p in roles.choices.items()}
    return {(r, c) for r in after for c in after[r] - before.get(r, set())}


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    return []


@pytest.mark.parametrize("spec", cli.COMMANDS, ids=lambda s: s.module)
def test_the_table_of_commands_is_what_each_module_registers(spec: cli.Commands) -> None:
    assert _registered(spec.module) == set(spec.commands)


@pytest.mark.parametrize(
    ("argv", "absent"),
    [
        (["agent", "run", "--help"], ("provisioning", "verifier", "device_sim", "tomlkit")),
        (["enclave", "run", "--help"], ("verifier", "device_sim", "aiomqtt", "starlette")),
        (["fleet", "init", "--help"], ("verifier", "device_sim", "agent.daemon")),
    ],
)
def test_a_role_imports_only_its_own_modules(argv: list[str], absent: tuple[str, ...]) -> None:
    probe = (
        "import sys\n"
        "from strongroom import cli\n"
        f"try:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"loaded = [m for m in sys.modules if m.split('.')[0] in {absent!r} or m in {absent!r}]\n"
        "print('LOADED:' + ','.join(sorted(loaded)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip().splitlines()[-1] == "LOADED:", out.stdout[-500:]


def test_a_fleet_command_this_installation_lacks_says_what_to_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = ModuleNotFoundError("No module named 'tomlkit'", name="tomlkit")
    real = cli._import
    monkeypatch.setattr(
        cli, "_import", lambda name: missing if name == "provisioning.cli" else real(name)
    )
    code = cli.main(["enclave", "build", "src", "--home", "h", "--svn", "1", "--out", "x"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_ENVIRONMENT
    assert "`strongroom enclave build` is not part of this installation" in err
    assert "strongroom[fleet]" in err and "Traceback" not in err


def test_dev_keys_without_the_fleet_side_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = ModuleNotFoundError("No module named 'tomlkit'", name="tomlkit")
    monkeypatch.setattr(cli, "_import", lambda name: missing)
    with pytest.raises(EnvironmentFault, match="--dev-keys-from reads a fleet home"):
        cli._dev_keys(tmp_path, None, tmp_path / "a.sra")


def test_a_missing_module_of_strongroom_itself_is_a_defect_not_an_extra() -> None:
    with pytest.raises(ModuleNotFoundError):
        cli._import("verifier.no_such_module")


def _failing_import(monkeypatch: pytest.MonkeyPatch, module: str, error: ImportError) -> None:
    real = importlib.import_module

    def import_module(name: str, package: str | None = None) -> ModuleType:
        if name == module:
            raise error
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", import_module)


def test_a_dependency_too_old_for_a_fleet_command_says_what_to_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # what `from aiomqtt import Client` raises with a release that has no Client
    too_old = ImportError("cannot import name 'Client' from 'aiomqtt'", name="aiomqtt")
    _failing_import(monkeypatch, "verifier.cli", too_old)
    code = cli.main(["verifier", "run", "--home", "h"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_ENVIRONMENT
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "`strongroom verifier run` is not part of this installation" in err
    assert "'aiomqtt' is not a release it can use" in err and "strongroom[fleet]" in err


def test_a_dependency_too_old_for_a_device_command_says_to_reinstall(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    too_old = ImportError("cannot import name 'x509' from 'cryptography'", name="cryptography")
    _failing_import(monkeypatch, "agent.cli", too_old)
    code = cli.main(["agent", "invoke", "m:f", "1", "--bundle", "b"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_ENVIRONMENT and err.count("\n") == 1
    assert "pip install --upgrade strongroom" in err and "fleet" not in err


def test_a_failing_import_of_our_own_is_one_internal_error_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = ImportError("cannot import name 'gone' from 'agent.daemon'", name="agent.daemon")
    _failing_import(monkeypatch, "agent.cli", ours)
    code = cli.main(["agent", "invoke", "m:f", "1", "--bundle", "b"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_INTERNAL
    assert err.count("\n") == 1 and "internal error (ImportError)" in err
