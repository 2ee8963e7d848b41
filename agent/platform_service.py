"""The simulated platform: the device's root of trust, the only holder of its root secret and
attestation key.

It verifies an enclave image's signature and measures the bytes it actually loads, launches the
enclave process from exactly those bytes, and then answers the enclave's requests over their
private channel: local attestation reports, the enclave's own report key, sealing keys for the
enclave's own identity, and persistent monotonic counters. The `Platform` protocol is the seam a
hardware backend (TPM 2.0, SGX, OP-TEE) replaces.
"""

from __future__ import annotations

import hmac
import socket
import threading
import time
from pathlib import Path
from typing import Protocol

from agent import platform_keys
from agent.channel import PIECE_SIZE, Channel, ChannelClosed, ChannelError, Message, check
from agent.errors import LaunchError, PlatformFault
from agent.launcher import ChildProcess, EnclaveSpawner, spawn_enclave_directly
from strongroom import bundle, canonical, logs
from strongroom.errors import StrongroomError
from strongroom.fsutil import SECRET_FILE, read_file, write_atomic
from strongroom.image import EnclaveIdentity, VerifiedImage, load_image
from strongroom.report import (
    PlatformClaims,
    Report,
    ReportError,
    key_binding,
    mac_report,
    verify_report,
)
from strongroom.signing import SigningKey

log = logs.get_logger()
SMT_PATH = Path("/sys/devices/system/cpu/smt/active")
MAX_COUNTER = 2**63 - 1


class Platform(Protocol):
    """What the host and the enclave need from a root of trust."""

    def claims(self) -> PlatformClaims: ...

    def verify_image(self, image: bytes) -> VerifiedImage: ...


def read_smt_state() -> bool | None:
    try:
        return SMT_PATH.read_text().strip() == "1"
    except OSError:
        return None


class Counters:
    """Monotonic counters persisted in a MAC'd file in the platform directory."""

    def __init__(self, path: Path, key: bytes) -> None:
        self._path, self._key, self._lock = path, key, threading.Lock()

    def _load(self) -> dict[str, int]:
        if not self._path.exists():
            return {}
        doc = canonical.loads_object(read_file(self._path, "platform counters"), "counters")
        values = doc.get("values")
        mac = doc.get("mac")
        if (
            not isinstance(values, dict)
            or not isinstance(mac, str)
            or not hmac.compare_digest(
                hmac.new(self._key, canonical.dumps(values), "sha256").hexdigest(), mac
            )
        ):
            raise PlatformFault("platform counters were tampered with")
        return {str(k): int(v) for k, v in values.items()}

    def read(self, name: str) -> int:
        with self._lock:
            return self._load().get(name, 0)

    def advance(self, name: str, value: int) -> int:
        """Raise the counter to `value` if higher; counters never go back."""
        with self._lock:
            values = self._load()
            current = values.get(name, 0)
            if min(value, MAX_COUNTER) <= current:
                return current  # nothing to move: no write
            values[name] = min(value, MAX_COUNTER)
            mac = hmac.new(self._key, canonical.dumps(values), "sha256").hexdigest()
            write_atomic(self._path, canonical.dumps({"values": values, "mac": mac}), SECRET_FILE)
            return values[name]


