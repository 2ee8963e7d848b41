"""`artifact seal` and `artifact inspect`: encrypt a code or model artifact under a fresh data key,
put the key in the keystore with its release policy, and register the artifact in the policy."""

from __future__ import annotations

import hashlib
import io
import secrets
from pathlib import Path
from typing import Any

from provisioning.build import collect_tree
from provisioning.home import FleetHome
from provisioning.keystore import KeyEntry, Keystore, ReleasePolicy
from provisioning.policy_file import add_artifact_reference
from strongroom import artifact
from strongroom.errors import EnvironmentFault, FormatError, InputError, TruncatedError
from strongroom.fields import check_artifact_name, check_version, parse_firmware
from strongroom.fsutil import PUBLIC_FILE, atomic_writer, ensure_absent
from strongroom.image import canonical_content
from strongroom.policy import ArtifactReference
from strongroom.signing import VerifyKey


def seal_artifact(
    home: FleetHome,
    src: Path,
    out: Path,
    *,
    name: str,
    version: int,
    kind: artifact.Kind,
    min_svn: int = 1,
    min_firmware: str = "0.0.0",
    measurements: tuple[str, ...] = (),
    chunk_size: int = artifact.DEFAULT_CHUNK_SIZE,
) -> artifact.SignedManifest:
    """Seal `src` into `out`. The artifact appears only once its key and policy entry exist.

    A directory (code only) is sealed as a package tree in the enclave image's canonical format.
    """
    check_artifact_name(name)
    check_version(version)
    parse_firmware(min_firmware)
    if kind not in artifact.KINDS:
        raise InputError(f"invalid kind {kind!r}", hint="use 'code' or 'model'")
    for measurement in measurements:
        if len(measurement) != 64 or any(c not in "0123456789abcdef" for c in measurement):
            raise InputError(
                f"invalid measurement {measurement!r}", hint="use 64 lowercase hex digits"
            )
    if src.is_dir():
        if kind != "code":
            raise InputError(
                f"{src} is a directory", hint="only code can be sealed from a directory"
            )
        tree: io.BufferedIOBase | None = io.BytesIO(canonical_content(collect_tree(src)))
    elif src.is_file():
        tree = None
    else:
        raise InputError(f"file to seal not found: {src}", hint="check the path")
    ensure_absent(out, "artifact")
    keystore = Keystore(home.keystore_dir)
    signing_key = home.signing_key("artifact")
    enclave_signer = home.verify_key("enclave").fingerprint
    key_id = secrets.token_hex(16)
    data_key = bytearray(secrets.token_bytes(artifact.DATA_KEY_SIZE))
    stored = False
    try:
        with tree or src.open("rb") as f_in, atomic_writer(out, PUBLIC_FILE) as f_out:
            signed = artifact.seal_stream(
                f_in,
                f_out,
                name=name,
                version=version,
                kind=kind,
                data_key=data_key,
                key_id=key_id,
                signing_key=signing_key,
                chunk_size=chunk_size,
                min_svn=min_svn,
            )
            m = signed.manifest
            entry = KeyEntry(
                key_id,
                name,
                version,
                kind,
                m.sha256,
                ReleasePolicy((enclave_signer,), measurements, min_svn, min_firmware),
            )
            keystore.put(entry, data_key)
            stored = True
            add_artifact_reference(
                home.policy_path, ArtifactReference(name, version, m.sha256, kind)
            )
    except OSError as e:
        if stored:
            keystore.delete(key_id)
        raise EnvironmentFault(f"cannot seal {src} into {out}: {e.strerror}") from e
    except BaseException:
        if stored:
            keystore.delete(key_id)
        raise
    finally:
        data_key[:] = bytes(len(data_key))
    return signed


def inspect_artifact(path: Path, trusted: VerifyKey | None = None) -> dict[str, Any]:
    """The signed manifest of an artifact and what could be checked without its key."""
    try:
        with path.open("rb") as f:
            signed = artifact.read_manifest(f)
            body_start = f.tell()
            f.seek(0, 2)
            body_size = f.tell() - body_start
    except FileNotFoundError as e:
        raise InputError(f"artifact not found: {path}", hint="check the path") from e
    except IsADirectoryError as e:
        raise InputError(f"artifact is a directory, not a file: {path}") from e
    except PermissionError as e:
        raise InputError(f"artifact is not readable: {path}", hint="check its permissions") from e
    m = signed.manifest
    m.signer_key.verify(artifact.MANIFEST_DOMAIN, signed.header, signed.signature)
    if trusted is not None:
        signed.verify(trusted)
    expected_body = m.size + m.chunk_count * artifact.TAG_SIZE
    if body_size < expected_body:
        raise TruncatedError(f"artifact body has {body_size} bytes, expected {expected_body}")
    if body_size > expected_body:
        raise FormatError(f"artifact has {body_size - expected_body} bytes after its final chunk")
    return {
        "manifest": m.to_json_dict(),
        "manifest_sha256": hashlib.sha256(signed.header).hexdigest(),
        "signature": "valid",
        "signer": m.signer,
        "signer_trusted": None if trusted is None else True,
    }
