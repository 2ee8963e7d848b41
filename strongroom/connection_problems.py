"""Why a connection to the broker failed, as one of a few named causes with what to do.

Pure: an exception, a CONNACK code or a certificate in, a `ConnectionProblem` out. The MQTT
adapter (strongroom/mqtt.py) gathers the evidence (the exception, a CONNACK, a probe) and logs a
cause once, when it changes; `strongroom doctor` reports the same problems.
"""

from __future__ import annotations

import datetime as dt
import errno
import socket
import ssl
from dataclasses import dataclass

from strongroom.errors import FormatError

# Why a connection failed, as one of a few named causes with what to do. Classification is pure
# (an exception or a CONNACK code in, a ConnectionProblem out); the client below gathers the
# evidence (the exception, a CONNACK, a probe) and logs a cause once, when it changes.

REFUSED = "refused"  # nothing listens there
UNKNOWN_HOST = "unknown_host"
UNREACHABLE = "unreachable"
TIMEOUT = "timeout"
PLAINTEXT = "plaintext_port"  # the port answers without TLS
UNKNOWN_CA = "unknown_ca"  # the broker's certificate is not signed by our CA
WRONG_HOST_NAME = "wrong_host_name"
BROKER_CERTIFICATE_INVALID = "broker_certificate_invalid"  # expired or not yet valid
CERTIFICATE_REJECTED = "certificate_rejected"  # the broker refused our client certificate
CERTIFICATE_EXPIRED = "certificate_expired"  # our own, checked locally
CERTIFICATE_NOT_YET_VALID = "certificate_not_yet_valid"  # our own, checked locally
CERTIFICATE_REVOKED = "certificate_revoked"
NOT_AUTHORISED = "not_authorised"  # CONNACK: bad credentials, not authorised, banned
UNSUPPORTED_PROTOCOL = "unsupported_protocol"  # CONNACK: the broker does not speak our MQTT
REFUSED_BY_BROKER = "refused_by_broker"  # another CONNACK refusal
SESSION_TAKEN_OVER = "session_taken_over"  # another client connected with our client id
CONNECTION_LOST = "connection_lost"
TLS_ERROR = "tls_error"
NETWORK_ERROR = "network_error"

CONNECT_TIMEOUT_S = 5.0  # TCP connect and TLS handshake (paho's own default, stated here)
CONNACK_TIMEOUT_S = 10.0  # from the handshake to the broker's CONNACK
STABLE_S = 30.0  # a connection up this long ends a streak: its loss is news, logged again
TAKEOVER_LOSSES = 3  # connections closed in a row before STABLE_S: taken over, we assume

# OpenSSL verify codes (x509_vfy.h) of a broker certificate our CA does not vouch for
_UNTRUSTED_CODES = frozenset({2, 18, 19, 20, 21, 27, 28, 32})
_HOST_CODES = frozenset({62, 63, 64})  # host name, email, IP address mismatch
_EXPIRED_CODE, _NOT_YET_VALID_CODE = 10, 9
# OpenSSL reasons meaning the other end does not speak TLS (it sent bytes that are no record)
_NOT_TLS_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"}
)
_NOT_AUTHORISED_CODES = frozenset({0x86, 0x87, 0x8A, 0x8C})  # v3.1.1's 4 and 5 map to 0x86, 0x87
TLS_HINT = "check that the broker URL names this fleet's broker and its TLS port"


@dataclass(frozen=True)
class ConnectionProblem:
    """Why the client is not connected: a stable `cause` (one of the names above), what was
    seen (`detail`, one line) and what to do (`hint`)."""

    cause: str
    detail: str
    hint: str

    def line(self) -> str:
        return f"{self.cause}: {self.detail}; {self.hint}"


