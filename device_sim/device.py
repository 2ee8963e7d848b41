"""One virtual device: its MQTT connection (aiomqtt, many per event loop), its attester, and the
behaviour of its scenario. It records what it did and saw in a `DeviceReport`; the scorecard
judges it together with what the fleet's alerts say.

Its honest behaviour is the shipped agent's: each device drives the device protocol
(`agent.protocol.DeviceProtocol`, the object `agent.daemon.AgentDaemon` drives over paho) over
its own connection, with its enclave as attester and its outbox in memory. What a scenario adds
is a deliberate deviation on top (an attack publishes extra messages; an offline device drops
off without its goodbye); none of it replaces the protocol's answers. On top of the protocol the
device also reads its own results, which the agent does not, to judge latency and losses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import cbor2

from agent.enclave_app import sealing
from agent.pending import MemoryOutbox
from agent.platform_service import SimulatedPlatform
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
from device_sim.attesters import Attester, InlineAttester, ProcessAttester
from device_sim.connection import Connection
from device_sim.inline import InlineEnclave, image_identity
from device_sim.kit import Kit
from strongroom import bundle, cose, messages, topics
from strongroom.artifact import read_manifest
from strongroom.ear import verify_result
from strongroom.errors import StrongroomError
from strongroom.evidence import SR_SEQ
from strongroom.retry import Backoff
from strongroom.signing import SigningKey

FORGED_MARK = "forged-by-simulator"
IMAGE = {"rollback-svn": "old_image", "tampered-image": "attacker_image"}
ARTIFACT = {"tampered-artifact": "tampered_model", "rollback-artifact": "old_model"}
# Reconnects after a broker fault, for as long as the broker stays away: short delays (the run
# measures how soon results flow again), jittered so a fleet does not knock all at once.
RECONNECT = Backoff(initial_s=0.5, factor=2.0, cap_s=4.0, jitter=0.5)
PEEK_WAIT_S = 2.0  # how long a peek waits for the retained result after subscribing
MAX_ERRORS = 20  # a report keeps the newest errors (a long outage makes many)
LONGEST_WAIT_S = 3600.0  # a device with nothing to do wakes up this often all the same


class DeviceStopped(Exception):
    """The device protocol stopped the device (`agent.protocol.Stop`): it ends, as the agent
    would exit."""


class SimClock:
    """A device's time and its wait for the next message (the seam a test replaces with a
    clock of its own): epoch seconds, as the agent's."""

    def now(self) -> float:
        return time.time()

    async def wait(self, message: asyncio.Future[Any], until: float) -> bool:
        """Wait for `message` until the time `until`; whether it came."""
        timeout = max(0.0, until - self.now())
        done, _ = await asyncio.wait([message], timeout=timeout)
        return bool(done)


@dataclass
class DeviceReport:
    device_id: str
    scenario: str
    enclave: str
    sent: dict[int, float] = field(default_factory=dict)  # honest evidence: seq -> publish time
    results: list[tuple[float, str, int, str]] = field(default_factory=list)  # t, status, seq, why
    revoked_at: float | None = None
    keys_opened: int = 0
    keys_refused: list[str] = field(default_factory=list)
    local_refusals: list[tuple[float, str]] = field(default_factory=list)
    denied: list[str] = field(default_factory=list)
    attack_at: float | None = None
    offline: list[tuple[float, float]] = field(default_factory=list)  # (from, to)
    errors: list[str] = field(default_factory=list)  # the newest MAX_ERRORS, oldest first
    error_count: int = 0

    def error(self, text: str) -> None:
        self.errors = [*self.errors[-(MAX_ERRORS - 1) :], text[:200]]
        self.error_count += 1

    def to_json_dict(self) -> dict[str, Any]:
        doc = dict(self.__dict__)
        doc["sent"] = {str(k): v for k, v in self.sent.items()}
        return doc

    @classmethod
    def from_json_dict(cls, doc: dict[str, Any]) -> DeviceReport:
        doc = dict(doc)
        doc["sent"] = {int(k): v for k, v in doc["sent"].items()}
        doc["results"] = [tuple(r) for r in doc["results"]]
        doc["local_refusals"] = [tuple(r) for r in doc["local_refusals"]]
        doc["offline"] = [tuple(r) for r in doc["offline"]]
        return cls(**doc)


@dataclass(frozen=True)
class DeviceSpec:
    device_id: str
    scenario: str
    enclave: str  # "inline" | "process"
    host: str
    port: int
    interval_s: float
    grace_s: float
    victim: str  # a healthy device, for cross-topic and stolen-sealed-keys
    # the device's own evidence, besides the verifier's challenges (`agent run --interval`)
    attest_interval_s: float = DEFAULT_INTERVAL_S


