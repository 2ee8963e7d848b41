"""Local attestation reports: what the platform says about an enclave it launched.

A report binds the enclave's identity (MRENCLAVE, MRSIGNER, product id, SVN, debug attribute), the
platform's claims (firmware, debug mode, secure boot, SMT) and 64 bytes of report data chosen by the
enclave, under an HMAC-SHA256 keyed with a report key that only the platform can derive from its
root secret (as SGX's EREPORT/EGETKEY). Pure; a wire format of both sides: the platform and the
enclave make and check reports, and the verifier recomputes the key binding (`key_binding`) that
evidence carries. It lives in the core so that the fleet side never imports the device's.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import cbor2

from strongroom.image import EnclaveIdentity

REPORT_DATA_SIZE = 64
MAC_SIZE = 32
KEY_BINDING_DOMAIN = b"strongroom/enclave-key-binding/v1\x00"


class ReportError(Exception):
    """A report is malformed or its MAC does not verify."""


@dataclass(frozen=True)
class PlatformClaims:
    firmware: str
    debug: bool
    secure_boot: bool
    smt: bool | None  # None: the platform could not tell


@dataclass(frozen=True)
class Report:
    identity: EnclaveIdentity
    claims: PlatformClaims
    report_data: bytes

    def body(self) -> bytes:
        return cbor2.dumps(
            {
                "mrenclave": self.identity.mrenclave,
                "mrsigner": self.identity.mrsigner,
                "product_id": self.identity.product_id,
                "svn": self.identity.svn,
                "debug": self.identity.debug,
                "firmware": self.claims.firmware,
                "platform_debug": self.claims.debug,
                "secure_boot": self.claims.secure_boot,
                "smt": self.claims.smt,
                "report_data": self.report_data,
            },
            canonical=True,
        )

    @classmethod
    def from_body(cls, body: bytes) -> Report:
        try:
            d: Any = cbor2.loads(body)
            identity = EnclaveIdentity(
                str(d["mrenclave"]),
                str(d["mrsigner"]),
                int(d["product_id"]),
                int(d["svn"]),
                bool(d["debug"]),
            )
            claims = PlatformClaims(
                str(d["firmware"]),
                bool(d["platform_debug"]),
                bool(d["secure_boot"]),
                None if d["smt"] is None else bool(d["smt"]),
            )
            data = d["report_data"]
        except Exception as e:  # any malformed field is the same failure
            raise ReportError("malformed report") from e
        if not isinstance(data, bytes) or len(data) != REPORT_DATA_SIZE:
            raise ReportError("report data must be 64 bytes")
        return cls(identity, claims, data)


def mac_report(report_key: bytes, body: bytes) -> bytes:
    return hmac.new(report_key, body, hashlib.sha256).digest()


def verify_report(report_key: bytes, body: bytes, mac: bytes) -> Report:
    if not hmac.compare_digest(mac_report(report_key, body), mac):
        raise ReportError("report MAC does not verify: not issued by this platform")
    return Report.from_body(body)


def key_binding(public_key: bytes, nonce: bytes = b"") -> bytes:
    """The report data that binds an enclave's ephemeral public key (and a verifier nonce)."""
    framed = len(nonce).to_bytes(2, "big") + nonce + public_key
    return hashlib.sha512(KEY_BINDING_DOMAIN + framed).digest()
