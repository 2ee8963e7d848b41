"""The device's side of the Strongroom protocol, as one object that does no I/O.

`DeviceProtocol` is fed what happens (the connection came up or went away, a message arrived,
time passed, an action it asked for was carried out or failed) together with the time, and
answers with what to do next: messages to publish and actions for its driver (make evidence,
load released keys, obey a revoke command). It never touches a socket, the enclave, the clock or
the random number generator: the time comes in as an argument, a nonce it does not choose is
left to the enclave (`MakeEvidence(nonce=None)`). Every transport drives this same object: the
agent daemon over the paho adapter (`agent/daemon.py`), each of the simulator's virtual devices
over its aiomqtt connection (`device_sim/device.py`), and the tests, without sockets.

What it covers (docs/protocol.md has the messages):

- on each connect: deliver what waits in the outbox, in order, then announce `online`;
- a challenge: a key request while some artifact lacks its key or a lease is due (once the
  outbox is delivered, so evidence reaches the verifier in sequence order), else evidence;
- a key response is believed only if it answers the nonce of one of its outstanding requests
  (the newest few: a late answer to an earlier request of this enclave is as good, and ignoring
  it only made a loaded verifier release the keys again); a revocation or a new enclave forgets
  them all (an answer to a request from before would undo the revocation); released keys go to
  the enclave and their renewal times are kept; once one loaded, fresh evidence says so, and a
  revoked device is revoked no more;
- a revoke command counts only if signed with the verifier's result key and addressed to this
  device; the retained copy of a command already obeyed is ignored (its nonce kept across
  restarts by the driver: `last_command`, `remember_command`); once the enclave obeyed,
  status `revoked` carries the command's nonce, and a command refused is reported in `online`;
- evidence of its own every `attest_interval_s` (and at start, unless connected first: the
  challenge that answers `online` is the attestation then); while keys are missing (and the
  device is not revoked), `online` again to be challenged again: `key_retry` after its last
  announcement or key request, backing off while nothing comes (15 s, 30 s, ... 2 min), so a
  fleet whose verifier is slow to release keys does not bury it under more key requests;
- the outbox: evidence is queued, sent one at a time in order, and removed only once the broker
  acknowledged it (`published`); a failed send leaves it, and the rest, for later: while
  connected, tried again `OUTBOX_RETRY_S` after (and at the next connect);
- the enclave failing to make evidence stops the device (`Stop`).

The outbox's storage is the one seam that does I/O: an `OutboxStore` passed in (the agent's
is on disk, `agent.outbox.Outbox`; the simulator's is in memory, `agent.pending.MemoryOutbox`).
The protocol calls it synchronously; it holds no sockets and no secrets.

Driver contract: perform the outputs of one call in order, one at a time, and feed each action's
result back (`report(output, result)`: `Published`, `EvidenceMade`, `KeysLoaded`, `Revoked` or
`Failed`, any failure of a publish included) before performing the next output; results may
return outputs of their own, which come before the rest (depth first, as if the calls were
nested): `Agenda` keeps that order for every driver. On `Stop`, stop. A message that is rejected
(malformed, forged, foreign) is logged and answered with nothing; it never raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import structlog

from agent.pending import OutboxStore, Pending
from strongroom import messages, topics
from strongroom.commands import verify_command
from strongroom.errors import IntegrityError, StrongroomError
from strongroom.retry import Backoff
from strongroom.signing import VerifyKey

log = structlog.get_logger()
DEFAULT_INTERVAL_S = 300.0
# while artifacts lack keys, announce again after this long to get a challenge (no jitter, so the
# protocol stays deterministic: devices' own timelines spread them)
KEY_RETRY = Backoff(initial_s=15.0, factor=2.0, cap_s=120.0, jitter=0.0)
OUTSTANDING_REQUESTS = 4  # key requests whose answer is still believed
OUTBOX_RETRY_S = 1.0  # while connected, a send that failed is tried again after this long
SUBSCRIBED = (topics.CHALLENGE, topics.KEYS_RESPONSE, topics.COMMAND)


@dataclass(frozen=True)
class ProtocolConfig:
    device_id: str
    result_key: VerifyKey  # the verifier's: it signs commands
    artifacts: Mapping[str, str]  # key id -> artifact name (for logs), in the device's order
    attest_interval_s: float = DEFAULT_INTERVAL_S
    key_retry: Backoff = KEY_RETRY  # without jitter: the protocol draws no random numbers

    def __post_init__(self) -> None:
        if self.key_retry.jitter:
            raise ValueError("the device protocol's key retry has no jitter (it is deterministic)")


# -- outputs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    """Publish this; report `published` once the broker acknowledged it, else `publish_failed`."""

    topic: str
    payload: bytes
    leaf: str  # what it is: topics.EVIDENCE, topics.KEYS_REQUEST or topics.STATUS
    qos: int = 1
    retain: bool = False
    entry: Pending | None = None  # the outbox entry it delivers


@dataclass(frozen=True)
class MakeEvidence:
    """Have the enclave make evidence for `nonce` (None: a fresh nonce of the enclave's own),
    then report `evidence_made`. With `key_ids`, the evidence goes into a key request for them."""

    nonce: bytes | None
    key_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoadKeys:
    """Load each released key's artifact into the enclave, then report `keys_loaded` with those
    the enclave refused. `refused` lists what the key broker would not release (for the record:
    nothing to do)."""

    keys: tuple[messages.ReleasedKey, ...]
    refused: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Revoke:
    """Relay this signed command to the enclave (which checks it too and wipes itself) and
    delete what it sealed; then report `revoke_done` with its reason, or `revoke_failed`."""

    command: bytes
    nonce: bytes


@dataclass(frozen=True)
class Stop:
    """Stop the device (the agent exits for its supervisor to start it, and its enclave, again):
    the enclave could not make evidence, so the device cannot be attested. Drivers carry out
    nothing after it; the goodbye and what stopping does are theirs as on any stop."""

    reason: str


Output = Publish | MakeEvidence | LoadKeys | Revoke | Stop


# -- what the driver reports of an output it carried out -----------------------------------------


@dataclass(frozen=True)
class Published:
    """A `Publish` was acknowledged by the broker."""


@dataclass(frozen=True)
class EvidenceMade:
    token: bytes


@dataclass(frozen=True)
class KeysLoaded:
    refused: Mapping[str, str]  # key id -> why the enclave refused it (the rest loaded)


@dataclass(frozen=True)
class Revoked:
    reason: str  # the enclave's account of the command it obeyed


@dataclass(frozen=True)
class Failed:
    """The output could not be carried out (any output but `LoadKeys`, whose refusals are per
    key)."""

    reason: str


Result = Published | EvidenceMade | KeysLoaded | Revoked | Failed


def _due_at(last: float, every: float, now: float) -> float:
    """When `every` seconds after `last` is; a clock set back (now before `last`) makes it now,
    once: what is then done restarts the count from the new time, so nothing comes in a burst."""
    return now if now < last else last + every


def _due(last: float, every: float, now: float) -> bool:
    return now >= _due_at(last, every, now)


class Agenda:
    """The outputs a driver still has to carry out, in the contract's order: each result's own
    outputs before the rest, as if the calls were nested. Both drivers loop over one:

        agenda = Agenda(protocol, outputs)
        while (out := agenda.next()) is not None:
            agenda.report(out, perform(out), now())

    After a `Stop` it has nothing more (and `stopped` says why)."""

    def __init__(self, protocol: DeviceProtocol, outputs: list[Output]) -> None:
        self.protocol, self.stopped = protocol, ""
        self._todo = list(reversed(outputs))

    def next(self) -> Output | None:
        if not self._todo:
            return None
        out = self._todo.pop()
        if isinstance(out, Stop):
            self._todo.clear()
            self.stopped = out.reason
        return out

    def report(self, done: Output, result: Result, now: float) -> None:
        self._todo.extend(reversed(self.protocol.report(done, result, now)))


class DeviceProtocol:
    """One device's protocol state (see the module docstring for the driver contract)."""

    def __init__(self, config: ProtocolConfig, outbox: OutboxStore) -> None:
        self.config, self.outbox = config, outbox
        self.missing: dict[str, None] = {}  # key ids waiting for the fleet's key (ordered)
        self.renew_at: dict[str, float] = {}  # key id -> when to renew its lease (epoch s)
        self.revoked = False
        self.sent = 0  # evidence delivered from the outbox
        self.connected_now = False
        self._last_attest = float("-inf")  # attest at start
        self._last_asked = float("-inf")  # the last announcement or key request
        self._key_retries = 0  # announcements since the last keys arrived
        self._requested: dict[bytes, float] = {}  # outstanding key requests: nonce -> sent at
        self._last_command = b""
        self._in_flight: Pending | None = None  # the outbox entry being sent
        self._outbox_failed_at = float("-inf")  # its last failed send (retried a while after)
        # what waits for the outbox's delivery: an announcement, a challenge's key request
        self._after_flush: list[tuple[str, bytes]] = []

    # -- what the driver asks ------------------------------------------------------------------

    def topic(self, leaf: str) -> str:
        return topics.device_topic(self.config.device_id, leaf)

    def subscriptions(self) -> tuple[str, ...]:
        return tuple(self.topic(leaf) for leaf in SUBSCRIBED)

    def will(self) -> tuple[str, bytes]:
        """The last will (topic, payload): the broker marks the device offline if it vanishes."""
        return self.topic(topics.STATUS), messages.Status("offline", 0).encode()

    def needed_keys(self, now: float) -> list[str]:
        """Keys to ask for: those of artifacts without a key and those whose lease is due."""
        due = [k for k, at in self.renew_at.items() if at <= now and k not in self.missing]
        return [*self.missing, *due]

    def next_tick_at(self, now: float) -> float:
        """When `tick` next has something to do, exactly (for drivers that sleep until then):
        `tick(t)` returns nothing for any `t` before it, with no other event in between."""
        at = _due_at(self._last_attest, self.config.attest_interval_s, now)
        if self.connected_now and not self.revoked:
            # keys are needed from now (one missing) or once the first lease is due
            need_from = float("-inf") if self.missing else min(self.renew_at.values(), default=at)
            at = min(at, max(need_from, _due_at(self._last_asked, self._key_retry_s(), now)))
        if self._outbox_waits():
            at = min(at, _due_at(self._outbox_failed_at, OUTBOX_RETRY_S, now))
        return at

    # -- events ----------------------------------------------------------------------------------

    @property
    def last_command(self) -> bytes:
        """The nonce of the last command obeyed (b"" for none): for the driver to keep across
        restarts and hand back with `remember_command`."""
        return self._last_command

    def remember_command(self, nonce: bytes) -> None:
        """At start: the command obeyed before a restart, so its retained copy is not obeyed
        again (a device reinstated since would wipe itself at every start)."""
        self._last_command = nonce

    def enclave_started(self, unsealed: Iterable[str], needing_keys: Iterable[str]) -> None:
        """The enclave is up: `unsealed` artifacts opened from their sealed keys (renewed at the
        first chance: their lease is not known), `needing_keys` wait for the fleet's. A new
        enclave has a new key-release key: no earlier request's answer is for it."""
        self._requested.clear()
        for key_id in unsealed:
            self.renew_at[key_id] = 0.0
        for key_id in needing_keys:
            self.missing[key_id] = None

    def connected(self, now: float) -> list[Output]:
        """After each (re)connect: deliver what waited, then say we are online. The verifier
        answers `online` with a challenge, which is an attestation: the next one of our own is
        due an interval later (evidence of its own at once would be appraised twice over)."""
        self.connected_now, self._in_flight = True, None
        self._key_retries = 0
        self._last_attest = max(self._last_attest, now)
        return self._announce(now)

    def disconnected(self, now: float) -> list[Output]:
        """The connection is gone: a challenge that waited for the outbox is answered with
        evidence queued there (as when the delivery failed)."""
        self.connected_now, self._in_flight = False, None
        return self._flush_ended(now, delivered=False)

    def tick(self, now: float) -> list[Output]:
        """Time passed: announce again while keys are missing, attest every interval, retry
        the outbox."""
        out: list[Output] = []
        if (
            self.connected_now
            and not self.revoked
            and self.needed_keys(now)
            and _due(self._last_asked, self._key_retry_s(), now)
        ):
            self._key_retries += 1
            out += self._announce(now)  # still waiting for keys: ask for a new challenge
        if _due(self._last_attest, self.config.attest_interval_s, now):
            out += self.attest(now)
        elif self._outbox_waits() and _due(self._outbox_failed_at, OUTBOX_RETRY_S, now):
            self._outbox_failed_at = now  # tried again now: the next try a retry later
            out += self.flush(now)
        return out

    def received(self, topic: str, payload: bytes, now: float) -> list[Output]:
        """A message from the broker. One that is malformed, forged or not ours is logged and
        answered with nothing: no input stops the device."""
        try:
            device_id, leaf = topics.parse(topic)
            if device_id != self.config.device_id:
                return []
            if leaf == topics.CHALLENGE:
                return self._on_challenge(payload, now)
            if leaf == topics.KEYS_RESPONSE:
                return self._on_keys(payload, now)
            if leaf == topics.COMMAND and payload:  # empty: a cleared retained command
                return self._on_command(payload, now)
        except StrongroomError as e:
            log.warning("message_rejected", topic=topic[:120], reason=str(e))
        except Exception as e:  # a defect met by this input: the device goes on all the same
            log.error("message_failed", topic=topic[:120], error=type(e).__name__, exc_info=e)
        return []

    def attest(self, now: float, nonce: bytes | None = None) -> list[Output]:
        """Evidence (for a challenge's nonce, or the enclave's own), queued and sent."""
        self._last_attest = now
        return [MakeEvidence(nonce)]

    def flush(self, now: float) -> list[Output]:
        """Send the oldest waiting outbox entry (the next follows once it is acknowledged)."""
        if self._in_flight is not None:
            return []  # its acknowledgement sends the next
        if not self.connected_now:
            return self._flush_ended(now, delivered=False)
        entry = self.outbox.first()
        if entry is None:
            return self._flush_ended(now, delivered=True)
        self._in_flight = entry
        leaf = entry.topic.removeprefix(self.topic(""))
        return [Publish(entry.topic, entry.payload, leaf, entry=entry)]

    def goodbye(self, now: float) -> list[Publish]:
        """Stopping, while connected: mark ourselves offline (the will covers a device that
        vanishes)."""
        return [self._status("offline", now)]

    # -- results of what the driver did ------------------------------------------------------

    def published(self, done: Publish, now: float) -> list[Output]:
        if done.entry is None:
            return []
        self.outbox.done(done.entry)
        self.sent += 1
        self._in_flight = None
        return self.flush(now)

    def publish_failed(self, failed: Publish, reason: str, now: float) -> list[Output]:
        if failed.entry is not None:
            self._in_flight, self._outbox_failed_at = None, now
            log.info("outbox_waits", pending=len(self.outbox), reason=reason)
            return self._flush_ended(now, delivered=False)
        if failed.leaf == topics.KEYS_REQUEST:
            log.warning("reply_not_sent", reason=reason)
        else:
            log.warning("status_not_published", reason=reason)
        return []

    def evidence_made(self, request: MakeEvidence, token: bytes, now: float) -> list[Output]:
        if request.key_ids:
            assert request.nonce is not None  # noqa: S101 - key requests answer a challenge
            self._requested[request.nonce] = now
            while len(self._requested) > OUTSTANDING_REQUESTS:
                del self._requested[next(iter(self._requested))]  # the oldest
            self._last_asked = now
            key_request = messages.KeyRequest(token, request.key_ids).encode()
            log.info("keys_requested", keys=len(request.key_ids))
            return [Publish(self.topic(topics.KEYS_REQUEST), key_request, topics.KEYS_REQUEST)]
        self.outbox.put(self.topic(topics.EVIDENCE), token)
        return self.flush(now)

    def evidence_failed(self, request: MakeEvidence, reason: str, now: float) -> list[Output]:
        """The enclave could not make evidence: the device stops (its enclave is started again
        with it), whatever asked for the evidence; a device that cannot be attested serves
        nothing and would only be found stale."""
        log.error("evidence_not_made", reason=reason[:300], for_keys=bool(request.key_ids))
        return [Stop(f"the enclave could not make evidence: {reason}"[:300])]

    def keys_loaded(
        self, request: LoadKeys, refused_by_enclave: Mapping[str, str], now: float
    ) -> list[Output]:
        """The keys of `request` were loaded but those in `refused_by_enclave` (key id ->
        reason); fresh evidence then tells the fleet what the enclave runs now (nothing loaded:
        nothing new to tell, and a revoked device stays revoked)."""
        loaded = False
        for key in request.keys:
            name = self.config.artifacts.get(key.key_id, key.key_id)
            if key.key_id in refused_by_enclave:
                reason = refused_by_enclave[key.key_id]
                log.error("released_key_refused_by_enclave", artifact=name, reason=reason)
                continue
            self.missing.pop(key.key_id, None)
            self.renew_at[key.key_id] = key.renew_at
            self._key_retries = 0
            self.revoked, loaded = False, True  # keyed again (for a request made since)
            log.info("artifact_loaded_with_released_key", artifact=name, lease_until=key.until)
        return self.attest(now) if loaded else []

    def revoke_done(self, request: Revoke, reason: str, now: float) -> list[Output]:
        self._last_command = request.nonce
        self.missing = dict.fromkeys(self.config.artifacts)
        self.renew_at.clear()
        self.revoked = True
        # an answer to a request made before would be believed, load its keys and end the
        # revocation: only a request made since (after a reinstatement) counts now
        self._requested.clear()
        log.warning("revoked", reason=reason)
        return [self._status("revoked", now, report=reason, command=request.nonce)]

    def revoke_failed(self, request: Revoke, reason: str, now: float) -> list[Output]:
        return self._command_ignored(reason, now)

    def report(  # noqa: PLR0911 - one case per (output, result): the table itself
        self, done: Output, result: Result, now: float
    ) -> list[Output]:
        """What became of an output the driver carried out: the one table from a result to the
        event above, so no driver maps them differently. A result that does not fit its output
        (a driver's defect) raises."""
        match done, result:
            case Publish(), Published():
                return self.published(done, now)
            case Publish(), Failed(reason):
                return self.publish_failed(done, reason, now)
            case MakeEvidence(), EvidenceMade(token):
                return self.evidence_made(done, token, now)
            case MakeEvidence(), Failed(reason):
                return self.evidence_failed(done, reason, now)
            case LoadKeys(), KeysLoaded(refused):
                return self.keys_loaded(done, refused, now)
            case Revoke(), Revoked(reason):
                return self.revoke_done(done, reason, now)
            case Revoke(), Failed(reason):
                return self.revoke_failed(done, reason, now)
        raise TypeError(f"{type(result).__name__} is no result of {type(done).__name__}")

    # -- inside ------------------------------------------------------------------------------

    def _outbox_waits(self) -> bool:
        """Connected, nothing in flight, and entries waiting (after a failed send)."""
        return self.connected_now and self._in_flight is None and len(self.outbox) > 0

    def _key_retry_s(self) -> float:
        return self.config.key_retry.delay(self._key_retries)

    def _announce(self, now: float) -> list[Output]:
        self._last_asked = now
        self._after_flush.append(("announce", b""))
        return self.flush(now)

    def _flush_ended(self, now: float, *, delivered: bool) -> list[Output]:
        """The outbox is delivered (or a send failed): what waited for it goes now."""
        waiting, self._after_flush = self._after_flush, []
        out: list[Output] = []
        for what, nonce in waiting:
            if what == "announce":
                if self.connected_now:
                    out.append(self._status("online", now))
                continue
            needed = self.needed_keys(now)
            if delivered and needed:
                self._last_attest = now
                out.append(MakeEvidence(nonce, tuple(needed)))
            else:
                out += self.attest(now, nonce)
        return out

    def _on_challenge(self, payload: bytes, now: float) -> list[Output]:
        challenge = messages.Challenge.decode(payload)
        if self.needed_keys(now):
            self._after_flush.append(("keys", challenge.nonce))
            return self.flush(now)
        return self.attest(now, challenge.nonce)

    def _on_keys(self, payload: bytes, now: float) -> list[Output]:
        response = messages.KeyResponse.decode(payload)
        if response.nonce not in self._requested:
            log.warning("key_response_ignored", reason="it answers no request of ours")
            return []
        self._requested.clear()  # answered: what the others would bring, this brought
        for key_id, reason in response.refused:
            log.warning("key_refused", key_id=key_id, reason=reason)
        keys = tuple(k for k in response.keys if k.key_id in self.config.artifacts)
        if not keys and not response.refused:
            return []
        return [LoadKeys(keys, response.refused)]

    def _on_command(self, payload: bytes, now: float) -> list[Output]:
        try:
            command = verify_command(payload, self.config.result_key)
            if command.device_id != self.config.device_id:
                raise IntegrityError(f"command is addressed to {command.device_id}")
        except StrongroomError as e:
            return self._command_ignored(str(e), now)
        if command.nonce == self._last_command:
            return []  # the retained copy of a command already carried out
        return [Revoke(payload, command.nonce)]

    def _command_ignored(self, reason: str, now: float) -> list[Output]:
        log.warning("command_ignored", reason=reason)
        return [self._status("online", now, report=f"ignored a command: {reason}"[:300])]

    def _status(self, state: str, now: float, report: str = "", command: bytes = b"") -> Publish:
        """`command`: with `revoked`, the nonce of the command obeyed (the verifier counts a
        confirmation only of a command it sent)."""
        status = messages.Status(state, now, report, command).encode()
        return Publish(self.topic(topics.STATUS), status, topics.STATUS, retain=True)