def _tls_files(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(cert, key)
    return ctx


def _tls(bundle_dir: Path) -> ssl.SSLContext:
    return _tls_files(
        bundle_dir / bundle.TLS_CA_FILE,
        bundle_dir / bundle.TLS_CERT_FILE,
        bundle_dir / bundle.TLS_KEY_FILE,
    )


def evidence_seq(token: bytes) -> int:
    """The sequence number a token claims (unverified: the device's own evidence)."""
    return int(cbor2.loads(cose.parse(token, "evidence").payload)[SR_SEQ])


class VirtualDevice:
    def __init__(
        self, kit: Kit, spec: DeviceSpec, stop: asyncio.Event, clock: SimClock | None = None
    ) -> None:
        self.kit, self.spec, self.stop = kit, spec, stop
        self.clock = clock or SimClock()
        self.id = spec.device_id
        self.bundle = kit.bundle(self.id)
        self.report = DeviceReport(self.id, spec.scenario, spec.enclave)
        self.verifier_key = kit.home.result_verify_key()
        self.artifact = getattr(kit, ARTIFACT.get(spec.scenario, "model"))
        with self.artifact.open("rb") as f:
            self.key_id = read_manifest(f).manifest.key_id
        self.protocol = DeviceProtocol(
            ProtocolConfig(
                device_id=self.id,
                result_key=self.verifier_key,
                artifacts={self.key_id: self.artifact.name},
                attest_interval_s=spec.attest_interval_s,
            ),
            MemoryOutbox(),
        )
        self.affirmed = asyncio.Event()
        self.captured: bytes | None = None
        self.client: aiomqtt.Client | None = None
        self.phase = "starting"  # what the scenario is doing now
        self.on_phase: Callable[[str], Awaitable[None]] | None = None  # awaited at each change
        self.attester = self._attester()

    def _attester(self) -> Attester:
        image = getattr(self.kit, IMAGE.get(self.spec.scenario, "image"))
        if self.spec.enclave == "process":
            state = self.kit.root / "state" / self.id
            shutil.rmtree(state, ignore_errors=True)
            state.mkdir(parents=True, mode=0o700)
            return ProcessAttester(self.bundle, image, state)
        signer = self.kit.home.verify_key("artifact")
        return InlineAttester(self.bundle, image, signer, self.verifier_key)

    def _topic(self, leaf: str, device: str | None = None) -> str:
        return topics.device_topic(device or self.id, leaf)

    # -- life ---------------------------------------------------------------------------------

    async def run(self, started: Callable[[], None] | None = None) -> DeviceReport:
        """Start the enclave, call `started` (whether it started or was refused), then play the
        scenario until told to stop."""
        try:
            await self.attester.start()
        except StrongroomError as e:
            self.report.local_refusals.append((time.time(), str(e)[:200]))
            return self.report
        finally:
            if started is not None:
                started()
        self.protocol.enclave_started((), (self.key_id,))  # nothing sealed: a fresh state
        try:
            await self._behave()
        except DeviceStopped as e:
            self.report.error(f"stopped: {e}")
        finally:
            await self.attester.stop()
        return self.report

    async def _behave(self) -> None:
        s = self.spec.scenario
        if s == "offline":
            interval, grace = self.spec.interval_s, self.spec.grace_s
            await self._enter("online")
            await self._online_for(self._until(interval * 2))
            await self._enter("away-within-grace")
            await self._away(grace / 2)  # not stale
            await self._enter("online-again")
            await self._online_for(self._until(interval * 2))
            await self._enter("away-beyond-grace")
            await self._away_until_stale(most_s=4 * (interval + grace) + 10)
            await self._enter("back")
            await self._online_for(self._stopped())
            return
        await self._enter("online")
        await self._online_for(self._stopped(), attack=ATTACKS.get(s))

    async def _enter(self, phase: str) -> None:
        self.phase = phase
        if self.on_phase is not None:
            await self.on_phase(phase)

    def _until(self, seconds: float) -> asyncio.Future[Any]:
        return asyncio.ensure_future(asyncio.wait_for(self.stop.wait(), seconds))

    def _stopped(self) -> asyncio.Future[Any]:
        return asyncio.ensure_future(self.stop.wait())

    async def _away(self, seconds: float) -> None:
        start = time.time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)
        self.report.offline.append((start, time.time()))

    async def _away_until_stale(self, most_s: float) -> None:
        """Away (no status, no evidence) until the fleet has declared the device stale, or
        `most_s`. A fixed time away is not enough: a broker restart meanwhile hands the verifier
        the retained `online` status again, which restarts its count of the silence. The device
        learns it is stale by peeking (below), which the verifier cannot tell from silence."""
        start = time.time()
        every = min(5.0, max(1.0, self.spec.grace_s / 2))
        attempt = 0
        while not self.stop.is_set():
            if time.time() - start >= most_s:
                self.report.error(f"not declared stale within {most_s:g} s away; back anyway")
                break
            try:
                if await self._peek_stale(since=start):
                    break
                attempt, delay = 0, every
            except aiomqtt.MqttError as e:  # the broker is down: try again, backing off
                self.report.error(f"mqtt (while away): {e}")
                delay, attempt = RECONNECT.delay(attempt), attempt + 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)
        self.report.offline.append((start, time.time()))

    async def _peek_stale(self, since: float) -> bool:
        """Whether the retained result on the device's topic is a stale one issued since
        `since`, read on a connection that subscribes to that topic alone and publishes
        nothing."""
        async with self._client(will=False) as client:
            await client.subscribe(self._topic(topics.RESULT), qos=1)
            try:
                async with asyncio.timeout(PEEK_WAIT_S):
                    async for msg in client.messages:
                        payload = msg.payload if isinstance(msg.payload, bytes) else b""
                        r = verify_result(payload, self.verifier_key)
                        fresh = r.details.get("freshness")
                        return r.status == "none" and fresh == "stale" and r.iat >= int(since)
            except (TimeoutError, StrongroomError):  # no retained result, or not one to believe
                return False
        return False

    def _client(self, *, will: bool = True) -> aiomqtt.Client:
        """A connection with the device's identity and, as the agent's, its last will."""
        topic, payload = self.protocol.will()
        return Connection(
            "localhost",
            self.spec.port,
            identifier=self.id,
            tls_context=_tls(self.bundle),
            protocol=aiomqtt.ProtocolVersion.V5,
            keepalive=30,
            timeout=20,
            will=aiomqtt.Will(topic, payload, qos=1, retain=True) if will else None,
        )

    async def _online_for(self, until: asyncio.Future[Any], attack: Any = None) -> None:
        """Connected until `until` completes: after a broker fault, and for as long as the
        broker stays away, it reconnects with back-off (RECONNECT), telling the protocol the
        time before each attempt."""
        attempt = 0
        while not until.done():
            try:
                async with self._client() as client:
                    self.client, attempt = client, 0
                    try:
                        await self._session(client, until, attack)
                    finally:
                        await self._disconnected()
                    attack = None  # once
            except aiomqtt.MqttError as e:
                self.report.error(f"mqtt: {e}")
                await asyncio.wait([until], timeout=RECONNECT.delay(attempt))
                attempt += 1
                await self._tick_while_away()
            except StrongroomError as e:
                self.report.local_refusals.append((time.time(), str(e)[:200]))
                await asyncio.wait([until])
            except DeviceStopped:
                until.cancel()
                raise
        until.cancel()

    async def _tick_while_away(self) -> None:
        """Between connection attempts the protocol is told the time all the same, as the
        agent's is while its broker is away: its own evidence waits in the outbox."""
        now = self.clock.now()
        if now >= self.protocol.next_tick_at(now):
            await self._drive(self.protocol.tick(now))

    async def _disconnected(self) -> None:
        self.client = None
        await self._drive(self.protocol.disconnected(self.clock.now()))

    async def _session(
        self, client: aiomqtt.Client, until: asyncio.Future[Any], attack: Any
    ) -> None:
        for topic in (*self.protocol.subscriptions(), self._topic(topics.RESULT)):
            await client.subscribe(topic, qos=1)
        # the protocol announces `online`; the verifier challenges at once and every interval
        tasks = [asyncio.ensure_future(self._run_protocol(client))]
        if attack is not None:
            tasks.append(asyncio.ensure_future(attack(self)))
        stopped: DeviceStopped | None = None
        try:
            done, _ = await asyncio.wait([until, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not until and (error := task.exception()) is not None:
                    if not isinstance(error, DeviceStopped):
                        raise error
                    stopped = error
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # their ends are retrieved
        if stopped is None and self.spec.scenario == "offline" and not self.stop.is_set():
            return  # dropping off: no goodbye
        for out in self.protocol.goodbye(self.clock.now()):
            try:
                await client.publish(out.topic, out.payload, qos=out.qos, retain=out.retain)
            except Exception as e:  # going all the same
                self.report.error(f"goodbye not sent: {type(e).__name__}: {e}")
        if stopped is not None:
            raise stopped

    # -- driving the device protocol -----------------------------------------------------------

    async def _run_protocol(self, client: aiomqtt.Client) -> None:
        """Feed the protocol the connection, each message and the time, one at a time, and
        carry out its answers (`_drive`). Ends with an MqttError when the connection does."""
        await self._drive(self.protocol.connected(self.clock.now()))
        incoming = client.messages
        next_msg: asyncio.Future[aiomqtt.Message] = asyncio.ensure_future(anext(incoming))
        try:
            while True:
                now = self.clock.now()
                wake = min(now + LONGEST_WAIT_S, self.protocol.next_tick_at(now))
                # never cancelled while waiting: no message is lost between turns
                if await self.clock.wait(next_msg, wake):
                    msg = next_msg.result()
                    next_msg = asyncio.ensure_future(anext(incoming))
                    await self._on_message(str(msg.topic), msg.payload)
                now = self.clock.now()
                if now >= self.protocol.next_tick_at(now):
                    await self._drive(self.protocol.tick(now))
        finally:
            next_msg.cancel()

    async def _on_message(self, topic: str, raw: Any) -> None:
        payload = bytes(raw) if isinstance(raw, (bytes, bytearray)) else b""
        if topic == self._topic(topics.RESULT):
            try:
                self._on_result(payload)
            except StrongroomError as e:
                self.report.local_refusals.append((time.time(), str(e)[:200]))
            return
        await self._drive(self.protocol.received(topic, payload, self.clock.now()))

    def _on_result(self, payload: bytes) -> None:
        """What the device observes of the fleet's judgement (not part of the protocol)."""
        if not payload:
            return
        r = verify_result(payload, self.verifier_key)
        why = "; ".join(r.reasons)[:200]
        self.report.results.append((time.time(), r.status, int(r.details.get("seq", 0)), why))
        if r.status == "affirming" and r.details.get("seq") in self.report.sent:
            self.affirmed.set()  # answering our own evidence (not a retained old result)

    async def _drive(self, outputs: list[Output]) -> None:
        """Carry out the protocol's outputs in its order (`Agenda`, as the daemon does); on its
        `Stop`, the device stops (`DeviceStopped`)."""
        agenda = Agenda(self.protocol, outputs)
        while (out := agenda.next()) is not None:
            if isinstance(out, Stop):
                raise DeviceStopped(out.reason)
            agenda.report(out, await self._perform(out), self.clock.now())

    async def _perform(self, out: Output) -> Result:
        if isinstance(out, Publish):
            return await self._publish(out)
        if isinstance(out, MakeEvidence):
            try:
                token = await self.attester.evidence(out.nonce)
            except StrongroomError as e:
                self.report.local_refusals.append((time.time(), str(e)[:200]))
                return Failed(str(e))
            self.captured = self.captured or token
            return EvidenceMade(token)
        if isinstance(out, LoadKeys):
            refused: dict[str, str] = {}
            for key in out.keys:
                try:
                    await self.attester.open_artifact(
                        self.artifact, key.key_id, key.wrapped, key.aad
                    )
                    self.report.keys_opened += 1
                except StrongroomError as e:
                    self.report.local_refusals.append((time.time(), f"artifact: {e}"[:200]))
                    refused[key.key_id] = str(e)
            self.report.keys_refused += [f"{k}: {why}"[:200] for k, why in out.refused]
            return KeysLoaded(refused)
        if isinstance(out, Revoke):
            self.report.revoked_at = self.report.revoked_at or time.time()
            try:
                return Revoked(await self.attester.revoke(out.command))
            except StrongroomError as e:
                return Failed(str(e))
        raise AssertionError(f"unknown protocol output {out!r}")

    async def _publish(self, out: Publish) -> Result:
        """Publish; honest evidence (alone or in a key request) counts as sent once the broker
        has acknowledged it: what a broker going down took before its PUBACK the fleet never
        had, and the outbox sends it again. Any failure is reported as one (else the outbox
        would wait for an answer that never comes)."""
        if self.client is None:
            return Failed("not connected")
        seq = None
        try:
            if out.leaf == topics.EVIDENCE:
                seq = evidence_seq(out.payload)
            elif out.leaf == topics.KEYS_REQUEST:
                seq = evidence_seq(messages.KeyRequest.decode(out.payload).evidence)
            if seq is not None:
                self.report.sent[seq] = time.time()  # before: the answer may come first
            await self.client.publish(out.topic, out.payload, qos=out.qos, retain=out.retain)
        except Exception as e:
            if seq is not None:
                self.report.sent.pop(seq, None)
            if isinstance(e, aiomqtt.MqttError):
                return Failed(str(e))
            self.report.error(f"publish: {type(e).__name__}: {e}")  # a defect: said so
            return Failed(f"{type(e).__name__}: {e}")
        return Published()


# -- attacks: run once connected, alongside the normal behaviour -------------------------------


async def _after_first_result(device: VirtualDevice) -> None:
    await asyncio.wait_for(device.affirmed.wait(), 60)
    device.report.attack_at = time.time()


async def _replay(device: VirtualDevice) -> None:
    await _after_first_result(device)
    first = max(device.report.sent)
    while not any(seq > first for _t, _s, seq, _w in device.report.results):
        await asyncio.sleep(0.2)  # a newer evidence accepted: the captured one is now old
    assert device.client is not None and device.captured is not None  # noqa: S101
    await device.client.publish(device._topic(topics.EVIDENCE), device.captured, qos=1)


async def _impersonate(device: VirtualDevice) -> None:
    await _after_first_result(device)
    assert device.client is not None and device.captured is not None  # noqa: S101
    claims = cbor2.loads(cose.parse(device.captured, "evidence").payload)
    claims[SR_SEQ] += 1000
    forged = cose.sign(claims, SigningKey.generate(), device.id.encode())
    await device.client.publish(device._topic(topics.EVIDENCE), forged, qos=1)


async def _clone(device: VirtualDevice) -> None:
    await _after_first_result(device)
    assert device.client is not None  # noqa: S101
    copy = device.kit.root / "state" / f"{device.id}-clone"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(device.bundle, copy)
    (copy / bundle.ROOT_SECRET_FILE).write_bytes(os.urandom(bundle.ROOT_SECRET_SIZE))
    (copy / bundle.PLATFORM_DIR / "counters.json").unlink(
        missing_ok=True
    )  # MAC'd by the old secret
    clone = InlineEnclave.load(copy, image_identity(device.kit.image.read_bytes()))
    token = clone.evidence()
    await device.client.publish(device._topic(topics.EVIDENCE), token, qos=1)


async def _stolen_sealed_keys(device: VirtualDevice) -> None:
    await _after_first_result(device)
    identity = image_identity(device.kit.image.read_bytes())

    def seal_key_of(platform: SimulatedPlatform) -> sealing.SealKeyFn:
        def seal_key(policy: str, svn: int, key_id: bytes) -> bytes:
            msg = {"op": "seal_key", "policy": policy, "svn": svn, "key_id": key_id}
            reply = platform.handle(identity, msg)
            if reply.get("op") != "key":
                raise sealing.SealError(str(reply.get("reason")))
            key: bytes = reply["key"]
            return key

        return seal_key

    victim = SimulatedPlatform(device.kit.bundle(device.spec.victim))
    header = sealing.SealedHeader(
        "signer", identity.svn, os.urandom(32), "sim-model", 2, "k", 0, time.time() + 60
    )
    blob = sealing.seal(seal_key_of(victim), header, os.urandom(32))
    try:
        sealing.unseal(seal_key_of(SimulatedPlatform(device.bundle)), blob)
    except sealing.SealError as e:
        device.report.local_refusals.append((time.time(), f"unseal: {e}"))


async def _cross_topic(device: VirtualDevice) -> None:
    await _after_first_result(device)
    client = device.client
    assert client is not None  # noqa: S101
    victim = device.spec.victim
    codes = await client.subscribe(device._topic(topics.KEYS_RESPONSE, victim), qos=1)
    if all(getattr(c, "value", c) >= 0x80 for c in codes):
        device.report.denied.append("subscribe to another device's key responses refused")
    # the scorecard counts it denied only if the fleet never saw this forged status
    device.report.denied.append("publish on another device's status topic attempted")
    forged = messages.Status("revoked", time.time(), FORGED_MARK).encode()
    await client.publish(device._topic(topics.STATUS, victim), forged, qos=1)
    await client.publish(device._topic(topics.EVIDENCE, victim), device.captured or b"x", qos=1)


async def _malformed(device: VirtualDevice) -> None:
    await _after_first_result(device)
    client = device.client
    assert client is not None and device.captured is not None  # noqa: S101
    for payload in (os.urandom(300), device.captured[:-17], os.urandom(20_000)):
        await client.publish(device._topic(topics.EVIDENCE), payload, qos=1)


ATTACKS = {
    "replay": _replay,
    "impersonate": _impersonate,
    "clone": _clone,
    "stolen-sealed-keys": _stolen_sealed_keys,
    "cross-topic": _cross_topic,
    "malformed": _malformed,
}
