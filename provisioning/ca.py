"""The fleet's X.509 certificate authority (ECDSA P-256), the certificates it issues and its
certificate revocation list (CRL).

P-256 because every common broker (Mosquitto, EMQX, VerneMQ, HiveMQ) and TLS stack accepts it.
Pure: returns keys, certificates and CRLs as objects and PEM bytes; the caller writes them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from strongroom.errors import FormatError, SignatureError

CA_DAYS = 3650
LEAF_DAYS = 825
CLOCK_SKEW = dt.timedelta(minutes=5)  # backdating, so a peer whose clock is behind accepts it

# CRL reason codes (RFC 5280 section 5.3.1) the fleet uses. A hold can be lifted (the entry is
# removed on reinstatement); the others are final.
HOLD = "certificateHold"
SUPERSEDED = "superseded"
KEY_COMPROMISE = "keyCompromise"
_REASONS = {
    HOLD: x509.ReasonFlags.certificate_hold,
    SUPERSEDED: x509.ReasonFlags.superseded,
    KEY_COMPROMISE: x509.ReasonFlags.key_compromise,
}


@dataclass(frozen=True)
class Issued:
    key_pem: bytes
    cert_pem: bytes


def _name(common_name: str, fleet_id: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"Strongroom fleet {fleet_id}"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(fleet_id: str, now: dt.datetime | None = None) -> Issued:
    """A self-signed CA certificate that may sign leaf certificates only."""
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"Strongroom fleet CA {fleet_id}", fleet_id)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def _ca_key(ca: Issued) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FormatError("the fleet CA key is not an ECDSA key")
    return key


def issue(
    ca: Issued,
    fleet_id: str,
    common_name: str,
    *,
    server_names: tuple[str, ...] = (),
    now: dt.datetime | None = None,
) -> Issued:
    """Issue a leaf certificate: a TLS server certificate when `server_names` is given, else a
    client certificate whose CN is the MQTT identity."""
    now = now or dt.datetime.now(dt.UTC)
    ca_key = _ca_key(ca)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, fleet_id))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server_names:
        sans: list[x509.GeneralName] = []
        for n in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def cert_fingerprint(cert_pem: bytes) -> str:
    return x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class CertInfo:
    serial: int
    sha256: str
    not_after: dt.datetime


def cert_info(cert_pem: bytes) -> CertInfo:
    """What a CRL needs to know of a certificate: serial, fingerprint, expiry."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return CertInfo(
        cert.serial_number, cert.fingerprint(hashes.SHA256()).hex(), cert.not_valid_after_utc
    )


@dataclass(frozen=True)
class Revoked:
    """One CRL entry: a certificate's serial number, when and why it was revoked."""

    serial: int
    revoked_at: dt.datetime
    reason: str


@dataclass(frozen=True)
class Crl:
    """A verified CRL: its number (increasing with every new list) and its entries."""

    number: int
    entries: tuple[Revoked, ...]

    def reason(self, serial: int) -> str | None:
        """Why `serial` is listed, or None if it is not."""
        return next((e.reason for e in self.entries if e.serial == serial), None)


def make_crl(
    ca: Issued, number: int, entries: Iterable[Revoked], now: dt.datetime | None = None
) -> bytes:
    """A CRL signed by the fleet CA, valid until the CA itself expires.

    The validity is long because the CRL is not fetched by strangers: `strongroom broker run`
    hands each new list to the broker at once, and a broker holding an expired CRL would refuse
    every client."""
    now = now or dt.datetime.now(dt.UTC)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = _ca_key(ca)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(max(ca_cert.not_valid_after_utc, now + dt.timedelta(days=1)))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    for entry in sorted(entries, key=lambda e: e.serial):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
            .add_extension(x509.CRLReason(_REASONS[entry.reason]), critical=False)
            .build()
        )
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def read_crl(crl_pem: bytes, ca_cert_pem: bytes) -> Crl:
    """Parse a CRL and check that the fleet CA signed it; raise FormatError or SignatureError."""
    try:
        crl = x509.load_pem_x509_crl(crl_pem)
    except ValueError as e:
        raise FormatError("the CRL is not a PEM certificate revocation list") from e
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    except ValueError as e:
        raise FormatError("the fleet CA certificate is not a PEM certificate") from e
    public_key = ca_cert.public_key()
    if crl.issuer != ca_cert.subject or not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise SignatureError("the CRL was not issued by this fleet's CA")
    if not crl.is_signature_valid(public_key):
        raise SignatureError("the CRL's signature does not verify under the fleet CA")
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound as e:
        raise FormatError("the CRL has no CRL number") from e
    names = {flag: name for name, flag in _REASONS.items()}
    entries = []
    for revoked in crl:
        try:
            flag = revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason
        except x509.ExtensionNotFound as e:
            raise FormatError(f"CRL entry {revoked.serial_number:x} has no reason") from e
        if flag not in names:
            raise FormatError(f"CRL entry {revoked.serial_number:x} has an unknown reason")
        entries.append(Revoked(revoked.serial_number, revoked.revocation_date_utc, names[flag]))
    return Crl(number, tuple(entries))
