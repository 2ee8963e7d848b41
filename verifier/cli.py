"""Fleet-side daemons: `broker run` and `verifier run`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import structlog

from provisioning.broker import DEFAULT_PORT, broker_user, find_mosquitto, write_broker_config
from provisioning.home import MAX_VERIFIER_INSTANCES, FleetHome, open_home
from strongroom.cliargs import challenge_interval_s, int_range, port
from strongroom.errors import IntegrityError
from strongroom.mqtt import (
    MqttClient,
    MqttSettings,
    add_mqtt_version,
    mqtt_protocol,
    parse_broker_url,
)
from strongroom.signals import stop_event
from verifier.audit import AuditLog, verify
from verifier.operator import ACTIVE, REVOKED, audit_path, request_reattestation, set_status
from verifier.service import Verifier, VerifierConfig, verifier_db_path
from verifier.store import StateStore
from verifier.store_postgres import PostgresStore, is_postgres_url, postgres_location
from verifier.store_sqlite import SqliteStore

log = structlog.get_logger()


def _broker_run(args: argparse.Namespace) -> int:
    home = open_home(args.home)
    if args.embedded:
        from provisioning.embedded_broker import run_embedded  # noqa: PLC0415 - optional extra

        log.info(
            "embedded_broker_starting",
            fleet=home.fleet_id,
            listener=f"{args.bind}:{args.port}",
            mqtt="3.1.1",
            tls="fleet CA, client certificates required",
        )
        run_embedded(home, args.port, args.bind)
        return 0
    from provisioning.broker_supervisor import run_broker  # noqa: PLC0415 - this command only

    find_mosquitto()  # a clear error before anything is written
    files = write_broker_config(
        home, port=args.port, bind=args.bind, state_dir=args.state_dir, user=broker_user(args.user)
    )
    log.info(
        "broker_starting",
        fleet=home.fleet_id,
        listener=f"{args.bind}:{args.port}",
        config=str(files.config),
        crl=str(home.crl_path),
        state=str(files.state_dir),
        user=files.user.name,
    )
    return run_broker(home, files)


def _verifier_run(args: argparse.Namespace) -> int:
    home = open_home(args.home)
    host, port = parse_broker_url(args.broker)
    cn, cert, key = home.verifier_identity(args.instance)
    mqtt = MqttClient(
        MqttSettings(
            host=host,
            port=port,
            ca=home.ca_cert,
            cert=cert,
            key=key,
            client_id=cn,
            protocol=mqtt_protocol(args.mqtt),
            manual_ack=True,  # acknowledged once what the verifier decided is committed
        ),
        driven=True,  # its own loop does the network work: no second thread, no GIL hand-offs
    )
    store: StateStore
    if args.db and is_postgres_url(args.db):
        store = PostgresStore(args.db, args.db_schema)
    else:
        store = SqliteStore(Path(args.db) if args.db else verifier_db_path(home))
    verifier = Verifier(
        VerifierConfig(home=home, shared=args.shared, challenge_interval_s=args.challenge_interval),
        store,
        mqtt,
    )
    stop = stop_event()
    metrics = None
    if args.metrics_port is not None:
        verifier.metrics.serve(args.metrics_port, args.metrics_bind)
        metrics = f"http://{args.metrics_bind}:{args.metrics_port}/metrics"
        log.info("metrics_serving", url=metrics)
    mqtt.start()
    log.info(
        "verifier_started",
        fleet=home.fleet_id,
        broker=mqtt.where,
        identity=cn,
        store=_store_name(args, home),
        shared=args.shared,
        metrics=metrics,
        devices=len(verifier.devices),
    )
    try:
        verifier.run(stop.is_set)
    finally:
        mqtt.stop()
        store.close()
        log.info("verifier_stopped", **verifier.counts)
    return 0


def _store_name(args: argparse.Namespace, home: FleetHome) -> str:
    """Where the state store is, without a PostgreSQL URL's password."""
    if args.db and is_postgres_url(args.db):
        return f"{postgres_location(args.db)} (schema {args.db_schema})"
    return str(Path(args.db) if args.db else verifier_db_path(home))


