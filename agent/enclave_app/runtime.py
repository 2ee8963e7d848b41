"""The enclave's main loop: local attestation, artifact loading, sealing, invoke, zeroisation.

Two channels: to the platform (trusted: reports, keys, counters) and to the host (untrusted: it
relays artifacts, wrapped keys and sealed blobs, and asks for `invoke`). Nothing crosses to the host
but declared results, public keys, reports, sealed blobs and short error reasons.
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import math
import os
import secrets
import select
import signal
import stat
import sys
import time
import types
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import x25519

from agent.channel import Channel, ChannelClosed, ChannelError, Message, check
from agent.enclave_app import sealing
from agent.enclave_app.attestation import EnclavePolicy, platform_problems
from agent.memimport import MemoryFinder
from strongroom import artifact, keywrap
from strongroom.commands import verify_command
from strongroom.errors import StrongroomError
from strongroom.image import CONTENT_MAGIC, EnclaveIdentity, parse_content
from strongroom.report import Report, ReportError, key_binding, verify_report
from strongroom.signing import VerifyKey

MAX_RESULT = 1024 * 1024
LEASE_CHECK_S = 1.0
MAX_TIMEOUT = 300.0
ERROR_MESSAGE_MAX = 200


class Refusal(Exception):
    """A request the enclave will not carry out; the message goes to the host."""


class InvokeTimeout(BaseException):
    """Raised in protected code by the invoke timer (a BaseException so `except Exception`
    in protected code cannot swallow it)."""


class PlatformClient:
    def __init__(self, chan: Channel) -> None:
        self._chan = chan

    def _ask(self, op: str, **fields: Any) -> Message:
        reply = self._chan.request({"op": op, **fields}, timeout=30)
        if reply["op"] == "error":
            raise Refusal(str(reply.get("reason", "platform refused")))
        return reply

    def report(self, report_data: bytes) -> tuple[bytes, bytes]:
        r = check(self._ask("report", report_data=report_data), {"body": bytes, "mac": bytes})
        return r["body"], r["mac"]

    def report_key(self) -> bytes:
        return bytes(check(self._ask("report_key"), {"key": bytes})["key"])

    def seal_key(self, policy: str, svn: int, key_id: bytes) -> bytes:
        reply = self._ask("seal_key", policy=policy, svn=svn, key_id=key_id)
        return bytes(check(reply, {"key": bytes})["key"])

    def quote(
        self, body: bytes, mac: bytes, nonce: bytes, key: bytes, artifacts: list[Any]
    ) -> bytes:
        reply = self._ask(
            "quote", body=body, mac=mac, nonce=nonce, enclave_key=key, artifacts=artifacts
        )
        return bytes(check(reply, {"token": bytes})["token"])

    def counter(self, name: str) -> int:
        return int(check(self._ask("counter_read", name=name), {"value": int})["value"])

    def advance(self, name: str, value: int) -> int:
        reply = self._ask("counter_advance", name=name, value=value)
        return int(check(reply, {"value": int})["value"])


def _module_name(artifact_name: str) -> str:
    return artifact_name.replace("-", "_").replace(".", "_")


class Enclave:
    def __init__(
        self, platform: PlatformClient, host: Channel, policy: Any, hardening: list[str]
    ) -> None:
        self._platform, self._host, self._policy = platform, host, policy
        self._hardening = hardening
        self._private = x25519.X25519PrivateKey.generate()
        self.public_key = self._private.public_key().public_bytes_raw()
        self._artifact_signer = VerifyKey(bytes.fromhex(policy.ARTIFACT_SIGNER))
        self._seal_policy: str = getattr(policy, "SEAL_POLICY", "signer")
        verifier = getattr(policy, "VERIFIER_KEY", "")
        self._verifier_key = VerifyKey(bytes.fromhex(verifier)) if verifier else None
        self.revoked = False
        self.expired = False
        self._deadlines: dict[str, float] = {}
        self.identity: EnclaveIdentity | None = None
        self._plaintext: dict[str, bytearray] = {}
        self._manifests: dict[str, artifact.ArtifactManifest] = {}
        self._finders: dict[str, MemoryFinder] = {}

    # -- local attestation -------------------------------------------------------------------

    def attest_locally(self) -> Report:
        body, mac = self._platform.report(key_binding(self.public_key))
        try:
            report = verify_report(self._platform.report_key(), body, mac)
        except ReportError as e:
            raise Refusal(f"local attestation failed: {e}") from e
        if report.report_data != key_binding(self.public_key):
            raise Refusal("local attestation failed: report does not bind this enclave's key")
        enclave_policy = EnclavePolicy(
            min_firmware=self._policy.MIN_FIRMWARE,
            smt=self._policy.SMT,
            require_secure_boot=self._policy.REQUIRE_SECURE_BOOT,
        )
        problems = platform_problems(report, enclave_policy)
        floor = self._platform.counter("enclave-svn")
        if report.identity.svn < floor:
            problems.append(
                f"enclave SVN {report.identity.svn} is below SVN {floor} already run here"
            )
        if problems:
            raise Refusal("; ".join(problems))
        self._platform.advance("enclave-svn", report.identity.svn)
        self.identity = report.identity
        return report

    # -- artifacts -----------------------------------------------------------------------------

    def _data_key(
        self, manifest: artifact.ArtifactManifest, msg: Message
    ) -> tuple[bytearray, bool, float]:
        """The artifact's data key, whether it is fresh (wrapped by the fleet) or unsealed, and
        its lease deadline."""
        assert self.identity is not None  # noqa: S101 - serve() only runs after attestation
        name = manifest.name
        if isinstance(msg.get("wrapped_key"), bytes) and isinstance(msg.get("key_aad"), bytes):
            try:
                key, lease = keywrap.unwrap_key(
                    self._private, msg["wrapped_key"], key_id=manifest.key_id, aad=msg["key_aad"]
                )
            except StrongroomError as e:
                raise Refusal(str(e)) from e
            return key, True, lease.deadline
        if isinstance(msg.get("sealed"), bytes):
            try:
                header, key = sealing.unseal(self._platform.seal_key, msg["sealed"])
            except sealing.SealError as e:
                raise Refusal(str(e)) from e
            except Refusal as e:
                raise Refusal(f"cannot unseal: {e}") from e
            if (header.artifact, header.version, header.data_key_id) != (
                name,
                manifest.version,
                manifest.key_id,
            ):
                key[:] = bytes(len(key))
                raise Refusal(f"sealed blob belongs to another artifact or version than {name}")
            if header.deadline < time.time():
                key[:] = bytes(len(key))
                raise Refusal(
                    f"the sealed key of {name} expired: the device was offline beyond its lease "
                    "and grace; it must attest again"
                )
            current = self._platform.counter(f"seal:{name}")
            if header.counter != current:
                key[:] = bytes(len(key))
                raise Refusal(
                    f"sealed blob for {name} is stale (counter {header.counter}, platform at "
                    f"{current}): an older blob was replayed"
                )
            return key, False, header.deadline
        raise Refusal("no key for the artifact: send a wrapped key or a sealed blob")

    def load(self, msg: Message) -> Message:
        check(
            msg,
            {"header": bytes, "body_size": int},
            {"wrapped_key": bytes, "key_aad": bytes, "sealed": bytes},
        )
        assert self.identity is not None  # noqa: S101 - serve() only runs after attestation
        try:
            signed = artifact.read_manifest(io.BytesIO(msg["header"]))
            manifest = signed.verify(self._artifact_signer)
        except StrongroomError as e:
            raise Refusal(f"artifact refused: {e}") from e
        expected = manifest.size + manifest.chunk_count * artifact.TAG_SIZE
        if msg["body_size"] != expected:
            raise Refusal(f"artifact {manifest.name} body has the wrong size")
        if manifest.min_svn > self.identity.svn:
            raise Refusal(
                f"artifact {manifest.name} needs enclave SVN {manifest.min_svn}, "
                f"this enclave is SVN {self.identity.svn}"
            )
        floor = self._platform.counter(f"version:{manifest.name}")
        if manifest.version < floor:
            raise Refusal(
                f"rollback: artifact {manifest.name} v{manifest.version} is older than "
                f"v{floor} already run on this device"
            )
        data_key, fresh, deadline = self._data_key(manifest, msg)
        self._host.send({"op": "send_body"})
        plaintext = bytearray(manifest.size)
        try:
            with self._receive_body(msg["body_size"]) as body:
                for _chunk in artifact.open_stream(body, signed, data_key, into=plaintext):
                    pass  # decrypted in place, straight into enclave memory
        except (StrongroomError, ChannelError, OSError) as e:
            plaintext[:] = bytes(len(plaintext))
            data_key[:] = bytes(len(data_key))
            reason = getattr(e, "strerror", None) or str(e)
            raise Refusal(f"artifact {manifest.name} refused: {reason}") from e
        self._install(manifest, plaintext)
        self._deadlines[manifest.name] = deadline
        if fresh:
            self.revoked = False  # keyed again by the fleet after a reinstatement
            self.expired = False
        self._platform.advance(f"version:{manifest.name}", manifest.version)
        reply: Message = {
            "op": "loaded",
            "name": manifest.name,
            "version": manifest.version,
            "sha256": manifest.sha256,
        }
        if fresh:
            counter = self._platform.advance(
                f"seal:{manifest.name}", self._platform.counter(f"seal:{manifest.name}") + 1
            )
            header = sealing.SealedHeader(
                self._seal_policy,
                self.identity.svn,
                secrets.token_bytes(32),
                manifest.name,
                manifest.version,
                manifest.key_id,
                counter,
                deadline,
            )
            reply["sealed"] = sealing.seal(self._platform.seal_key, header, data_key)
        data_key[:] = bytes(len(data_key))
        return reply

    def _receive_body(self, size: int) -> io.FileIO:
        """The ciphertext body: the host passes an open descriptor of the artifact file, and the
        enclave reads the ciphertext straight from it (a regular file of the announced size)."""
        first = self._host.recv(timeout=60)
        if first["op"] == "body_fd":
            offset = check(first, {"offset": int})["offset"]
            fd = self._host.recv_fd(timeout=10)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size - offset != size or offset < 0:
                os.close(fd)
                raise ChannelError("the artifact descriptor is not the announced regular file")
            f = io.FileIO(fd, "rb", closefd=True)  # unbuffered: read straight into the chunk
            f.seek(offset)
            return f
        raise ChannelError(f"expected the artifact body, got {first['op'][:40]!r}")

    def _install(self, manifest: artifact.ArtifactManifest, plaintext: bytearray) -> None:
        self._drop(manifest.name)
        self._plaintext[manifest.name] = plaintext
        self._manifests[manifest.name] = manifest
        if manifest.kind == "code":
            if plaintext[: len(CONTENT_MAGIC)] == CONTENT_MAGIC:
                files = parse_content(bytes(plaintext))
            else:
                files = {f"{_module_name(manifest.name)}.py": bytes(plaintext)}
            finder = MemoryFinder(files, manifest.name)
            finder.install()
            self._finders[manifest.name] = finder

    def _drop(self, name: str) -> None:
        old = self._plaintext.pop(name, None)
        if old is not None:
            old[:] = bytes(len(old))
        self._manifests.pop(name, None)
        finder = self._finders.pop(name, None)
        if finder is not None:
            sys.meta_path.remove(finder)
            for mod_name, mod in list(sys.modules.items()):
                spec = getattr(mod, "__spec__", None)
                if spec is not None and spec.loader is finder:
                    del sys.modules[mod_name]

    def model(self, name: str) -> bytearray:
        manifest = self._manifests.get(name)
        if manifest is None or manifest.kind != "model":
            raise KeyError(f"no model {name!r} is loaded")
        return self._plaintext[name]

    def evidence(self, msg: Message) -> Message:
        """Signed evidence for a verifier's nonce, binding this enclave's public key."""
        check(msg, {"nonce": bytes})
        if not 16 <= len(msg["nonce"]) <= 64:
            raise Refusal("a nonce has 16 to 64 bytes")
        body, mac = self._platform.report(key_binding(self.public_key, msg["nonce"]))
        loaded = [[m.name, m.version, m.sha256] for m in self._manifests.values()]
        token = self._platform.quote(body, mac, msg["nonce"], self.public_key, loaded)
        return {"op": "evidence", "token": token}

    # -- invoke --------------------------------------------------------------------------------

    def invoke(self, msg: Message) -> Message:
        check(msg, {"entrypoint": str, "timeout": float}, {"input": object})
        if self.revoked:
            raise Refusal("this enclave was revoked; it serves nothing until it is keyed again")
        self.expire_leases()
        if self.expired:
            raise Refusal(
                "lease expired: the device could not renew its keys in time; it serves again "
                "once it attests"
            )
        func = self._entry_point(msg["entrypoint"])
        timeout = msg["timeout"]
        if not math.isfinite(timeout):
            raise Refusal("timeout must be a finite number of seconds")
        result = self._run_timed(func, msg.get("input"), min(max(timeout, 0.001), MAX_TIMEOUT))
        try:
            encoded = json.dumps(result, allow_nan=False)
        except (TypeError, ValueError):
            raise Refusal("protected code returned a value that is not JSON-serialisable") from None
        if len(encoded) > MAX_RESULT:
            raise Refusal(f"result of {len(encoded)} bytes exceeds the {MAX_RESULT}-byte cap")
        return {"op": "result", "json": encoded}

    def _entry_point(self, entrypoint: str) -> Callable[[Any], Any]:
        """A public function defined by a loaded code artifact, nothing else: not a private or
        dunder name (`__getattribute__` would read any global), not a class or builtin."""
        module_name, _, func_name = entrypoint.partition(":")
        top = module_name.partition(".")[0]
        refused = Refusal(f"entry point {entrypoint!r} is not in any loaded code artifact")
        if (
            not func_name.isidentifier()
            or func_name.startswith("_")
            or any(part.startswith("_") and part != "__init__" for part in module_name.split("."))
            or not any(f.provides(top) for f in self._finders.values())
        ):
            raise refused
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise refused from None
        except Exception as e:
            raise Refusal(f"protected code raised {type(e).__name__} on import") from None
        func = module.__dict__.get(func_name)
        if not inspect.isfunction(func) or func.__module__.partition(".")[0] != top:
            raise refused
        return func

    @staticmethod
    def _run_timed(func: Callable[[Any], Any], value: Any, timeout: float) -> Any:
        def on_alarm(_signum: int, _frame: Any) -> None:
            raise InvokeTimeout

        previous = signal.signal(signal.SIGALRM, on_alarm)
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout)
                return func(value)
            finally:
                # the timer may fire in here, after func returned: the outer handler catches it
                signal.setitimer(signal.ITIMER_REAL, 0)
        except InvokeTimeout:
            raise Refusal(f"protected code timed out after {timeout:g} s") from None
        except SyntaxError:
            raise Refusal("protected code raised SyntaxError") from None
        except Exception as e:
            text = str(e)[:ERROR_MESSAGE_MAX]
            raise Refusal(f"protected code raised {type(e).__name__}: {text}") from None
        finally:
            signal.signal(signal.SIGALRM, previous)

    # -- lifecycle -----------------------------------------------------------------------------

    def wipe(self) -> None:
        """Zeroise plaintext and forget keys (see docs/threat-model.md for CPython's limits)."""
        for name in list(self._plaintext):
            self._drop(name)
        self._deadlines.clear()

    def expire_leases(self) -> None:
        """Wipe every artifact whose lease (plus grace) has ended."""
        now = time.time()
        for name, deadline in list(self._deadlines.items()):
            if deadline < now:
                self._drop(name)
                del self._deadlines[name]
                self.expired = True

    def revoke(self, msg: Message) -> Message:
        """Obey a revoke command signed by the fleet verifier: wipe everything held."""
        check(msg, {"command": bytes})
        if self._verifier_key is None:
            raise Refusal("this enclave was built without a verifier key; it obeys no command")
        try:
            command = verify_command(msg["command"], self._verifier_key)
        except StrongroomError as e:
            raise Refusal(f"command refused: {e}") from e
        self.wipe()
        self.revoked = True
        return {"op": "revoked", "reason": command.reason[:200]}

    def status(self, msg: Message) -> Message:
        check(msg, {})
        loaded = sorted(f"{m.name}@{m.version}" for m in self._manifests.values())
        return {"op": "status", "loaded": loaded}

    def serve(self) -> None:
        handlers: dict[str, Callable[[Message], Message]] = {
            "load": self.load,
            "invoke": self.invoke,
            "evidence": self.evidence,
            "status": self.status,
            "revoke": self.revoke,
        }
        while True:
            ready, _, _ = select.select([self._host.fileno()], [], [], LEASE_CHECK_S)
            if not ready:
                self.expire_leases()  # leases end even when nobody asks
                continue
            try:
                msg = self._host.recv()
            except ChannelClosed:
                return
            except ChannelError as e:
                self._host.send({"op": "error", "reason": f"bad request: {e}"})
                continue
            op = msg["op"]
            try:
                if op in ("shutdown", "wipe"):
                    check(msg, {})
                    self.wipe()
                    self._host.send({"op": "wiped"})
                    if op == "shutdown":
                        return
                    continue
                handler = handlers.get(op)
                if handler is None:
                    raise Refusal(f"unknown request {op!r}")
                reply = handler(msg)
            except (Refusal, ChannelError) as e:
                reply = {"op": "error", "reason": str(e)}
            self._host.send(reply)


def api_module(enclave: Enclave) -> types.ModuleType:
    """The `strongroom_enclave` module protected code imports to reach its models."""
    api = types.ModuleType("strongroom_enclave")

    def model_bytes(name: str) -> bytes:
        """The plaintext of a loaded model artifact (a copy: CPython cannot wipe it)."""
        return bytes(enclave.model(name))

    def onnx_session(name: str) -> Any:
        """An ONNX Runtime session created from the model's bytes, never from a file."""
        import onnxruntime  # noqa: PLC0415 - optional extra, imported only when a model needs it

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        return onnxruntime.InferenceSession(
            model_bytes(name), options, providers=["CPUExecutionProvider"]
        )

    api.model_bytes = model_bytes  # type: ignore[attr-defined]
    api.onnx_session = onnx_session  # type: ignore[attr-defined]
    return api


def main(policy: Any) -> int:
    # Ctrl-C in the agent's terminal reaches its whole process group: the host stops the enclave
    # in order, so the enclave ignores it (and has from its start: the platform ignores it too,
    # and an ignored signal stays ignored across exec).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    platform_fd, host_fd, hardening = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    platform = PlatformClient(Channel.from_fd(platform_fd))
    host = Channel.from_fd(host_fd)
    enclave = Enclave(platform, host, policy, hardening.split(",") if hardening else [])
    try:
        report = enclave.attest_locally()
    except (Refusal, ChannelError) as e:
        host.send({"op": "refused", "reason": str(e)})
        return 3
    sys.modules["strongroom_enclave"] = api_module(enclave)
    # A terminated enclave still wipes what it holds: SIGTERM unwinds through serve()'s finally.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))
    host.send(
        {
            "op": "ready",
            "public_key": enclave.public_key,
            "report": report.body(),
            "hardening": hardening,
        }
    )
    try:
        enclave.serve()
    finally:
        enclave.wipe()
    return 0
