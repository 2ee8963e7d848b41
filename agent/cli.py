"""On-device subcommands: `agent run`, `agent invoke` and `enclave run`.

Nothing here imports the fleet side: `enclave run --dev-keys-from HOME` takes its development key
source from whoever registers these commands (the umbrella CLI passes the fleet's when the fleet
side is installed)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from agent.daemon import AgentConfig, AgentDaemon
from agent.host import EnclaveHost, EnclaveInfo, HostConfig, WrappedKey, read_bundle_info
from agent.launcher import Launcher
from agent.local_api import call
from agent.lock import AgentLock
from agent.privsep import DeviceUsers, separate
from strongroom.cliargs import interval_s, timeout_s
from strongroom.errors import EnvironmentFault, InputError
from strongroom.fsutil import make_private_dir
from strongroom.mqtt import add_mqtt_version, mqtt_protocol, parse_broker_url
from strongroom.signals import stop_event

log = structlog.get_logger()
# Development keys for a debug enclave: (fleet home, the started enclave, artifact) -> wrapped key
DevKeySource = Callable[[Path, EnclaveInfo, Path], WrappedKey]


def _json_input(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"INPUT is not valid JSON: {e.msg}") from e


def _separation(args: argparse.Namespace, state: Path) -> Launcher | None:
    """As root (and unless told not to): the launcher that runs the platform and the enclave
    under users of their own, this process having become the agent's user. Otherwise None:
    everything runs as the current user, and production images are refused unless
    --no-privilege-separation accepts that."""
    if args.no_privilege_separation:
        log.warning("privilege_separation_off", reason="--no-privilege-separation")
        return None
    if os.geteuid() != 0:
        return None
    users = DeviceUsers(args.agent_user, args.platform_user, args.enclave_user)
    return separate(args.bundle, state, users)


def _enclave_run(args: argparse.Namespace) -> int:
    value = _json_input(args.input)
    if args.dev_keys_from and not args.dev:
        raise InputError(
            "--dev-keys-from needs --dev", hint="development keys are never used in production"
        )
    dev_keys: DevKeySource | None = args.dev_key_source if args.dev_keys_from else None
    if args.dev_keys_from and dev_keys is None:
        raise EnvironmentFault(
            "--dev-keys-from reads a fleet home, and the fleet side is not installed here",
            hint="pip install 'strongroom[fleet]', or give the enclave its keys from the verifier",
        )
    read_bundle_info(args.bundle)  # a clear error for a wrong path before anything changes
    # the bundle's platform (its monotonic counters) serves one process at a time
    with AgentLock.acquire(args.bundle, by="enclave run"):
        return _enclave_run_locked(args, value, dev_keys)


def _enclave_run_locked(
    args: argparse.Namespace, value: object, dev_keys: DevKeySource | None
) -> int:
    launcher = _separation(args, args.state)
    config = HostConfig(
        bundle=args.bundle,
        state_dir=args.state,
        production=not args.dev,
        separation_required=not args.no_privilege_separation,
    )
    try:
        with EnclaveHost(config, launcher) as host:
            info = host.start(args.image)
            for path in args.artifact:
                key = (
                    dev_keys(args.dev_keys_from, info, path)
                    if dev_keys and args.dev_keys_from
                    else None
                )
                host.load_artifact(path, key)
            result = host.invoke(args.entrypoint, value, timeout=args.timeout)
    finally:
        if launcher is not None:
            launcher.close()
    print(json.dumps(result))
    return 0


def _agent_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    state = args.state or args.bundle / "state"
    return state, args.socket or state / "agent.sock"


def _agent_run(args: argparse.Namespace) -> int:
    read_bundle_info(args.bundle)  # a clear error for a wrong path before anything starts
    parse_broker_url(args.broker)
    state, _socket = _agent_paths(args)
    # One agent per bundle, whatever its --state: refused before anything starts. The lock's
    # descriptor outlives the separation (the bundle becomes root's, this process the agent's
    # user), which as root also makes the state directory (never through a link).
    with AgentLock.acquire(args.bundle, state) as lock:
        if os.geteuid() != 0:
            make_private_dir(state)
        launcher = None
        try:
            launcher = _separation(args, state)
            make_private_dir(state)
            lock.record_pid(state)
            _serve(args, launcher)
        finally:
            if launcher is not None:
                launcher.close()
    return 0


def _serve(args: argparse.Namespace, launcher: Launcher | None) -> None:
    host, port = parse_broker_url(args.broker)
    image = args.image or args.bundle / "enclave.img"
    artifacts_dir = args.artifacts or args.bundle / "artifacts"
    artifacts = tuple(sorted(artifacts_dir.glob("*.sra"))) if artifacts_dir.is_dir() else ()
    state, socket_path = _agent_paths(args)
    config = AgentConfig(
        bundle=args.bundle,
        broker_host=host,
        broker_port=port,
        image=image,
        artifacts=artifacts,
        state_dir=state,
        socket=socket_path,
        production=not args.dev,
        attest_interval_s=args.interval,
        mqtt_protocol=mqtt_protocol(args.mqtt),
        separation_required=not args.no_privilege_separation,
    )
    daemon = AgentDaemon(config, launcher)
    stop = stop_event()
    identity = daemon.mqtt.identity
    log.info(
        "agent_starting",
        device=daemon.device_id,
        broker=daemon.mqtt.where,
        mqtt=args.mqtt,
        certificate=identity.subject if identity else None,
        certificate_expires=identity.not_after.isoformat() if identity else None,
        socket=str(socket_path),
        state=str(state),
        image=str(image),
        artifacts=len(artifacts),
        privilege_separation=launcher is not None,
        pid=os.getpid(),
    )
    daemon.run(stop)


def _agent_invoke(args: argparse.Namespace) -> int:
    value = _json_input(args.input)
    _state, socket_path = _agent_paths(args)
    print(json.dumps(call(socket_path, args.entrypoint, value, timeout=args.timeout)))
    return 0


def _add_separation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-privilege-separation",
        action="store_true",
        help="run the platform and the enclave as the agent's own user, whose other processes "
        "can then read the platform's secrets and trace the enclave (without this, an agent "
        "started as root runs them under users of their own, and one started as any other "
        "user refuses production images)",
    )
    for role, default in (
        ("agent", DeviceUsers.agent),
        ("platform", DeviceUsers.platform),
        ("enclave", DeviceUsers.enclave),
    ):
        p.add_argument(
            f"--{role}-user",
            default=default,
            metavar="NAME",
            help=f"as root: the {role}'s system user, created if missing (default: {default})",
        )


def register(groups: dict[str, Any], dev_keys: DevKeySource | None = None) -> None:
    """Add `agent run|invoke` and `enclave run`; `dev_keys` serves `--dev-keys-from`."""
    agent = groups["agent"]
    p = agent.add_parser("run", help="run the agent daemon (foreground; fit for systemd)")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--broker", required=True, metavar="URL", help="mqtts://HOST:PORT")
    p.add_argument("--image", type=Path, help="enclave image (default: BUNDLE/enclave.img)")
    p.add_argument("--artifacts", type=Path, help="directory of *.sra (default: BUNDLE/artifacts)")
    p.add_argument("--state", type=Path, help="host state directory (default: BUNDLE/state)")
    p.add_argument("--socket", type=Path, help="local API socket (default: STATE/agent.sock)")
    p.add_argument(
        "--interval", type=interval_s, default=300.0, help="seconds between attestations"
    )
    p.add_argument("--dev", action="store_true", help="development mode: allow debug images")
    _add_separation_options(p)
    add_mqtt_version(p)
    p.set_defaults(handler=_agent_run, daemon=True)

    p = agent.add_parser("invoke", help="call protected code through the running agent")
    p.add_argument("entrypoint", metavar="MODULE:FUNCTION")
    p.add_argument("input", metavar="INPUT_JSON")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--state", type=Path)
    p.add_argument("--socket", type=Path)
    p.add_argument("--timeout", type=timeout_s, default=60.0, metavar="S")
    p.set_defaults(handler=_agent_invoke)

    enclave = groups["enclave"]
    p = enclave.add_parser(
        "run", help="launch an enclave, load artifacts and invoke protected code once"
    )
    p.add_argument("entrypoint", metavar="MODULE:FUNCTION")
    p.add_argument("input", metavar="INPUT_JSON")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--state", type=Path, required=True, help="host state directory (sealed keys)")
    p.add_argument("--artifact", type=Path, action="append", default=[], metavar="ARTIFACT")
    p.add_argument("--timeout", type=timeout_s, default=10.0, metavar="S")
    p.add_argument("--dev", action="store_true", help="development mode: allow debug images")
    p.add_argument(
        "--dev-keys-from",
        type=Path,
        metavar="HOME",
        help="development only: wrap keys from this fleet home (debug enclaves only)",
    )
    _add_separation_options(p)
    p.set_defaults(handler=_enclave_run, dev_key_source=dev_keys)
