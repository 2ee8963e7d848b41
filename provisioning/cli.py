"""Provisioning subcommands: `fleet init`, `device enroll`, `enclave source|build`, `artifact
seal|inspect`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import structlog

from agent.enclave_source import write_enclave_source
from provisioning.build import build_enclave
from provisioning.enroll import enroll_device
from provisioning.home import init_home, open_home
from provisioning.seal import inspect_artifact, seal_artifact
from strongroom.artifact import DEFAULT_CHUNK_SIZE, KINDS
from strongroom.cliargs import int_range
from strongroom.fields import MAX_VERSION

log = structlog.get_logger()


def _emit(doc: dict[str, Any]) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True))


def _fleet_init(args: argparse.Namespace) -> int:
    home = init_home(args.home, force=args.force)
    log.info("fleet_created", home=str(home.root), fleet_id=home.fleet_id)
    _emit(
        {
            "home": str(home.root),
            "fleet_id": home.fleet_id,
            "operator_token_file": str(home.operator_token_path),  # the path, never the token
        }
    )
    return 0


def _device_enroll(args: argparse.Namespace) -> int:
    home = open_home(args.home)
    record = enroll_device(
        home,
        args.device_id,
        args.out,
        firmware=args.firmware,
        debug_platform=args.debug_platform,
        secure_boot=not args.no_secure_boot,
        force=args.force,
    )
    log.info("device_enrolled", device=record.device_id, firmware=record.firmware)
    _emit(
        {
            "device_id": record.device_id,
            "bundle": str(args.out.absolute()),
            "attestation_key": record.attestation_key.raw.hex(),
            "firmware": record.firmware,
            "debug_platform": record.debug,
        }
    )
    return 0


def _enclave_source(args: argparse.Namespace) -> int:
    home = open_home(args.home)
    written = write_enclave_source(
        args.out,
        home.verify_key("artifact"),
        home.result_verify_key(),
        min_firmware=args.min_firmware,
        smt=args.smt,
        require_secure_boot=not args.allow_insecure_boot,
        seal_policy=args.seal_policy,
    )
    print(json.dumps({"source": str(args.out.absolute()), "files": written}, indent=2))
    return 0


def _enclave_build(args: argparse.Namespace) -> int:
    home = open_home(args.home)
    sig = build_enclave(
        home, args.src, args.out, svn=args.svn, product_id=args.product_id, debug=args.debug
    )
    log.info("enclave_built", mrenclave=sig.mrenclave, svn=sig.svn, debug=sig.debug)
    _emit(
        {
            "image": str(args.out.absolute()),
            "mrenclave": sig.mrenclave,
            "mrsigner": sig.mrsigner,
            "svn": sig.svn,
            "product_id": sig.product_id,
            "debug": sig.debug,
        }
    )
    return 0


def _artifact_seal(args: argparse.Namespace) -> int:
    home = open_home(args.home)
    signed = seal_artifact(
        home,
        args.file,
        args.out,
        name=args.name,
        version=args.version,
        kind=args.kind,
        min_svn=args.min_svn,
        min_firmware=args.min_firmware,
        measurements=tuple(args.measurement),
        chunk_size=args.chunk_size,
    )
    m = signed.manifest
    log.info("artifact_sealed", artifact=m.name, version=m.version, key_id=m.key_id)
    _emit({"artifact": str(args.out.absolute()), **m.to_json_dict()})
    return 0


def _artifact_inspect(args: argparse.Namespace) -> int:
    trusted = open_home(args.home).verify_key("artifact") if args.home else None
    _emit(inspect_artifact(args.artifact, trusted))
    return 0


def _home_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--home", type=Path, required=required, help="fleet home directory")


def register(groups: dict[str, Any]) -> None:
    fleet, device, enclave, art = (groups[g] for g in ("fleet", "device", "enclave", "artifact"))
    p = fleet.add_parser("init", help="create a fleet home directory")
    p.add_argument("home", type=Path, metavar="HOME")
    p.add_argument("--force", action="store_true", help="replace an existing fleet home")
    p.set_defaults(handler=_fleet_init)

    p = device.add_parser("enroll", help="enroll a device and write its bundle")
    p.add_argument("device_id", metavar="DEVICE_ID")
    _home_arg(p)
    p.add_argument("--out", type=Path, required=True, metavar="BUNDLE", help="bundle directory")
    p.add_argument("--firmware", default="1.0.0", metavar="X.Y.Z")
    p.add_argument(
        "--debug-platform", action="store_true", help="simulate a platform in debug mode"
    )
    p.add_argument("--no-secure-boot", action="store_true", help="simulate secure boot off")
    p.add_argument("--force", action="store_true", help="re-enroll an enrolled device")
    p.set_defaults(handler=_device_enroll)

    p = enclave.add_parser("source", help="write the standard enclave source tree for `build`")
    p.add_argument("out", type=Path, metavar="OUT_DIR")
    p.add_argument("--home", type=Path, required=True, help="fleet home (for its artifact signer)")
    p.add_argument("--min-firmware", default="1.0.0", metavar="X.Y.Z")
    p.add_argument("--smt", default="allow", choices=["allow", "deny"])
    p.add_argument("--allow-insecure-boot", action="store_true")
    p.add_argument("--seal-policy", default="signer", choices=["signer", "measurement"])
    p.set_defaults(handler=_enclave_source)

    p = enclave.add_parser("build", help="build a signed, reproducible enclave image")
    p.add_argument("src", type=Path, metavar="SRC_DIR")
    _home_arg(p)
    # the range is checked by build_enclave, whose message names the SVN
    p.add_argument("--svn", type=int, required=True, help="security version number")
    p.add_argument("--product-id", type=int_range(0, 65535), default=1)
    p.add_argument("--out", type=Path, required=True, metavar="IMAGE")
    p.add_argument("--debug", action="store_true", help="mark the image as a debug build")
    p.set_defaults(handler=_enclave_build)

    p = art.add_parser("seal", help="encrypt code or a model under a fresh data key")
    p.add_argument("file", type=Path, metavar="FILE")
    _home_arg(p)
    p.add_argument("--name", required=True)
    p.add_argument("--version", type=int_range(1, MAX_VERSION), required=True)
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--out", type=Path, required=True, metavar="ARTIFACT")
    p.add_argument(
        "--min-svn",
        type=int_range(0, MAX_VERSION),
        default=1,
        help="lowest enclave SVN that gets the key",
    )
    p.add_argument("--min-firmware", default="0.0.0", metavar="X.Y.Z")
    p.add_argument(
        "--measurement",
        action="append",
        default=[],
        metavar="MRENCLAVE",
        help="release the key only to this enclave measurement (repeatable)",
    )
    # checked by seal_artifact, whose message names the limits
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help=argparse.SUPPRESS)
    p.set_defaults(handler=_artifact_seal)

    p = art.add_parser("inspect", help="print an artifact's signed manifest (never key material)")
    p.add_argument("artifact", type=Path, metavar="ARTIFACT")
    _home_arg(p, required=False)
    p.set_defaults(handler=_artifact_inspect)
