"""The key broker: data keys for an attested enclave, in answer to a key request.

A key request carries evidence that must answer an outstanding challenge (a fresh nonce, used
once): it goes through the appraisal pipeline like any evidence, after the device's registry
record is read again (an operator's revocation counts at once). Only an affirming result releases
keys, and only those `verifier.release` allows for that enclave; each data key is unwrapped from
the keystore only to be wrapped (HPKE) to the enclave key bound in that evidence, bound to this
device and this request, and wiped. Every release and refusal is audited.

A response that cannot be published (MqttError, raised to the caller) is the transport's failure,
not the device's: the request's freshness and the releases are committed and audited (with a
`key_response_not_published` entry after the `key_released` ones), so the request is
acknowledged and not tried again (a redelivery is a duplicate and answers nothing); the device
asks again with its next challenge.

The response is published without waiting for the broker's acknowledgement: the verifier's loop
also drives the network, so a wait (up to 10 s on a slow broker) would hold every message behind
it. paho keeps the response in flight and sends it again after a reconnect; what it cannot take
at once (not connected) raises. So `key_released` means wrapped to that enclave's key (useless
to anyone else) and handed to the transport, not received.
"""

from __future__ import annotations

import structlog

from strongroom import keywrap, messages, topics
from strongroom.errors import StrongroomError
from strongroom.evidence import Evidence
from strongroom.mqtt import MqttError
from verifier.context import Context
from verifier.fleetwatch import FleetWatch
from verifier.pipeline import AppraisalPipeline
from verifier.release import refusal

log = structlog.get_logger()
KEY_AAD_DOMAIN = b"strongroom/key-release/v1|"


def key_aad(device_id: str, nonce: bytes) -> bytes:
    """The binding a released key is wrapped with: this device, this request."""
    return KEY_AAD_DOMAIN + device_id.encode() + b"|" + nonce


class KeyBroker:
    def __init__(self, ctx: Context, pipeline: AppraisalPipeline, fleet: FleetWatch) -> None:
        self._ctx, self._pipeline, self._fleet = ctx, pipeline, fleet

    def handle_key_request(self, device_id: str, payload: bytes) -> None:
        """Answer a key request on `fleet/<id>/keys/response`; a StrongroomError rejects it."""
        ctx = self._ctx
        request = messages.KeyRequest.decode(payload)
        self._fleet.refresh(device_id)  # a revocation by an operator counts at once
        (outcome,) = self._pipeline.appraise([(device_id, request.evidence, True)])
        if isinstance(outcome, StrongroomError):
            raise outcome
        if outcome is None:
            return
        ev, status = outcome[0], outcome[1].status
        released, refused = [], []
        policy = ctx.policy
        lease = keywrap.Lease(ctx.clock() + policy.lease_s, policy.offline_grace_s)
        for key_id in request.key_ids:
            reason = self._refusal(key_id, ev, status)
            if reason is not None:
                refused.append((key_id, reason))
                log.warning("key_refused", device=device_id, key_id=key_id, reason=reason)
                ctx.audit.append("key_refused", device_id, key_id=key_id, reason=reason, seq=ev.seq)
                continue
            _entry, data_key = ctx.keystore.unwrap(key_id)
            try:
                aad = key_aad(device_id, ev.nonce)
                wrapped = keywrap.wrap_key(ev.enclave_key, data_key, lease, key_id=key_id, aad=aad)
            finally:
                data_key[:] = bytes(len(data_key))
            renew_at = lease.until - policy.renew_margin_s
            released.append(messages.ReleasedKey(key_id, wrapped, aad, lease.until, renew_at))
            log.info("key_released", device=device_id, key_id=key_id)
            ctx.audit.append(
                "key_released", device_id, key_id=key_id, seq=ev.seq, mrenclave=ev.enclave.mrenclave
            )
            ctx.count("keys_released")
        ctx.count("keys_refused", len(refused))
        response = messages.KeyResponse(ev.nonce, tuple(released), tuple(refused))
        topic = topics.device_topic(device_id, topics.KEYS_RESPONSE)
        try:  # paho keeps it in flight: no wait for the PUBACK holds the driven loop
            ctx.mqtt.publish(topic, response.encode(), wait=False)
        except MqttError as e:
            if released:  # `key_released` above said the keys were wrapped, not delivered
                key_ids = [k.key_id for k in released]
                ctx.audit.append(
                    "key_response_not_published",
                    device_id,
                    key_ids=key_ids,
                    seq=ev.seq,
                    reason=str(e)[:200],
                )
            raise

    def _refusal(self, key_id: str, ev: Evidence, status: str) -> str | None:
        if status != "affirming":
            return f"attestation result is {status}"
        try:
            entry = self._ctx.keystore.entry(key_id)
        except StrongroomError:
            return "unknown key"
        return refusal(entry, ev, self._ctx.policy)
