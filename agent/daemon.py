"""The agent daemon: keeps the enclave attested, keyed and reachable, by driving the device
protocol (`agent.protocol.DeviceProtocol`, which holds every decision and does no I/O) over the
paho adapter (`strongroom.mqtt`) and the enclave host.

- starts the enclave (host, platform, enclave processes) and loads artifacts from sealed keys;
- connects to the broker with the device's mTLS identity; its last will marks it offline;
- feeds the protocol the connection's ups and downs, each message, and the time (every 0.2 s;
  the clock is a constructor argument), and carries out what it answers: publishes (waiting
  for the broker's acknowledgement), evidence from the enclave, released keys loaded into the
  enclave, revocation;
- keeps the nonce of the last command obeyed in STATE/last-command, so its retained copy is
  not obeyed again after a restart;
- keeps the outbox on disk (`agent.outbox.Outbox`), so no evidence is lost while the broker is
  away or across a restart;
- serves the local API (Unix socket) for applications on the device;
- on SIGTERM: marks itself offline, has the enclave wipe itself, and exits 0.

A message that cannot be handled (malformed, forged, or met by a defect) is logged and the agent
goes on; the enclave failing to make evidence stops the agent, as the protocol decides (`Stop`:
its supervisor starts it again, and with it the enclave).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog

from agent.errors import EnclaveError
from agent.host import EnclaveHost, HostConfig, WrappedKey, manifest_of
from agent.launcher import Launcher
from agent.local_api import LocalApi
from agent.outbox import Outbox
from agent.protocol import (
    DEFAULT_INTERVAL_S,
    Agenda,
    DeviceProtocol,
    EvidenceMade,
    Failed,
    KeysLoaded,
    LoadKeys,
    MakeEvidence,
    Output,
    ProtocolConfig,
    Publish,
    Published,
    Result,
    Revoke,
    Revoked,
    Stop,
)
from strongroom import bundle
from strongroom.errors import StrongroomError
from strongroom.fsutil import SECRET_FILE, write_atomic
from strongroom.mqtt import Inbound, MqttClient, MqttError, MqttSettings, Will

log = structlog.get_logger()


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


LAST_COMMAND_FILE = "last-command"  # in the state directory: the last obeyed command's nonce
TICK_S = 0.2  # how long the loop waits for a message before it tells the protocol the time


class AgentDaemon:
    def __init__(
        self,
        config: AgentConfig,
        launcher: Launcher | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock`: the time the protocol is told (epoch seconds; a test's own clock)."""
        self.config, self.clock = config, clock
        self._stopping = ""  # why the protocol stopped the agent
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
        self.protocol = DeviceProtocol(
            ProtocolConfig(
                device_id=self.device_id,
                result_key=self.host.info.result_key,
                artifacts={key_id: path.name for key_id, path in self.by_key.items()},
                attest_interval_s=config.attest_interval_s,
            ),
            self.outbox,
        )
        self._command_file = config.state_dir / LAST_COMMAND_FILE
        self.protocol.remember_command(self._read_last_command())
        self.mqtt = MqttClient(self._mqtt_settings())
        self.api: LocalApi | None = None

    def _read_last_command(self) -> bytes:
        try:
            nonce = self._command_file.read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as e:
            log.error("last_command_unreadable", path=str(self._command_file), error=str(e))
            return b""
        if not 16 <= len(nonce) <= 64:  # a command's nonce (docs/protocol.md)
            log.error("last_command_unreadable", path=str(self._command_file), size=len(nonce))
            return b""
        return nonce

    def _save_last_command(self, nonce: bytes) -> None:
        """Kept before the result goes to the protocol: a restart then ignores the retained
        copy of this command (atomic, 0600)."""
        try:
            write_atomic(self._command_file, nonce, SECRET_FILE)
        except StrongroomError as e:  # obeyed all the same; a restart may obey it again
            log.error("last_command_not_saved", error=str(e))

    def _mqtt_settings(self) -> MqttSettings:
        b, c = self.config.bundle, self.config
        will_topic, will_payload = self.protocol.will()
        return MqttSettings(
            host=c.broker_host,
            port=c.broker_port,
            ca=b / bundle.TLS_CA_FILE,
            cert=b / bundle.TLS_CERT_FILE,
            key=b / bundle.TLS_KEY_FILE,
            client_id=self.device_id,
            protocol=c.mqtt_protocol,
            will=Will(will_topic, will_payload),
        )

    # -- the protocol's state, for callers and tests -----------------------------------------

    @property
    def missing(self) -> dict[str, Path]:
        """Key id -> artifact still waiting for its key."""
        return {k: self.by_key[k] for k in self.protocol.missing if k in self.by_key}

    @property
    def renew_at(self) -> dict[str, float]:
        """Key id -> when to renew its lease (epoch s); unsealed keys renew at the first chance."""
        return self.protocol.renew_at

    @property
    def revoked(self) -> bool:
        return self.protocol.revoked

    @property
    def sent(self) -> int:
        return self.protocol.sent

    # -- enclave -------------------------------------------------------------------------------

    def start_enclave(self) -> None:
        self.host.start(self.config.image)
        unsealed, needing = [], []
        for path in self.config.artifacts:
            key_id = manifest_of(path).key_id
            try:
                self.host.load_artifact(path)
                unsealed.append(key_id)
                log.info("artifact_unsealed", artifact=path.name)
            except EnclaveError as e:
                log.info("artifact_needs_key", artifact=path.name, reason=str(e))
                needing.append(key_id)
        self.protocol.enclave_started(unsealed, needing)

    def invoke(self, entrypoint: str, value: Any) -> Any:
        with self._enclave_lock:
            return self.host.invoke(entrypoint, value)

    def _evidence(self, nonce: bytes) -> bytes:
        with self._enclave_lock:
            return self.host.evidence(nonce)

    # -- driving the protocol ----------------------------------------------------------------

    def _drive(self, outputs: list[Output]) -> None:
        """Carry out the protocol's outputs in its order (`Agenda`); on its `Stop`, the run
        ends (`run` raises it once the agent has stopped)."""
        agenda = Agenda(self.protocol, outputs)
        while (out := agenda.next()) is not None:
            if isinstance(out, Stop):
                self._stopping = self._stopping or out.reason
                break
            agenda.report(out, self._perform(out), self.clock())

    def _publish(self, out: Publish) -> Result:
        """Publish, waiting for the broker's acknowledgement. Any failure is reported as one
        (else the outbox would wait for an answer that never comes)."""
        try:
            self.mqtt.publish(out.topic, out.payload, qos=out.qos, retain=out.retain)
        except MqttError as e:
            return Failed(str(e))
        except Exception as e:  # a defect: said so, and the agent goes on
            log.error("publish_failed", error=type(e).__name__, exc_info=e)
            return Failed(f"{type(e).__name__}: {e}")
        return Published()

    def _perform(self, out: Output) -> Result:
        if isinstance(out, Publish):
            return self._publish(out)
        if isinstance(out, MakeEvidence):
            try:
                return EvidenceMade(self._evidence(out.nonce or os.urandom(32)))
            except StrongroomError as e:
                return Failed(str(e))
        if isinstance(out, LoadKeys):
            refused: dict[str, str] = {}
            for key in out.keys:
                try:
                    with self._enclave_lock:  # a renewal reloads the artifact under its new lease
                        self.host.load_artifact(
                            self.by_key[key.key_id], WrappedKey(key.wrapped, key.aad)
                        )
                except EnclaveError as e:
                    refused[key.key_id] = str(e)
            return KeysLoaded(refused)
        if isinstance(out, Revoke):
            try:  # the enclave checks the command too, wipes itself; the host deletes the blobs
                with self._enclave_lock:
                    reason = self.host.revoke(out.command)
            except StrongroomError as e:
                return Failed(str(e))
            self._save_last_command(out.nonce)
            return Revoked(reason)
        raise AssertionError(f"unknown protocol output {out!r}")

    def flush(self) -> bool:
        """Send what waits in the outbox, in order; True when it is empty."""
        self._drive(self.protocol.flush(self.clock()))
        return len(self.outbox) == 0

    def attest(self, nonce: bytes | None = None) -> None:
        """Queue evidence (for a challenge's nonce, or our own) and try to send it."""
        self._drive(self.protocol.attest(self.clock(), nonce))

    def needed_keys(self) -> list[str]:
        """Keys to ask for: those of artifacts without a key and those whose lease is due."""
        return self.protocol.needed_keys(self.clock())

    def handle(self, msg: Inbound) -> None:
        """One message: the protocol's answer carried out. Nothing it meets stops the agent."""
        try:
            self._drive(self.protocol.received(msg.topic, msg.payload, self.clock()))
        except StrongroomError as e:  # the enclave refused what the message asked of it
            log.warning("message_rejected", topic=msg.topic[:120], reason=str(e))
        except Exception as e:  # a defect met by this input: the agent goes on all the same
            log.error("message_failed", topic=msg.topic[:120], error=type(e).__name__, exc_info=e)

    # -- life cycle ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Until `stop` is set (or the protocol stops the agent: then `EnclaveError` once it
        has stopped): each turn, a message or 0.2 s, the connection's change, the message, the
        time."""
        self.start_enclave()
        self.api = LocalApi(self.config.socket, self.invoke).start()
        for topic in self.protocol.subscriptions():
            self.mqtt.subscribe(topic)
        self.mqtt.start()
        was_connected = False
        try:
            while not stop.is_set() and not self._stopping:
                msg = self.mqtt.receive(timeout=TICK_S)
                connected = self.mqtt.connected.is_set()
                if connected and not was_connected:
                    log.info("broker_connected", device=self.device_id)
                    self._drive(self.protocol.connected(self.clock()))
                elif was_connected and not connected:
                    self._drive(self.protocol.disconnected(self.clock()))
                was_connected = connected
                if msg is not None:
                    self.handle(msg)
                self._drive(self.protocol.tick(self.clock()))
        finally:
            self.shutdown()
        if self._stopping:
            raise EnclaveError(self._stopping)

    def shutdown(self) -> None:
        if self.mqtt.connected.is_set():
            for out in self.protocol.goodbye(self.clock()):
                try:
                    self.mqtt.publish(out.topic, out.payload, retain=out.retain, timeout=2)
                except Exception as e:  # stopping all the same
                    log.info("offline_status_not_sent", error=type(e).__name__)
        try:  # what waited for the outbox is queued there (on disk) for the next start
            self._drive(self.protocol.disconnected(self.clock()))
        except Exception as e:  # stopping all the same
            log.error("stopping_failed", error=type(e).__name__, exc_info=e)
        self.mqtt.stop()
        if self.api is not None:
            self.api.stop()
        with self._enclave_lock:
            self.host.stop()
        log.info("agent_stopped", device=self.device_id, evidence_sent=self.sent)