@dataclass(frozen=True)
class CertificateValidity:
    """The validity period of our own client certificate, read once from its file."""

    subject: str
    not_before: dt.datetime
    not_after: dt.datetime

    def problem(self, now: dt.datetime) -> ConnectionProblem | None:
        """Our certificate's own fault at `now`, if it has one (expired, not yet valid)."""
        if now > self.not_after:
            return ConnectionProblem(
                CERTIFICATE_EXPIRED,
                f"our certificate ({self.subject}) expired on {self.not_after:%Y-%m-%d %H:%M} UTC",
                "have the fleet operator re-enroll this device (a new bundle), or fix this "
                "machine's clock if it is wrong",
            )
        if now < self.not_before:
            return ConnectionProblem(
                CERTIFICATE_NOT_YET_VALID,
                f"our certificate ({self.subject}) is valid only from "
                f"{self.not_before:%Y-%m-%d %H:%M} UTC",
                "this machine's clock is probably behind: set it right (e.g. enable NTP)",
            )
        return None


def certificate_validity(cert_pem: bytes) -> CertificateValidity:
    """The subject and validity of a PEM certificate; FormatError if it is none."""
    # cryptography's X.509 costs tens of milliseconds to import: only when a certificate is read
    from cryptography import x509  # noqa: PLC0415

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise FormatError("not a PEM certificate") from e
    return CertificateValidity(
        cert.subject.rfc4514_string(), cert.not_valid_before_utc, cert.not_valid_after_utc
    )


def rejected_by_broker(
    reason: str, where: str, own: CertificateValidity | None, now: dt.datetime
) -> ConnectionProblem:
    """The broker's TLS alert about our certificate (`reason`: OpenSSL's name for it), made
    precise by our own look at the certificate: an expiry we can see is named as such."""
    local = own.problem(now) if own is not None else None
    if local is not None:
        return local
    if reason == "SSLV3_ALERT_CERTIFICATE_REVOKED":
        return ConnectionProblem(
            CERTIFICATE_REVOKED,
            f"{where} says our certificate is revoked",
            "the fleet revoked or re-enrolled this device: ask its operator (device reinstate, "
            "or a new bundle)",
        )
    if reason == "TLSV1_ALERT_UNKNOWN_CA":
        said = "does not know the CA that issued our certificate"
        hint = "this bundle belongs to another fleet, or the broker to another: check both"
    elif reason == "SSLV3_ALERT_CERTIFICATE_EXPIRED":
        said = "says our certificate has expired (by its clock, not ours)"
        hint = "check the broker's clock, or have the device re-enrolled"
    elif reason:
        said = f"refused our certificate ({reason.lower().replace('_', ' ')})"
        hint = "check that this bundle was enrolled in the broker's fleet and is not revoked"
    else:
        said = "closed the connection right after the TLS handshake, before any answer"
        hint = "it refused our certificate: check that this bundle belongs to the broker's fleet"
    return ConnectionProblem(CERTIFICATE_REJECTED, f"{where} {said}", hint)


def classify_error(
    error: BaseException,
    where: str,
    own: CertificateValidity | None = None,
    now: dt.datetime | None = None,
) -> ConnectionProblem:
    """A failed TCP connect or TLS handshake with the broker at `where` (host:port), named.
    `own`: our certificate's validity, so that the broker's complaint about it is made precise."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return _unverified_broker(error, where)
    if isinstance(error, ssl.SSLError):
        return _tls_failure(error, where, own, now or dt.datetime.now(dt.UTC))
    return _network_failure(error, where)


def _network_failure(error: BaseException, where: str) -> ConnectionProblem:
    if isinstance(error, ConnectionRefusedError):
        return ConnectionProblem(
            REFUSED,
            f"nothing listens at {where} (connection refused)",
            "check the broker URL's host and port, and that the broker runs",
        )
    if isinstance(error, socket.gaierror):
        return ConnectionProblem(
            UNKNOWN_HOST,
            f"cannot resolve {where.rpartition(':')[0]}: {error.strerror}",
            "check the host name in the broker URL and this machine's DNS",
        )
    if isinstance(error, TimeoutError):
        return ConnectionProblem(
            TIMEOUT,
            f"no answer from {where} within {CONNECT_TIMEOUT_S:g} s",
            "check the address, the firewall, and that this port is the broker's TLS port",
        )
    if isinstance(error, OSError) and error.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return ConnectionProblem(
            UNREACHABLE,
            f"{where} is unreachable ({error.strerror})",
            "check the broker's address and this machine's network",
        )
    return ConnectionProblem(
        NETWORK_ERROR,
        f"cannot connect to {where}: {getattr(error, 'strerror', None) or error}",
        "check the broker URL and the network",
    )


def _unverified_broker(error: ssl.SSLCertVerificationError, where: str) -> ConnectionProblem:
    """Our side refused the broker's certificate."""
    code, message = error.verify_code, error.verify_message
    if code in _HOST_CODES:
        return ConnectionProblem(
            WRONG_HOST_NAME,
            f"the broker's certificate is not valid for the name we used ({message})",
            "connect by a name the broker's certificate was issued for (the fleet's broker "
            "certificate names localhost, 127.0.0.1 and ::1 unless reissued)",
        )
    if code in (_EXPIRED_CODE, _NOT_YET_VALID_CODE):
        return ConnectionProblem(
            BROKER_CERTIFICATE_INVALID,
            f"the broker's certificate is not valid now ({message})",
            "check this machine's clock, or have the fleet operator renew the broker's certificate",
        )
    if code in _UNTRUSTED_CODES:
        return ConnectionProblem(
            UNKNOWN_CA,
            f"the broker at {where} has a certificate our CA did not sign ({message})",
            "this is another fleet's broker, or this bundle another fleet's: check the "
            "broker URL and the bundle (tls/ca.pem)",
        )
    return ConnectionProblem(
        TLS_ERROR, f"the broker's certificate failed verification ({message})", TLS_HINT
    )


