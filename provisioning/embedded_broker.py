"""`strongroom broker run --embedded`: an in-process MQTT broker (amqtt) for demos on machines
without Mosquitto. It speaks MQTT 3.1.1 only, so clients connect with `--mqtt 3.1.1`.

It enforces what Mosquitto enforces here: TLS with a client certificate from the fleet CA
(required), the certificate CN as the only identity a client may use as its client id, and the
fleet's ACL rules (`provisioning.broker_config.ACL_RULES`, shared with Mosquitto's ACL file). It
keeps no state on disk and has no packet-size cap of Mosquitto's kind; security properties are
tested against Mosquitto, which is what a fleet should run.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from cryptography import x509
from cryptography.x509.oid import NameOID

from provisioning.broker_config import DASHBOARD, DEVICE, READ, VERIFIER, WRITE, acl_allows
from provisioning.home import DASHBOARD_CN, VERIFIER_CN, FleetHome


def _cert_cn(session: Any) -> str | None:
    ssl_object = getattr(session, "ssl_object", None)
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return None
    names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def _role(identity: str) -> str:
    """Role identities start with "_", which no device id may: `_verifier`, `_verifier-N`,
    `_dashboard`, `_dashboard-N`. Anything else is a device."""
    if identity.startswith(VERIFIER_CN):
        return VERIFIER
    if identity == DASHBOARD_CN or identity.startswith(f"{DASHBOARD_CN}-"):
        return DASHBOARD
    return DEVICE


class CertificateAuth(BaseAuthPlugin):
    """A client must present a fleet certificate whose CN equals its client id."""

    @dataclass
    class Config:
        pass

    async def authenticate(self, *, session: Any) -> bool | None:
        cn = _cert_cn(session)
        return cn is not None and cn == session.client_id


class FleetAcl(BaseTopicPlugin):
    """The fleet ACL, evaluated per publish, subscribe and delivery."""

    @dataclass
    class Config:
        pass

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        if session is None or topic is None:
            return False
        identity = _cert_cn(session) or ""
        role = _role(identity)
        access = WRITE if action == Action.PUBLISH else READ
        return acl_allows(role, identity, access, topic)


class _TlsBroker(Broker):
    @staticmethod
    def _create_ssl_context(listener: Any) -> ssl.SSLContext:
        context: ssl.SSLContext = Broker._create_ssl_context(listener)
        context.verify_mode = ssl.CERT_REQUIRED  # amqtt's default only asks for a certificate
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


def broker_config(home: FleetHome, port: int, bind: str) -> dict[str, Any]:
    return {
        "listeners": {
            "default": {
                "type": "tcp",
                "bind": f"{bind}:{port}",
                "ssl": True,
                "cafile": str(home.ca_cert),
                "certfile": str(home.root / "broker" / "server.pem"),
                "keyfile": str(home.root / "broker" / "server.key"),
            }
        },
        "plugins": {
            f"{__name__}.CertificateAuth": {},
            f"{__name__}.FleetAcl": {},
        },
    }


async def serve(home: FleetHome, port: int, bind: str, stop: asyncio.Event) -> None:
    broker = _TlsBroker(broker_config(home, port, bind))
    await broker.start()
    try:
        await stop.wait()
    finally:
        await broker.shutdown()


def run_embedded(home: FleetHome, port: int, bind: str) -> None:
    """Run until SIGTERM or SIGINT."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await serve(home, port, bind, stop)

    asyncio.run(main())
