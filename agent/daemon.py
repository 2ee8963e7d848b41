"""The agent daemon: keeps the enclave attested, keyed and reachable.

- starts the enclave (host, platform, enclave processes) and loads artifacts from sealed keys;
- connects to the broker with the device's mTLS identity; its last will marks it offline;
- answers every challenge (the verifier sends them when the device comes online and at the
  policy's attestation interval): with a key request while some artifact lacks a key, else with
  evidence;
- attests on its own at start and every `attest_interval_s`; evidence goes through the on-disk
  outbox, so none is lost while the broker is away or across a restart;
- serves the local API (Unix socket) for applications on the device;
- on SIGTERM: marks itself offline, has the enclave wipe itself, and exits 0.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog

from agent.errors import EnclaveError
from agent.host import EnclaveHost, HostConfig, WrappedKey, manifest_of
from agent.launcher import Launcher
from agent.local_api import LocalApi
from agent.outbox import Outbox
from strongroom import bundle, messages, topics
from strongroom.commands import verify_command
from strongroom.errors import IntegrityError, StrongroomError
from strongroom.mqtt import Inbound, MqttClient, MqttError, MqttSettings, Will

log = structlog.get_logger()
DEFAULT_INTERVAL_S = 300.0
KEY_RETRY_S = 15.0  # while artifacts lack keys, announce again this often to get a challenge


@dataclass(frozen=True)
class AgentConfig:
    bundle: Path
    broker_host: str
    broker_port: int
    image: Path
    artifacts: tuple[Path, ...]
    state_dir: Path
    socket: Path
    production: bool = True
    attest_interval_s: float = DEFAULT_INTERVAL_S
    outbox_capacity: int = 1000
    mqtt_protocol: Literal[5, 311] = 5
    separation_required: bool = True  # see HostConfig


class AgentDaemon:
    def __init__(self, config: AgentConfig, launcher: Launcher | None = None) -> None:
        self.config = config
        self.host = EnclaveHost(
            HostConfig(
                bundle=config.bundle,
                state_dir=config.state_dir,
                production=config.production,
                separation_required=config.separation_required,
            ),
            launcher,
        )
        self.device_id = self.host.info.device_id
        self.outbox = Outbox(config.state_dir / "outbox", config.outbox_capacity)
        self._enclave_lock = threading.Lock()
        self.by_key = {manifest_of(p).key_id: p for p in config.artifacts}
        self.missing: dict[str, Path] = {}  # key id -> artifact still waiting for its key
        # key id -> when to renew its lease (epoch s); unsealed keys renew at the first chance
        self.renew_at: dict[str, float] = {}
        self.mqtt = MqttClient(self._mqtt_settings())
        self.api: LocalApi | None = None
        self._last_attest = float("-inf")  # attest at start
        self._last_announce = float("-inf")
        self._requested_nonce: bytes | None = None
        self._last_command = b""
        self.revoked = False
        self.sent = 0

    def _mqtt_settings(self) -> MqttSettings:
        b, c = self.config.bundle, self.config
        offline = messages.Status("offline", 0).encode()
        return MqttSettings(
            host=c.broker_host,
            port=c.broker_port,
            ca=b / bundle.TLS_CA_FILE,
            cert=b / bundle.TLS_CERT_FILE,
            key=b / bundle.TLS_KEY_FILE,
            client_id=self.device_id,
            protocol=c.mqtt_protocol,
            will=Will(topics.device_topic(self.device_id, topics.STATUS), offline),
        )

    # -- enclave -------------------------------------------------------------------------------

    def start_enclave(self) -> None:
        self.host.start(self.config.image)
        for path in self.config.artifacts:
            try:
                self.host.load_artifact(path)
                self.renew_at[manifest_of(path).key_id] = 0.0
                log.info("artifact_unsealed", artifact=path.name)
            except EnclaveError as e:
                log.info("artifact_needs_key", artifact=path.name, reason=str(e))
                self.missing[manifest_of(path).key_id] = path

    def invoke(self, entrypoint: str, value: Any) -> Any:
        with self._enclave_lock:
            return self.host.invoke(entrypoint, value)

    def _evidence(self, nonce: bytes) -> bytes:
        with self._enclave_lock:
            return self.host.evidence(nonce)

    # -- protocol ------------------------------------------------------------------------------

    def flush(self) -> bool:
        """Send what waits in the outbox, in order; True when it is empty."""
        for item in self.outbox.pending():
            try:
                self.mqtt.publish(item.topic, item.payload)
            except MqttError as e:
                log.info("outbox_waits", pending=len(self.outbox), reason=str(e))
                return False
            self.outbox.done(item)
            self.sent += 1
        return True

    def attest(self, nonce: bytes | None = None) -> None:
        """Queue evidence (for a challenge's nonce, or our own) and try to send it."""
        token = self._evidence(nonce or os.urandom(32))
        self.outbox.put(topics.device_topic(self.device_id, topics.EVIDENCE), token)
        self._last_attest = time.monotonic()
        self.flush()

    def needed_keys(self) -> list[str]:
        """Keys to ask for: those of artifacts without a key and those whose lease is due."""
        now = time.time()
        due = [k for k, at in self.renew_at.items() if at <= now and k not in self.missing]
        return [*self.missing, *due]

    def on_challenge(self, payload: bytes) -> None:
        challenge = messages.Challenge.decode(payload)
        needed = self.needed_keys()
        if needed and self.flush():
            token = self._evidence(challenge.nonce)
            request = messages.KeyRequest(token, tuple(needed))
            self._requested_nonce = challenge.nonce
            self.mqtt.publish(
                topics.device_topic(self.device_id, topics.KEYS_REQUEST), request.encode()
            )
            log.info("keys_requested", keys=len(needed))
            self._last_attest = time.monotonic()
        else:
            self.attest(challenge.nonce)

    def on_keys(self, payload: bytes) -> None:
        response = messages.KeyResponse.decode(payload)
        if response.nonce != self._requested_nonce:
            log.warning("key_response_ignored", reason="it answers no request of ours")
            return
        self._requested_nonce = None
        if response.keys:
            self.revoked = False
        for key in response.keys:
            path = self.by_key.get(key.key_id)
            if path is None:
                continue
            try:
                with self._enclave_lock:  # a renewal reloads the artifact under its new lease
                    self.host.load_artifact(path, WrappedKey(key.wrapped, key.aad))
                self.missing.pop(key.key_id, None)
                self.renew_at[key.key_id] = key.renew_at
                log.info(
                    "artifact_loaded_with_released_key", artifact=path.name, lease_until=key.until
                )
            except EnclaveError as e:
                log.error("released_key_refused_by_enclave", artifact=path.name, reason=str(e))
        for key_id, reason in response.refused:
            log.warning("key_refused", key_id=key_id, reason=reason)
        if response.keys:
            self.attest()  # tell the fleet what the enclave runs now

    def on_command(self, payload: bytes) -> None:
        """A revoke signed by the verifier: the enclave checks it too, wipes itself, and we delete
        the sealed blobs and confirm. Anything else is ignored and reported."""
        try:
            command = verify_command(payload, self.host.info.result_key)
            if command.device_id != self.device_id:
                raise IntegrityError(f"command is addressed to {command.device_id}")
            if command.nonce == self._last_command:
                return  # the retained copy of a command already carried out
            with self._enclave_lock:
                reason = self.host.revoke(payload)
        except StrongroomError as e:
            log.warning("command_ignored", reason=str(e))
            self._publish_status("online", report=f"ignored a command: {e}"[:300])
            return
        self._last_command = command.nonce
        self.missing = dict(self.by_key)
        self.renew_at.clear()
        self.revoked = True
        log.warning("revoked", reason=reason)
        self._publish_status("revoked", report=reason, command=command.nonce)

    def _publish_status(self, state: str, report: str = "", command: bytes = b"") -> None:
        """`command`: with `revoked`, the nonce of the command obeyed (the verifier counts a
        confirmation only of a command it sent)."""
        try:
            status = messages.Status(state, time.time(), report, command).encode()
            self.mqtt.publish(
                topics.device_topic(self.device_id, topics.STATUS), status, retain=True
            )
        except MqttError as e:
            log.warning("status_not_published", reason=str(e))

    def handle(self, msg: Inbound) -> None:
        try:
            device_id, leaf = topics.parse(msg.topic)
            if device_id != self.device_id:
                return
            if leaf == topics.CHALLENGE:
                self.on_challenge(msg.payload)
            elif leaf == topics.KEYS_RESPONSE:
                self.on_keys(msg.payload)
            elif leaf == topics.COMMAND and msg.payload:  # empty: a cleared retained command
                self.on_command(msg.payload)
        except MqttError as e:
            log.warning("reply_not_sent", reason=str(e))
        except StrongroomError as e:
            log.warning("message_rejected", topic=msg.topic[:120], reason=str(e))
        except Exception as e:  # a defect met by this input: the agent goes on all the same
            log.error("message_failed", topic=msg.topic[:120], error=type(e).__name__, exc_info=e)

    # -- life cycle ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self.start_enclave()
        self.api = LocalApi(self.config.socket, self.invoke).start()
        for leaf in (topics.CHALLENGE, topics.KEYS_RESPONSE, topics.COMMAND):
            self.mqtt.subscribe(topics.device_topic(self.device_id, leaf))
        self.mqtt.start()
        was_connected = False
        try:
            while not stop.is_set():
                connected = self.mqtt.connected.is_set()
                if connected and not was_connected:
                    log.info("broker_connected", device=self.device_id)
                    self._announce()
                was_connected = connected
                msg = self.mqtt.receive(timeout=0.2)
                if msg is not None:
                    self.handle(msg)
                if (
                    connected
                    and self.needed_keys()
                    and not self.revoked
                    and time.monotonic() - self._last_announce >= KEY_RETRY_S
                ):
                    self._announce()  # still waiting for keys: ask for a new challenge
                if time.monotonic() - self._last_attest >= self.config.attest_interval_s:
                    self.attest()
                elif connected and len(self.outbox):
                    self.flush()
        finally:
            self.shutdown()

    def _announce(self) -> None:
        """After each (re)connect: deliver what waited, then say we are online."""
        self._last_announce = time.monotonic()
        self.flush()
        self._publish_status("online")

    def shutdown(self) -> None:
        if self.mqtt.connected.is_set():
            try:
                offline = messages.Status("offline", time.time()).encode()
                self.mqtt.publish(
                    topics.device_topic(self.device_id, topics.STATUS),
                    offline,
                    retain=True,
                    timeout=2,
                )
            except MqttError:
                log.info("offline_status_not_sent")
        self.mqtt.stop()
        if self.api is not None:
            self.api.stop()
        with self._enclave_lock:
            self.host.stop()
        log.info("agent_stopped", device=self.device_id, evidence_sent=self.sent)