def _tls_failure(
    error: ssl.SSLError, where: str, own: CertificateValidity | None, now: dt.datetime
) -> ConnectionProblem:
    """A TLS failure other than our verdict on the broker's certificate."""
    reason = getattr(error, "reason", None) or ""
    if reason in _NOT_TLS_REASONS:
        return ConnectionProblem(
            PLAINTEXT,
            f"{where} answered the TLS handshake with something that is not TLS",
            "this is a plaintext port: use the broker's TLS port (8883 by default)",
        )
    if "ALERT" in reason and "PROTOCOL_VERSION" not in reason:
        return rejected_by_broker(reason, f"the broker at {where}", own, now)
    return ConnectionProblem(TLS_ERROR, f"TLS with {where} failed: {error}", TLS_HINT)


def classify_connack(reason: int, text: str, where: str) -> ConnectionProblem:
    """A CONNACK refusal (an MQTT 5 reason code; paho maps 3.1.1's return codes onto them)."""
    if reason in _NOT_AUTHORISED_CODES:
        return ConnectionProblem(
            NOT_AUTHORISED,
            f"the broker at {where} refused us: {text}",
            "the broker does not accept this identity: check that the certificate has the "
            "device id as its CN and that the broker runs the fleet's generated configuration",
        )
    if reason == 0x84:
        return ConnectionProblem(
            UNSUPPORTED_PROTOCOL,
            f"the broker at {where} does not speak this MQTT version ({text})",
            "pass --mqtt 3.1.1 (the embedded broker speaks only 3.1.1)",
        )
    return ConnectionProblem(
        REFUSED_BY_BROKER,
        f"the broker at {where} refused the connection: {text}",
        "see the broker's log for why",
    )


def classify_disconnect(
    reason: int, text: str, where: str, short_lived: int = 0
) -> ConnectionProblem:
    """The connection ended after it was up (`reason`: the broker's DISCONNECT code, or 0).
    `short_lived`: how many connections in a row the broker closed soon after accepting them,
    what a second client with our identity causes when the broker says nothing (Mosquitto
    2.0.11 closes the older connection without a DISCONNECT)."""
    if reason == 0x8E or short_lived >= TAKEOVER_LOSSES:
        seen = (
            "says another client took our session"
            if reason == 0x8E
            else f"closed our connection {short_lived} times in a row soon after accepting it"
        )
        return ConnectionProblem(
            SESSION_TAKEN_OVER,
            f"the broker at {where} {seen}: another client connects with our identity",
            "two processes use one identity: is a second agent (or verifier instance) running "
            "with this bundle?",
        )
    return ConnectionProblem(
        CONNECTION_LOST,
        f"the connection to {where} was lost ({text})",
        "reconnecting; if this repeats, see the broker's log",
    )