def _audit_verify(args: argparse.Namespace) -> int:
    home = open_home(args.home)
    log_ = AuditLog(audit_path(home))
    count, broken = verify(log_.lines(), home.result_verify_key())
    if broken is not None:
        raise IntegrityError(
            f"audit log broken at entry {broken.line}: {broken.reason} ({count} entries before it "
            "are intact)",
            hint="the log was edited, cut or reordered; keep this copy as evidence",
        )
    print(json.dumps({"entries": count, "intact": True}))
    return 0


def _audit_show(args: argparse.Namespace) -> int:
    home = open_home(args.home)
    for entry in AuditLog(audit_path(home)).entries():
        if args.device and entry.get("device") != args.device:
            continue
        print(json.dumps({k: entry[k] for k in ("seq", "at", "event", "device", "detail")}))
    return 0


def _device_revoke(args: argparse.Namespace) -> int:
    outcome = set_status(
        open_home(args.home), args.device_id, REVOKED, reason=args.reason, by="operator"
    )
    print(json.dumps(outcome.to_json_dict()))
    return 0


def _device_reinstate(args: argparse.Namespace) -> int:
    outcome = set_status(open_home(args.home), args.device_id, ACTIVE, reason="", by="operator")
    print(json.dumps(outcome.to_json_dict()))
    return 0


def _device_reattest(args: argparse.Namespace) -> int:
    outcome = request_reattestation(open_home(args.home), args.device_id, by="operator")
    print(json.dumps(outcome.to_json_dict()))
    return 0


def register(groups: dict[str, Any]) -> None:
    p = groups["device"].add_parser(
        "revoke", help="revoke a device: no more keys; its enclave is told to wipe itself"
    )
    p.add_argument("device_id", metavar="DEVICE_ID")
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--reason", required=True, metavar="TEXT")
    p.set_defaults(handler=_device_revoke)
    p = groups["device"].add_parser(
        "reinstate", help="reinstate a revoked device (it must attest afresh for keys)"
    )
    p.add_argument("device_id", metavar="DEVICE_ID")
    p.add_argument("--home", type=Path, required=True)
    p.set_defaults(handler=_device_reinstate)
    p = groups["device"].add_parser(
        "reattest", help="ask the verifier to challenge a device now (fresh evidence)"
    )
    p.add_argument("device_id", metavar="DEVICE_ID")
    p.add_argument("--home", type=Path, required=True)
    p.set_defaults(handler=_device_reattest)

    p = groups["audit"].add_parser("verify", help="check the audit log's hash chain")
    p.add_argument("--home", type=Path, required=True)
    p.set_defaults(handler=_audit_verify)
    p = groups["audit"].add_parser("show", help="list audit entries (JSON lines)")
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--device", help="only this device's entries")
    p.set_defaults(handler=_audit_show)

    p = groups["broker"].add_parser("run", help="run Mosquitto with the fleet's TLS and ACL config")
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--port", type=port, default=DEFAULT_PORT)
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on")
    p.add_argument(
        "--user",
        metavar="NAME",
        help="started by root: the unprivileged user Mosquitto runs as (default mosquitto)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="the broker's own files and persistence (default HOME/broker, or "
        "/var/lib/strongroom-broker/FLEET_ID when started by root)",
    )
    p.add_argument(
        "--embedded",
        action="store_true",
        help="in-process MQTT 3.1.1 broker (amqtt) for demos without Mosquitto",
    )
    p.set_defaults(handler=_broker_run, daemon=True)

    p = groups["verifier"].add_parser("run", help="run the fleet verifier and key broker")
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--broker", default=f"mqtts://localhost:{DEFAULT_PORT}", metavar="URL")
    p.add_argument(
        "--db", help="postgresql://... URL, or a SQLite file (default HOME/verifier/state.sqlite)"
    )
    p.add_argument("--db-schema", default="strongroom", help="PostgreSQL schema")
    p.add_argument(
        "--instance",
        type=int_range(0, MAX_VERIFIER_INSTANCES),
        default=0,
        help="this process's MQTT identity: 0 the default, 1-8 more, to run several verifiers",
    )
    p.add_argument("--shared", action="store_true", help="join the $share/verifiers group")
    p.add_argument(
        "--metrics-port", type=port, metavar="P", help="serve Prometheus metrics on this port"
    )
    p.add_argument("--metrics-bind", default="127.0.0.1", help="address for the metrics")
    add_mqtt_version(p)
    p.add_argument("--challenge-interval", type=challenge_interval_s, help=argparse.SUPPRESS)
    p.set_defaults(handler=_verifier_run, daemon=True)
