"""The fleet watch: the verifier's view of the registry and the policy, and what follows from it.

Provisioning stays the source of truth: the registry and `policy.toml` are re-read when they
change on disk (checked cheaply by mtime) and at least every REGISTRY_RELOAD_S, and at once when
an unknown device shows up. An operator's revocation sends the device a signed, retained revoke
command and an alert; a reinstatement clears it and challenges the device afresh. The verifier's
own revocations (contraindicated evidence) also put the device's certificate on hold in the fleet
CRL. Status messages (rate limited per device) mark devices online or offline and confirm
revocations, only for a command the verifier sent, and once. Devices silent past their interval
and grace get a signed `none` result; operators' re-attestation requests become challenges.
"""

from __future__ import annotations

from dataclasses import replace

import structlog

from provisioning import crl
from provisioning.registry import DeviceRecord
from strongroom import messages, topics
from strongroom.commands import Command, sign_command
from strongroom.ear import AttestationResult, sign_result
from strongroom.errors import StrongroomError
from strongroom.mqtt import MqttError
from verifier.challenges import ChallengeScheduler
from verifier.context import Context, Rejected
from verifier.operator import claim_requests, requests_dir
from verifier.ratelimit import DeviceLimiter

log = structlog.get_logger()
REGISTRY_RELOAD_S = 60.0  # a full re-read at least this often; changes are seen at once


