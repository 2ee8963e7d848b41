"""What the fleet home says about devices, for the dashboard: the registry (enrolled devices and
their status) and the audit log (key releases, operator actions), re-read only when they change.

The audit log is read incrementally from where the last read stopped; its signatures are not
checked here (`strongroom audit verify` does that): the dashboard runs with the fleet home and
trusts its files as the operator commands do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from provisioning.home import FleetHome
from provisioning.registry import Registry
from strongroom.errors import StrongroomError
from verifier.operator import audit_path

log = structlog.get_logger()
MAX_AUDIT_READ = 16 * 1024 * 1024  # per poll; the rest follows on the next one


@dataclass
class HomeWatch:
    home: FleetHome
    _registry_stamp: int = -1
    _policy_stamp: int = -1
    _lease_s: float = 3600.0
    _audit_offset: int = 0
    _audit_inode: int = -1
    _registry: Registry = field(init=False)

    def __post_init__(self) -> None:
        self._registry = Registry(self.home.registry_dir)

    def registry_statuses(self) -> dict[str, str] | None:
        """Every enrolled device and its status; None when the registry has not changed."""
        try:
            stamp = self.home.registry_dir.stat().st_mtime_ns
        except OSError:
            return None
        if stamp == self._registry_stamp:
            return None
        self._registry_stamp = stamp
        statuses = {}
        for device_id in self._registry.device_ids():
            try:
                statuses[device_id] = self._registry.get(device_id).status
            except StrongroomError as e:
                log.warning("registry_entry_unreadable", device=device_id, reason=str(e))
        return statuses

    def lease_s(self) -> float:
        """The policy's key lease; the previous value while the policy does not parse."""
        try:
            stamp = self.home.policy_path.stat().st_mtime_ns
            if stamp != self._policy_stamp:
                self._lease_s = float(self.home.load_policy().lease_s)
                self._policy_stamp = stamp
        except (OSError, StrongroomError) as e:
            log.warning("policy_unreadable_keeping_previous", reason=str(e))
        return self._lease_s

    def audit_entries(self) -> tuple[list[dict[str, Any]], bool]:
        """Entries appended since the last call (all of them the first time), at most
        MAX_AUDIT_READ bytes of them, and whether more are waiting."""
        path: Path = audit_path(self.home)
        try:
            with path.open("rb") as f:
                info = path.stat()
                if info.st_ino != self._audit_inode or info.st_size < self._audit_offset:
                    self._audit_inode, self._audit_offset = info.st_ino, 0  # a new log
                f.seek(self._audit_offset)
                data = f.read(MAX_AUDIT_READ)
        except FileNotFoundError:
            return [], False
        except OSError as e:
            log.warning("audit_log_unreadable", reason=str(e))
            return [], False
        complete = data[: data.rfind(b"\n") + 1]  # an entry being written is read next time
        self._audit_offset += len(complete)
        entries = []
        for line in complete.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries, len(data) == MAX_AUDIT_READ and bool(complete)
