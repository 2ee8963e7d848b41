"""The host: the untrusted part of the agent. It starts the platform, hands it the image, relays
artifacts, wrapped keys and sealed blobs to the enclave, stores sealed blobs, and asks for
`invoke`. It never holds platform secrets, data keys or plaintext.

It starts the platform through a `Launcher`: itself, under its own user (`DirectLauncher`), or
through the privileged launcher that runs the platform and the enclave under users of their own
(`SeparatedLauncher`, set up by `agent.privsep`). Production images run only in the second case,
unless the configuration accepts the first (`separation_required=False`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.channel import (
    PIECE_SIZE,
    Channel,
    ChannelClosed,
    ChannelError,
    Message,
    Schema,
    check,
)
from agent.errors import (
    BundleError,
    EnclaveCrashedError,
    EnclaveError,
    InvokeError,
    LaunchError,
    LocalAttestationError,
)
from agent.launcher import ChildProcess, DirectLauncher, Launcher, SeparationError
from strongroom import artifact, bundle, canonical
from strongroom.errors import StrongroomError
from strongroom.fsutil import SECRET_FILE, make_private_dir, read_file, write_atomic
from strongroom.image import MAX_CONTENT_SIZE, load_image
from strongroom.report import Report

log = structlog.get_logger()
INVOKE_GRACE_S = 5.0


@dataclass(frozen=True)
class HostConfig:
    bundle: Path
    state_dir: Path
    production: bool = True
    start_timeout_s: float = 30.0
    invoke_timeout_s: float = 10.0
    # production images need the platform and enclave under users of their own; False accepts the
    # agent's own user (--no-privilege-separation: its other processes can then read the
    # platform's secrets and trace the enclave before it hardens itself)
    separation_required: bool = True


@dataclass(frozen=True)
class WrappedKey:
    """A data key wrapped to this enclave instance, and the binding it was wrapped with."""

    wrapped: bytes
    aad: bytes


@dataclass(frozen=True)
class EnclaveInfo:
    pid: int
    report: Report
    public_key: bytes
    hardening: tuple[str, ...]


def read_bundle_info(bundle_dir: Path) -> bundle.BundleInfo:
    if not (bundle_dir / bundle.BUNDLE_FILE).is_file():
        raise BundleError(f"{bundle_dir} is not a device bundle")
    try:
        doc = read_file(bundle_dir / bundle.BUNDLE_FILE, "bundle")
        return bundle.BundleInfo.from_json_dict(canonical.loads_object(doc, "bundle"))
    except StrongroomError as e:
        raise BundleError(f"{bundle_dir}: {e}") from e


class EnclaveHost:
    def __init__(self, config: HostConfig, launcher: Launcher | None = None) -> None:
        self.config = config
        self.info = read_bundle_info(config.bundle)
        self.launcher: Launcher = launcher or DirectLauncher(config.bundle)
        self._platform_proc: ChildProcess | None = None
        self._platform: Channel | None = None
        self._enclave: Channel | None = None
        self.enclave: EnclaveInfo | None = None

    # -- start-up ------------------------------------------------------------------------------

    def start(self, image_path: Path) -> EnclaveInfo:
        image = read_file(image_path, "enclave image", limit=MAX_CONTENT_SIZE + 8192)
        try:
            verified = load_image(image)  # early, friendly refusal; the platform checks again
        except StrongroomError as e:
            raise LaunchError(f"enclave image refused: {e}") from e
        if verified.sigstruct.debug and self.config.production:
            raise LaunchError(
                "debug enclave image refused by the production configuration",
                hint="build the image without --debug (debug images are for development only)",
            )
        if (
            not verified.sigstruct.debug
            and self.config.separation_required
            and not self.launcher.separated
        ):
            raise SeparationError(
                "production enclave image refused: without privilege separation the platform and "
                "the enclave would run as the agent's own user, whose other processes could read "
                "the platform's secrets and trace the enclave"
            )
        host_platform, platform_end = socket.socketpair()
        host_enclave, enclave_end = socket.socketpair()
        try:
            self._platform_proc = self.launcher.start_platform(
                platform_end.fileno(), enclave_end.fileno()
            )
        except BaseException:
            host_platform.close()
            host_enclave.close()
            raise
        finally:
            platform_end.close()
            enclave_end.close()
        self._platform, self._enclave = Channel(host_platform), Channel(host_enclave)
        try:
            self._platform.send({"op": "launch", "size": len(image)})
            for start in range(0, len(image), PIECE_SIZE):
                self._platform.send({"op": "piece", "data": image[start : start + PIECE_SIZE]})
            launched = self._platform.recv(timeout=self.config.start_timeout_s)
            if launched["op"] != "launched":
                raise LaunchError(f"platform refused the image: {launched.get('reason')}")
            ready = self._enclave.recv(timeout=self.config.start_timeout_s)
        except (ChannelError, ChannelClosed) as e:
            self.stop()
            raise EnclaveCrashedError(f"enclave did not start: {e}") from e
        except LaunchError:
            self.stop()
            raise
        if ready["op"] == "refused":
            self.stop()
            raise LocalAttestationError(f"enclave refused the platform: {ready.get('reason')}")
        check(ready, {"public_key": bytes, "report": bytes, "hardening": str})
        self.enclave = EnclaveInfo(
            pid=int(launched["pid"]),
            report=Report.from_body(ready["report"]),
            public_key=ready["public_key"],
            hardening=tuple(h for h in ready["hardening"].split(",") if h),
        )
        if "memory_locked" not in self.enclave.hardening:
            log.warning("enclave_memory_not_locked", reason="RLIMIT_MEMLOCK is limited")
        log.info(
            "enclave_ready",
            mrenclave=self.enclave.report.identity.mrenclave,
            svn=self.enclave.report.identity.svn,
        )
        return self.enclave

    # -- requests ------------------------------------------------------------------------------

    def _request(
        self,
        msg: Message,
        timeout: float,
        expect: str,
        fields: Schema,
        optional: Schema | None = None,
    ) -> Message:
        """Send a request; return the enclave's reply, which must be `expect` with `fields`."""
        if self._enclave is None:
            raise EnclaveError("the enclave is not running")
        try:
            self._enclave.send(msg)
            return self._reply(timeout, expect, fields, optional)
        except ChannelClosed as e:
            self.stop()
            raise EnclaveCrashedError(f"enclave stopped answering: {e}") from e

    def _reply(
        self, timeout: float, expect: str, fields: Schema, optional: Schema | None = None
    ) -> Message:
        assert self._enclave is not None  # noqa: S101 - callers checked it
        try:
            reply = self._enclave.recv(timeout=timeout)
            if reply["op"] == "error":
                raise EnclaveError(str(reply.get("reason", "enclave refused"))[:500])
            if reply["op"] != expect:
                raise ChannelError(f"expected {expect!r}, got {reply['op'][:40]!r}")
            return check(reply, fields, optional)
        except ChannelClosed:
            raise
        except ChannelError as e:
            raise EnclaveError(f"the enclave sent a malformed reply: {e}") from e

    def _sealed_path(self, name: str) -> Path:
        return self.config.state_dir / "sealed" / f"{name}.blob"

    def load_artifact(self, path: Path, key: WrappedKey | None = None) -> Message:
        """Load an artifact into the enclave with a wrapped key, or from its sealed blob."""
        try:
            with path.open("rb") as f:
                signed = artifact.read_manifest(f)
                header_end = f.tell()
                f.seek(0)
                header = f.read(header_end)
                body_size = os.fstat(f.fileno()).st_size - header_end
        except OSError as e:
            raise BundleError(f"cannot read artifact {path}: {e.strerror}") from e
        name = signed.manifest.name
        msg: Message = {"op": "load", "header": header, "body_size": body_size}
        if key is not None:
            msg.update(wrapped_key=key.wrapped, key_aad=key.aad)
        elif self._sealed_path(name).is_file():
            msg["sealed"] = read_file(self._sealed_path(name), "sealed blob", limit=4096)
        timeout = self.config.start_timeout_s
        self._request(msg, timeout, "send_body", {})  # or an error with the reason
        assert self._enclave is not None  # noqa: S101 - _request checked it
        try:
            with path.open("rb") as f:  # the enclave reads the ciphertext from it directly
                self._enclave.send_fd({"op": "body_fd", "offset": header_end}, f.fileno())
            reply = self._reply(
                timeout, "loaded", {"name": str, "version": int, "sha256": str}, {"sealed": bytes}
            )
        except ChannelClosed as e:
            self.stop()
            raise EnclaveCrashedError(f"enclave stopped answering: {e}") from e
        except OSError as e:
            raise BundleError(f"cannot read artifact {path}: {e.strerror}") from e
        if isinstance(reply.get("sealed"), bytes):
            make_private_dir(self._sealed_path(name).parent)
            write_atomic(self._sealed_path(name), reply.pop("sealed"), SECRET_FILE)
        log.info("artifact_loaded", artifact=name, version=reply.get("version"))
        return reply

    def invoke(self, entrypoint: str, value: Any, timeout: float | None = None) -> Any:
        """Run protected code in the enclave and return its JSON result."""
        timeout = timeout or self.config.invoke_timeout_s
        try:
            reply = self._request(
                {
                    "op": "invoke",
                    "entrypoint": entrypoint,
                    "input": value,
                    "timeout": float(timeout),
                },
                timeout + INVOKE_GRACE_S,
                "result",
                {"json": str},
            )
            return json.loads(reply["json"])
        except EnclaveCrashedError:
            raise
        except EnclaveError as e:
            raise InvokeError(str(e)) from e
        except ValueError as e:
            raise InvokeError("the enclave sent a result that is not JSON") from e

    def evidence(self, nonce: bytes) -> bytes:
        """Signed evidence (EAT) from the enclave's platform, bound to `nonce`."""
        reply = self._request({"op": "evidence", "nonce": nonce}, 30, "evidence", {"token": bytes})
        return bytes(reply["token"])

    def revoke(self, command: bytes) -> str:
        """Relay a signed revoke command; on success remove every sealed blob (the enclave has
        already wiped its memory) and return the reason."""
        reply = self._request({"op": "revoke", "command": command}, 30, "revoked", {"reason": str})
        sealed = self.config.state_dir / "sealed"
        if sealed.is_dir():
            for blob in sealed.glob("*.blob"):
                blob.unlink(missing_ok=True)
        return str(reply.get("reason", ""))

    def status(self) -> Message:
        return self._request({"op": "status"}, 10, "status", {"loaded": list})

    def stop(self) -> None:
        """Ask the enclave to wipe itself and stop the platform (and with it the enclave)."""
        if self._enclave is not None:
            if self.enclave is not None:  # it is up: let it wipe itself before it stops
                with contextlib.suppress(ChannelError):
                    self._enclave.request({"op": "shutdown"}, timeout=5)
            self._enclave.close()
            self._enclave = None
        if self._platform is not None:
            with contextlib.suppress(ChannelError):
                self._platform.send({"op": "shutdown"})
            self._platform.close()
            self._platform = None
        if self._platform_proc is not None:
            self._platform_proc.stop(5.0)
        self._platform_proc = None

    def __enter__(self) -> EnclaveHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def manifest_of(path: Path) -> artifact.ArtifactManifest:
    """The (unverified) manifest of an artifact file; the enclave verifies it."""
    try:
        with path.open("rb") as f:
            return artifact.read_manifest(f).manifest
    except OSError as e:
        raise BundleError(f"cannot read artifact {path}: {e.strerror}") from e
