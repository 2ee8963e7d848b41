"""Freshness rules: is verified evidence fresh, periodic, a duplicate delivery, a replay or
expired, and which of those the verifier takes. Pure: rows and the time in, verdicts out.

The state store reads (and locks) the rows a batch needs, a device's sequence window and the
challenges it names, into a `BatchState`; `decide` gives each evidence its verdict in order,
recording what it accepts into that state; the store writes the state back in the same
transaction. `admit` is the verifier's rule on a verdict: a duplicate is ignored, a replay or an
expired answer rejected, and a key request must answer an outstanding challenge. No SQL, no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from strongroom.errors import IntegrityError

# Evidence may arrive out of order when several verifiers share the work: any sequence number not
# seen before and above (highest - SEQ_WINDOW) is accepted once; anything else is a replay. Which
# ones were seen is a bitmap (bit k stands for sequence number highest - k), as in IPsec's and
# DTLS's anti-replay windows (RFC 4303 section 3.4.3).
SEQ_WINDOW = 1024
WINDOW_BYTES = SEQ_WINDOW // 8
WINDOW_MASK = (1 << SEQ_WINDOW) - 1


class Freshness(enum.Enum):
    FRESH = "fresh"  # answers an outstanding challenge of ours
    PERIODIC = "periodic"  # the device's own nonce; fresh by its increasing sequence number
    DUPLICATE = "duplicate"  # evidence already accepted (an MQTT redelivery)
    REPLAY = "replay"  # a sequence number seen before or far below the highest, or a used nonce
    EXPIRED = "expired"  # our challenge, answered after it expired


@dataclass(frozen=True)
class Candidate:
    """Verified evidence whose freshness is to be checked and recorded."""

    device_id: str
    nonce: bytes
    seq: int
    token_hash: bytes
    require_fresh: bool = False  # a key request: it must answer an outstanding challenge


@dataclass(frozen=True)
class Acceptance:
    freshness: Freshness
    newest: bool  # recorded, and no higher sequence number was recorded before it


class NotFresh(IntegrityError):
    """Evidence refused by the freshness rules (a replay, an expired or a missing challenge)."""


@dataclass
class DeviceWindow:
    """A device's highest sequence number, the hash of the evidence that carried it, and which
    of the SEQ_WINDOW numbers below it were accepted. Only the evidence that carried the highest
    is recognised as a duplicate when delivered again: a late one's redelivery is a replay."""

    last_seq: int
    last_hash: bytes | None
    window: int  # bit k: sequence number last_seq - k was accepted
    accepted: int = 0  # accepted since it was read

    @classmethod
    def from_row(cls, last_seq: int, last_hash: bytes | None, window: bytes | None) -> DeviceWindow:
        bits = 0 if window is None else int.from_bytes(window, "big")
        return cls(int(last_seq), None if last_hash is None else bytes(last_hash), bits)

    def window_bytes(self) -> bytes:
        return self.window.to_bytes(WINDOW_BYTES, "big")

    def seen(self, seq: int) -> bool:
        return 0 <= self.last_seq - seq < SEQ_WINDOW and bool(
            self.window >> (self.last_seq - seq) & 1
        )

    def record(self, seq: int, token_hash: bytes) -> None:
        if seq > self.last_seq:  # slide the window (never shifting by more than its width)
            shift = min(seq - self.last_seq, SEQ_WINDOW)
            self.window = (self.window << shift | 1) & WINDOW_MASK
            self.last_seq = seq
        else:
            self.window |= 1 << (self.last_seq - seq)
        if seq >= self.last_seq:  # late evidence must not make the highest's redelivery a replay
            self.last_hash = token_hash
        self.accepted += 1


@dataclass
class Challenge:
    """A nonce the verifier issued: to whom, whether it was answered, until when."""

    device_id: str
    used: bool
    expires: float


@dataclass
class BatchState:
    """A batch's view of the rows it read, updated as its verdicts are decided, and what must
    be written back: the nonces answered and the devices whose windows changed."""

    devices: dict[str, DeviceWindow] = field(default_factory=dict)
    nonces: dict[bytes, Challenge] = field(default_factory=dict)
    used_nonces: list[bytes] = field(default_factory=list)
    changed: set[str] = field(default_factory=set)


def decide(item: Candidate, state: BatchState, now: float) -> Acceptance:  # noqa: PLR0911
    """The freshness verdict for one evidence (one return per verdict), given the rows read and
    the batch's earlier verdicts; records what it accepts into `state`. With `require_fresh`,
    evidence that answers no challenge of ours is PERIODIC and nothing is recorded."""
    device = state.devices.get(item.device_id)
    if device is None:
        return Acceptance(Freshness.REPLAY, False)
    if device.seen(item.seq):  # a redelivery of the latest is benign; anything older, a replay
        dup = Freshness.DUPLICATE if device.last_hash == item.token_hash else Freshness.REPLAY
        return Acceptance(dup, False)
    if item.seq <= device.last_seq - SEQ_WINDOW:
        return Acceptance(Freshness.REPLAY, False)
    found = state.nonces.get(item.nonce)
    if found is not None and found.device_id != item.device_id:
        found = None  # another device's challenge is no challenge to this one
    freshness = Freshness.PERIODIC
    if found is None and item.require_fresh:
        return Acceptance(freshness, False)  # the caller refuses it; nothing is recorded
    if found is not None:
        if found.used:
            return Acceptance(Freshness.REPLAY, False)
        if found.expires < now:
            return Acceptance(Freshness.EXPIRED, False)
        found.used = True
        state.used_nonces.append(item.nonce)
        freshness = Freshness.FRESH
    newest = item.seq >= device.last_seq
    device.record(item.seq, item.token_hash)
    state.changed.add(item.device_id)
    return Acceptance(freshness, newest)


def admit(freshness: Freshness, seq: int, *, require_fresh: bool) -> Freshness | None:
    """The verdict the verifier acts on: None for a duplicate delivery (ignored, its result
    went already), the freshness of accepted evidence, or NotFresh for what it refuses."""
    if freshness is Freshness.DUPLICATE:
        return None
    if freshness in (Freshness.REPLAY, Freshness.EXPIRED):
        raise NotFresh(f"{freshness.value} evidence (sequence {seq})")
    if require_fresh and freshness is not Freshness.FRESH:
        raise NotFresh("a key request must answer an outstanding challenge")
    return freshness
