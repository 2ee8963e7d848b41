"""Top-level commands `strongroom status` and `strongroom dashboard`.

Both read the fleet as a read-only consumer (a dashboard identity of the fleet home; each process
that is connected at the same time needs its own, hence `--instance`). The web stack (Starlette,
uvicorn) and rich are imported only by the command that needs them.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path
from typing import Any

import structlog

from provisioning.broker import DEFAULT_PORT
from provisioning.home import (
    MAX_DASHBOARD_INSTANCES,
    FleetHome,
    ensure_operator_token,
    open_home,
    read_operator_token,
)
from strongroom.cliargs import int_range, port, settle_s
from strongroom.errors import EnvironmentFault
from strongroom.mqtt import add_mqtt_version, mqtt_protocol
from strongroom.signals import stop_event
from verifier.dashboard.feed import FeedConfig, FleetFeed
from verifier.dashboard.live import LiveView
from verifier.dashboard.queries import snapshot
from verifier.dashboard.view import FleetView

log = structlog.get_logger()
DEFAULT_DASHBOARD_PORT = 8080
DASHBOARD_INSTANCE, STATUS_INSTANCE = 1, 2  # `_dashboard` itself is left to other consumers
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def _feed(args: argparse.Namespace, home: FleetHome) -> tuple[LiveView, FleetFeed]:
    live = LiveView(FleetView(home.result_verify_key()))
    config = FeedConfig(
        home=home,
        broker=args.broker,
        instance=args.instance,
        protocol=mqtt_protocol(args.mqtt),
    )
    return live, FleetFeed(config, live)


def _document(live: LiveView) -> dict[str, Any]:
    now = live.clock()
    doc = live.use(lambda v: snapshot(v, now))
    doc["summary"]["connected"] = live.connected
    return doc


def _status(args: argparse.Namespace) -> int:
    from rich.console import Console  # noqa: PLC0415 - only this command draws tables
    from rich.live import Live  # noqa: PLC0415

    from verifier.dashboard.terminal import render  # noqa: PLC0415 - imports rich

    home = open_home(args.home)
    live, feed = _feed(args, home)
    if args.watch:
        log.info(
            "status_watching",
            fleet=home.fleet_id,
            broker=feed.mqtt.where,
            identity=feed.mqtt.settings.client_id,
        )
    stop = stop_event() if args.watch else None
    try:
        if not feed.collect(args.settle, until=stop.is_set if stop else None):
            return 0  # interrupted before the broker was reached
        if stop is None:
            if args.json:
                print(json.dumps(_document(live), indent=2, sort_keys=True))
            else:
                Console().print(render(_document(live)))
            return 0
        if args.json:  # one document per line whenever something changed
            seen = -1
            while not stop.is_set():
                if live.version != seen:
                    seen = live.version
                    print(json.dumps(_document(live), sort_keys=True), flush=True)
                feed.step(0.5)
            return 0
        console = Console()
        rows = max(5, console.size.height - 8)
        with Live(render(_document(live), max_rows=rows), console=console, screen=False) as screen:
            next_draw = 0.0
            while not stop.is_set():
                feed.step(0.2)
                if time.monotonic() >= next_draw:  # ages move on even when nothing arrives
                    screen.update(render(_document(live), max_rows=rows))
                    next_draw = time.monotonic() + 1.0
        return 0
    finally:
        feed.stop()


def _listen(bind: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port is a clear error."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bind.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise EnvironmentFault(
            f"cannot listen on {bind}:{port}: {e.strerror}",
            hint="choose another --port, or stop what uses this one",
        ) from e
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _dashboard(args: argparse.Namespace) -> int:
    import uvicorn  # noqa: PLC0415 - the web stack, only for this command

    from verifier.dashboard.web import WebConfig, create_app  # noqa: PLC0415 - imports starlette

    home = open_home(args.home)
    if ensure_operator_token(home):
        print(f"created the operator token in {home.operator_token_path} (readable by you only)")
    token = read_operator_token(home)
    sock = _listen(args.bind, args.port)
    port = int(sock.getsockname()[1])
    host = f"[{args.bind.strip('[]')}]" if ":" in args.bind else args.bind
    hosts = tuple(dict.fromkeys((*LOOPBACK_NAMES, args.bind, *args.allow_host)))
    live, feed = _feed(args, home)
    app = create_app(live, WebConfig(home=home, token=token, allowed_hosts=hosts))
    stop = stop_event()  # uvicorn re-raises the signal that stopped it: let it land here
    feed.start()
    url = f"http://{host}:{port}/"
    print(f"dashboard: {url}", flush=True)
    print(f"operator token: {home.operator_token_path}", flush=True)
    log.info(
        "dashboard_started",
        url=url,
        fleet=home.fleet_id,
        broker=feed.mqtt.where,
        identity=feed.mqtt.settings.client_id,
        allowed_hosts=list(hosts),
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
            server_header=False,
        )
    )
    try:
        server.run(sockets=[sock])
    finally:
        feed.stop()
        sock.close()
        log.info("dashboard_stopped", signalled=stop.is_set())
    return 0


def _watching(args: argparse.Namespace) -> bool:
    """`status --watch` runs until interrupted, as a daemon does; `status` alone is one-shot."""
    return bool(args.watch)


def _common(p: argparse.ArgumentParser, instance: int) -> None:
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--broker", default=f"mqtts://localhost:{DEFAULT_PORT}", metavar="URL")
    p.add_argument(
        "--instance",
        type=int_range(0, MAX_DASHBOARD_INSTANCES),
        default=instance,
        help=f"dashboard identity 0-{MAX_DASHBOARD_INSTANCES} (connected consumers need "
        f"different ones; default {instance})",
    )
    add_mqtt_version(p)


def register(roles: Any) -> None:
    """Add `status` and `dashboard` to the top-level subcommands."""
    p = roles.add_parser("status", help="the fleet's trust status, from its signed results")
    _common(p, STATUS_INSTANCE)
    p.add_argument("--json", action="store_true", help="JSON for scripts (JSON lines with --watch)")
    p.add_argument("--watch", action="store_true", help="keep refreshing until interrupted")
    p.add_argument(
        "--settle",
        type=settle_s,
        default=3.0,
        metavar="S",
        help="collect retained messages for at most S seconds before the first output",
    )
    p.set_defaults(handler=_status, daemon=_watching)

    p = roles.add_parser("dashboard", help="the fleet dashboard in a web browser")
    _common(p, DASHBOARD_INSTANCE)
    p.add_argument("--port", type=port, default=DEFAULT_DASHBOARD_PORT)
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another Host name the page may be reached by (e.g. behind a proxy)",
    )
    p.set_defaults(handler=_dashboard, daemon=True)
