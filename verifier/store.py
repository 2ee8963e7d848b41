"""The verifier's state: devices, nonces, sequence numbers and latest results.

`StateStore` is the seam; SQLite (WAL) is the default implementation. Every check-and-update that
guards freshness is a single transaction with conditional updates, never in-memory state, so that
several verifier processes sharing one database stay correct. The rules themselves (what is
fresh, a duplicate, a replay) are `verifier.freshness`, pure, which the store applies to the rows
it read and locked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from provisioning.registry import DeviceRecord
from verifier.freshness import Acceptance, Candidate, Freshness

__all__ = ["Acceptance", "Candidate", "Freshness", "MakeResults", "StateStore", "StoredResult"]


@dataclass(frozen=True)
class StoredResult:
    device_id: str
    status: str
    token: bytes
    at: float


MakeResults = Callable[[list[Acceptance]], Sequence[StoredResult]]


class StateStore(Protocol):
    # what the store raises when it cannot commit now (a locked or unreachable database): the
    # caller keeps what it was doing and tries again, rather than acknowledging it as done
    transient_errors: tuple[type[Exception], ...]

    def sync_devices(self, records: Iterable[DeviceRecord]) -> None: ...

    def issue_nonce(self, device_id: str, nonce: bytes, expires: float) -> None: ...

    def accept_evidence(
        self,
        device_id: str,
        nonce: bytes,
        seq: int,
        token_hash: bytes,
        now: float,
        *,
        require_fresh: bool = False,
    ) -> Freshness:
        """Check and record freshness in one transaction. Only FRESH and PERIODIC record the
        evidence (its sequence number and hash); with `require_fresh`, PERIODIC records nothing."""
        ...

    def accept_batch(
        self, items: Sequence[Candidate], now: float, results: MakeResults | None = None
    ) -> list[Acceptance]:
        """`accept_evidence` for several, in one transaction; verdicts in the items' order.
        `results(verdicts)` is called inside that transaction, and the results it returns are
        saved in it too: a result is stored exactly when the evidence it appraises is recorded."""
        ...

    def last_seq(self, device_id: str) -> int: ...

    def save_result(self, device_id: str, status: str, token: bytes, at: float) -> None: ...

    def save_results(self, results: Sequence[StoredResult]) -> None:
        """Several results in one transaction."""
        ...

    def result(self, device_id: str) -> StoredResult | None: ...

    def record_command(self, device_id: str, nonce: bytes, issued_at: float) -> None:
        """The revoke command now outstanding for the device (it replaces any earlier one)."""
        ...

    def confirm_command(self, device_id: str, nonce: bytes) -> float | None:
        """Its issue time if a command with this nonce was outstanding (it no longer is), else
        None: a device can confirm only a command it was sent, and only once."""
        ...

    def forget_command(self, device_id: str) -> None: ...

    def set_online(self, device_id: str, online: bool, at: float) -> None: ...

    def online_devices(self) -> list[str]: ...

    def due_for_challenge(self, before: float, limit: int) -> list[str]:
        """Up to `limit` online devices last challenged before `before`, longest-waiting first."""
        ...

    def claim_challenge(self, device_id: str, now: float, min_gap: float) -> bool:
        """True for exactly one caller per device and `min_gap` (several verifiers share the
        periodic challenges instead of each sending its own)."""
        ...

    def unclaim_challenge(self, device_id: str, claimed_at: float) -> None:
        """Give back a claim made at `claimed_at` whose challenge could not be sent: the device
        is due again at once (unless it was claimed again since)."""
        ...

    def silent_devices(self, since: float) -> list[str]:
        """Devices heard from before, but not since `since`, whose latest result is not
        already `none`."""
        ...

    def close(self) -> None: ...