class SimulatedPlatform:
    """The platform as loaded from a bundle's `platform/` directory."""

    def __init__(self, bundle_dir: Path) -> None:
        self._load(bundle_dir / bundle.PLATFORM_DIR)

    @classmethod
    def from_platform_dir(cls, platform_dir: Path) -> SimulatedPlatform:
        """The platform from its own directory alone (a separated platform cannot reach the
        rest of the bundle; it gets this directory as a descriptor, `/proc/self/fd/N`)."""
        platform = cls.__new__(cls)
        platform._load(platform_dir)
        return platform

    def _load(self, pdir: Path) -> None:
        def path(name: str) -> Path:
            return pdir / Path(name).relative_to(bundle.PLATFORM_DIR)

        try:
            self._root = read_file(path(bundle.ROOT_SECRET_FILE), "platform root secret")
            profile_doc = read_file(path(bundle.PROFILE_FILE), "platform profile")
            self.profile = bundle.PlatformProfile.from_json_dict(
                canonical.loads_object(profile_doc, "platform profile")
            )
            self._attestation_key = SigningKey.from_pem(
                read_file(path(bundle.ATTESTATION_KEY_FILE), "attestation key")
            )
        except StrongroomError as e:
            raise PlatformFault(f"cannot load the platform: {e}") from e
        if len(self._root) != bundle.ROOT_SECRET_SIZE:
            raise PlatformFault("platform root secret has the wrong size")
        self.counters = Counters(pdir / "counters.json", platform_keys.counters_key(self._root))

    def claims(self) -> PlatformClaims:
        smt = self.profile.smt if self.profile.smt is not None else read_smt_state()
        return PlatformClaims(
            self.profile.firmware, self.profile.debug, self.profile.secure_boot, smt
        )

    def verify_image(self, image: bytes) -> VerifiedImage:
        try:
            return load_image(image)
        except StrongroomError as e:
            raise LaunchError(f"enclave image refused: {e}") from e

    def handle(  # noqa: PLR0911 - one return per request kind reads best
        self, identity: EnclaveIdentity, msg: Message
    ) -> Message:
        """Answer one request of the enclave whose identity is `identity`."""
        op = msg["op"]
        if op == "report":
            check(msg, {"report_data": bytes})
            if len(msg["report_data"]) != 64:
                raise ChannelError("report data must be 64 bytes")
            body = Report(identity, self.claims(), msg["report_data"]).body()
            key = platform_keys.report_key(self._root, identity.mrenclave)
            return {"op": "report", "body": body, "mac": mac_report(key, body)}
        if op == "report_key":
            check(msg, {})
            return {"op": "key", "key": platform_keys.report_key(self._root, identity.mrenclave)}
        if op == "seal_key":
            check(msg, {"policy": str, "svn": int, "key_id": bytes})
            try:
                key = platform_keys.seal_key(
                    self._root, identity, msg["policy"], msg["svn"], msg["key_id"]
                )
            except platform_keys.KeyRequestError as e:
                return {"op": "error", "reason": str(e)}
            return {"op": "key", "key": key}
        if op == "quote":
            return self._quote(identity, msg)
        if op in ("counter_read", "counter_advance"):
            check(msg, {"name": str}, {"value": int})
            name = f"{identity.mrsigner}:{identity.product_id}:{msg['name']}"
            try:
                if op == "counter_read":
                    return {"op": "counter", "value": self.counters.read(name)}
                return {"op": "counter", "value": self.counters.advance(name, msg.get("value", 0))}
            except StrongroomError as e:
                return {"op": "error", "reason": str(e)}
        raise ChannelError(f"unknown platform request {op!r}")

    def _quote(self, identity: EnclaveIdentity, msg: Message) -> Message:
        """The quoting function: a verified report of this enclave becomes signed evidence."""
        # imported on first use: the COSE stack is a fifth of the platform's start-up time
        from strongroom.evidence import (  # noqa: PLC0415
            ArtifactClaim,
            Evidence,
            sign_evidence,
            ueid_for,
        )

        check(
            msg,
            {"body": bytes, "mac": bytes, "nonce": bytes, "enclave_key": bytes, "artifacts": list},
        )
        try:
            report = verify_report(
                platform_keys.report_key(self._root, identity.mrenclave), msg["body"], msg["mac"]
            )
        except ReportError as e:
            return {"op": "error", "reason": f"quote refused: {e}"}
        if report.identity != identity:
            return {"op": "error", "reason": "quote refused: report of another enclave"}
        if len(msg["nonce"]) > 64 or report.report_data != key_binding(
            msg["enclave_key"], msg["nonce"]
        ):
            return {"op": "error", "reason": "quote refused: report does not bind key and nonce"}
        try:
            artifacts = tuple(
                ArtifactClaim(str(n), int(v), str(d)) for n, v, d in msg["artifacts"][:64]
            )
        except (TypeError, ValueError) as e:
            raise ChannelError("malformed artifact list in quote request") from e
        seq = self.counters.advance("evidence-seq", self.counters.read("evidence-seq") + 1)
        claims = report.claims
        evidence = Evidence(
            device_id=self.profile.device_id,
            nonce=msg["nonce"],
            ueid=ueid_for(self._attestation_key.verify_key),
            iat=int(time.time()),
            seq=seq,
            platform_debug=claims.debug,
            firmware=claims.firmware,
            secure_boot=claims.secure_boot,
            smt=claims.smt,
            enclave=identity,
            artifacts=artifacts,
            local_attestation="passed",
            enclave_key=msg["enclave_key"],
            key_binding=report.report_data,
        )
        return {"op": "evidence", "token": sign_evidence(evidence, self._attestation_key)}

    def serve(self, identity: EnclaveIdentity, chan: Channel) -> None:
        """Serve the enclave's requests until it closes its channel."""
        while True:
            try:
                msg = chan.recv()
            except ChannelClosed:
                return
            except ChannelError as e:
                log.warning("enclave_request_rejected", reason=str(e))
                chan.send({"op": "error", "reason": str(e)})
                continue
            try:
                reply = self.handle(identity, msg)
            except ChannelError as e:
                log.warning("enclave_request_rejected", reason=str(e))
                reply = {"op": "error", "reason": str(e)}
            try:
                chan.send(reply)
            except ChannelClosed:
                return


def spawn_enclave(
    image: VerifiedImage,
    host_fd: int,
    *,
    show_stderr: bool,
    spawner: EnclaveSpawner | None = None,
) -> tuple[ChildProcess, Channel]:
    """Start the enclave process (itself, or through the privileged launcher's `spawner`, which
    starts it as the enclave's user) and hand it exactly the content that was measured."""
    ours, theirs = socket.socketpair()
    try:
        if spawner is None:
            proc = spawn_enclave_directly(theirs.fileno(), host_fd, show_stderr=show_stderr)
        else:
            proc = spawner.spawn(theirs.fileno(), host_fd, show_stderr=show_stderr)
    finally:
        theirs.close()
    chan = Channel(ours)
    content = image.content
    chan.send({"op": "image", "size": len(content)})
    for start in range(0, len(content), PIECE_SIZE):
        chan.send({"op": "piece", "data": content[start : start + PIECE_SIZE]})
    return proc, chan


def identity_of(image: VerifiedImage) -> EnclaveIdentity:
    return image.sigstruct.identity