class FleetWatch:
    def __init__(self, ctx: Context, challenges: ChallengeScheduler) -> None:
        self._ctx, self._challenges = ctx, challenges
        self._status_limit = DeviceLimiter(ctx.config.limits.status)
        self._registry_stamps: dict[str, tuple[int, int, int]] = {}
        self._commanded: set[str] = set()  # revoked devices sent a command since this start
        self._last_reload = 0.0
        self._last_stale_check = 0.0
        self._stamp: tuple[int, int] = (0, 0)
        self._requests_stamp = 0

    # -- the registry and the policy -----------------------------------------------------------

    def reload(self) -> None:
        """Re-read the registry and the policy (they are edited by provisioning commands), and
        act on revocations and reinstatements made by operators since the last read."""
        ctx = self._ctx
        previous, stamps = ctx.devices, ctx.registry.stamps()
        devices, changed = {}, []
        for device_id, stamp in stamps.items():
            record = previous.get(device_id)
            if record is None or self._registry_stamps.get(device_id) != stamp:
                try:  # only entries new or replaced since the last look are parsed again
                    record = ctx.registry.get(device_id)
                except StrongroomError as e:
                    log.error("registry_entry_unreadable", device=device_id[:64], reason=str(e))
                    stamps[device_id] = (0, 0, 0)  # read it again next time
                    continue
                changed.append(record)
            devices[device_id] = record
        ctx.devices, self._registry_stamps = devices, stamps
        if changed:
            ctx.store.sync_devices(changed)
        for record in changed:
            before = previous.get(record.device_id)
            if before is None or before.status == record.status:
                continue
            if record.status == "revoked":
                self._send_revoke(record.device_id, "revoked by an operator")
            elif record.status == "active":
                self._reinstated(record.device_id)
        try:
            ctx.policy = ctx.config.home.load_policy()
        except StrongroomError as e:
            log.error("policy_unreadable_keeping_previous", reason=str(e))
        self._last_reload = ctx.clock()

    def device(self, device_id: str, what: str) -> DeviceRecord:
        """The registry record; a device enrolled since the last reload is picked up at once."""
        ctx = self._ctx
        device = ctx.devices.get(device_id)
        if device is None and ctx.registry.exists(device_id):
            self.reload()
            device = ctx.devices.get(device_id)
        if device is None:
            raise Rejected(f"{what} from unknown device {device_id}")
        return device

    def refresh(self, device_id: str) -> None:
        """Read the device's record again now (before a key release: an operator's revocation
        counts at once, not at the next reload)."""
        ctx = self._ctx
        if ctx.registry.exists(device_id):
            record = ctx.registry.get(device_id)
            ctx.devices[device_id] = record
            ctx.store.sync_devices([record])

    def _sources_changed(self) -> bool:
        """Whether the registry or the policy changed on disk (atomic writes rename files, which
        touches the directory), checked cheaply on every tick."""
        home = self._ctx.config.home
        try:
            stamp = (home.registry_dir.stat().st_mtime_ns, home.policy_path.stat().st_mtime_ns)
        except OSError:
            return True
        changed = stamp != self._stamp
        self._stamp = stamp
        return changed

    # -- revocation ----------------------------------------------------------------------------

    def revoke(self, device_id: str, reason: str) -> None:
        """Revoke a device: no more keys, a signed revoke command, an alert, an audit entry."""
        ctx = self._ctx
        record = ctx.registry.get(device_id)
        if record.status != "revoked":
            record = replace(record, status="revoked")
            ctx.registry.put(record)
            ctx.audit.append("revoked", device_id, reason=reason, by="verifier")
            self._sync_crl(device_id)
        elif device_id in self._commanded:
            return  # revoked already, and its retained command stands: nothing new to say
        ctx.devices[device_id] = record
        ctx.store.sync_devices([record])
        self._send_revoke(device_id, reason)

    def _sync_crl(self, device_id: str) -> None:
        """Put the device's certificate on hold in the fleet CRL (the broker then refuses it at
        its next connection). A failure leaves the registry as the truth; the next operator
        command on the device repairs the CRL."""
        try:
            crl.sync_device(self._ctx.config.home, device_id)
        except (StrongroomError, OSError, ValueError) as e:
            log.error("crl_not_updated", device=device_id, reason=str(e)[:200])

    def _send_revoke(self, device_id: str, reason: str) -> None:
        ctx = self._ctx
        ctx.alerts.alert("critical", device_id, f"revoked: {reason}")
        command = Command.revoke(device_id, reason, ctx.clock())
        try:  # recorded first: the confirmation may come as soon as the command is out
            ctx.store.record_command(device_id, command.nonce, command.issued_at)
        except ctx.store.transient_errors as e:  # sent all the same; its confirmation is refused
            log.error("revoke_not_recorded", device=device_id, reason=str(e)[:200])
        try:
            topic = topics.device_topic(device_id, topics.COMMAND)
            signed = sign_command(command, ctx.result_key)
            # Retained: reaches it when back. Not waited for (the driven loop would stop up to
            # 10 s on a slow broker): paho keeps it in flight and sends it again after a
            # reconnect, and the device's status confirms it (`revocation_confirmed`).
            ctx.mqtt.publish(topic, signed, retain=True, wait=False)
            self._commanded.add(device_id)
        except MqttError as e:  # sent again at the device's next contraindicated evidence
            log.error("revoke_not_published", device=device_id, reason=str(e))
        ctx.count("revocations")

    def _reinstated(self, device_id: str) -> None:
        ctx = self._ctx
        log.info("reinstated", device=device_id)
        self._commanded.discard(device_id)
        ctx.store.forget_command(device_id)
        try:
            topic = topics.device_topic(device_id, topics.COMMAND)
            ctx.mqtt.publish(topic, b"", retain=True, wait=False)  # paho keeps it in flight
            self._challenges.challenge(device_id)  # it must attest afresh before any key
        except MqttError as e:
            log.warning("reinstatement_not_announced", device=device_id, reason=str(e))

    # -- status --------------------------------------------------------------------------------

    def handle_status(self, device_id: str, payload: bytes, *, retained: bool = False) -> None:
        ctx = self._ctx
        self.device(device_id, "status")
        if not self._status_limit.allow(device_id, ctx.clock()):
            ctx.count("status_suppressed")
            ctx.alerts.flooding(device_id, "status messages")
            return
        status = messages.Status.decode(payload)
        ctx.store.set_online(device_id, status.state != "offline", ctx.clock())
        if status.report:
            ctx.alerts.alert("warning", device_id, f"device reports: {status.report}")
        if status.state == "revoked":
            self._revocation_confirmed(device_id, status.command, retained=retained)
        elif status.state == "online" and not status.report:
            sent = self._challenges.challenge(device_id, asked_by_device=True)  # or MqttError
            if sent:  # only then is the next periodic one an interval on
                ctx.store.claim_challenge(device_id, ctx.clock(), 0.0)

    def _revocation_confirmed(self, device_id: str, nonce: bytes, *, retained: bool) -> None:
        """A device confirms a revoke: only one the verifier sent (its command's nonce), once."""
        ctx = self._ctx
        issued = ctx.store.confirm_command(device_id, nonce) if nonce else None
        if issued is None:
            if retained:  # the broker's copy of a confirmation already counted, or of old
                log.info("revocation_status_replayed", device=device_id)
                return
            raise Rejected("status confirms a revocation the verifier did not send, or did again")
        latency = round(ctx.clock() - issued, 3)
        ctx.audit.append("revocation_confirmed", device_id, latency_s=latency)
        log.info("revocation_confirmed", device=device_id, latency_s=latency)

    # -- housekeeping --------------------------------------------------------------------------

    def start(self) -> None:
        """The first stale sweep comes an interval after the start, not at once."""
        self._last_stale_check = self._ctx.clock()

    def watch(self, now: float) -> None:
        """One housekeeping turn: re-read what changed, answer operators' requests, and once
        an interval give silent devices their stale result."""
        ctx = self._ctx
        if self._sources_changed() or now - self._last_reload >= REGISTRY_RELOAD_S:
            self.reload()
        self._answer_requests()
        if now - self._last_stale_check >= self._challenges.interval:
            self._last_stale_check = now
            self.mark_stale(now - ctx.policy.attestation_interval_s - ctx.policy.offline_grace_s)

    def mark_stale(self, since: float) -> None:
        """Devices silent past their interval and grace get a `none` result saying so."""
        ctx = self._ctx
        for device_id in ctx.store.silent_devices(since):
            silent = int(ctx.clock() - since)
            result = AttestationResult(
                device_id=device_id,
                status="none",
                vector={},
                reasons=(f"stale: no evidence for more than {silent} s",),
                policy_id=f"policy:v{ctx.policy.version}",
                iat=int(ctx.clock()),
                details={"freshness": "stale"},
            )
            token = sign_result(result, ctx.result_key)
            try:
                topic = topics.device_topic(device_id, topics.RESULT)
                ctx.mqtt.publish(topic, token, retain=True, wait=False)  # kept in flight
            except MqttError as e:  # not saved either: the next round tries again
                log.warning("stale_result_not_published", device=device_id, reason=str(e))
                continue
            ctx.store.save_result(device_id, "none", token, ctx.clock())
            ctx.alerts.alert("warning", device_id, result.reasons[0])

    def _answer_requests(self) -> None:
        """Challenge the devices an operator asked to re-attest (checked cheaply by mtime)."""
        home = self._ctx.config.home
        try:
            stamp = requests_dir(home).stat().st_mtime_ns
        except OSError:
            return
        if stamp == self._requests_stamp:
            return
        self._requests_stamp = stamp
        for device_id in claim_requests(home):
            try:
                self.device(device_id, "re-attestation request")
                self._challenges.challenge(device_id)
                log.info("reattestation_requested", device=device_id)
            except (StrongroomError, MqttError) as e:
                log.warning("reattestation_not_requested", device=device_id[:64], reason=str(e))
