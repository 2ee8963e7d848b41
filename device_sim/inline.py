"""An enclave's attestation logic run in the simulator's own process (`--enclave inline`).

For fleets of thousands, one enclave process per device is too much for one machine. An inline
enclave drives the device's real simulated platform (`SimulatedPlatform`, loaded from the real
bundle) exactly as the enclave runtime does: a fresh X25519 key, a platform report binding that
key to the verifier's nonce, and the platform's quote of that report as signed evidence. What it
does not do is run in a separate, measured process: its identity is the measured identity of the
image it was given, taken on trust by the simulator (the report says which mode a run used).
It is an enclave, not a device: what a device says and when is the device protocol's
(`agent.protocol`), driven by `device_sim.device`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.enclave_app.attestation import EnclavePolicy, platform_problems
from agent.platform_service import SimulatedPlatform, identity_of
from strongroom import artifact, keywrap
from strongroom.commands import verify_command
from strongroom.errors import IntegrityError, StrongroomError
from strongroom.image import EnclaveIdentity, load_image
from strongroom.report import key_binding, verify_report
from strongroom.signing import VerifyKey


class LocalAttestationFailed(IntegrityError):
    """The platform does not meet the enclave's own policy: it will not attest or decrypt."""


def image_identity(image: bytes) -> EnclaveIdentity:
    """The measured identity of an enclave image (its signature checked)."""
    return identity_of(load_image(image))


@dataclass
class InlineEnclave:
    platform: SimulatedPlatform
    identity: EnclaveIdentity
    artifacts: list[tuple[str, int, str]] = field(default_factory=list)  # name, version, sha256
    policy: EnclavePolicy = field(default_factory=EnclavePolicy)  # the image's own policy
    _key: x25519.X25519PrivateKey | None = None

    @classmethod
    def load(cls, bundle: Path, identity: EnclaveIdentity) -> InlineEnclave:
        return cls(SimulatedPlatform(bundle), identity)

    def evidence(self, nonce: bytes | None = None) -> bytes:
        """Signed evidence answering `nonce` (or with the device's own nonce), binding this
        enclave instance's key (made once per launch, as the enclave runtime does)."""
        if self._key is None:
            self._key = x25519.X25519PrivateKey.generate()
        public = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        nonce = secrets.token_bytes(32) if nonce is None else nonce
        report = self.platform.handle(
            self.identity, {"op": "report", "report_data": key_binding(public, nonce)}
        )
        self._local_attestation(report["body"], report["mac"])
        quote = self.platform.handle(
            self.identity,
            {
                "op": "quote",
                "body": report["body"],
                "mac": report["mac"],
                "nonce": nonce,
                "enclave_key": public,
                "artifacts": [list(a) for a in self.artifacts],
            },
        )
        if quote.get("op") != "evidence":
            raise IntegrityError(f"the platform refused to quote: {quote.get('reason')}")
        token: bytes = quote["token"]
        return token

    def _local_attestation(self, body: bytes, mac: bytes) -> None:
        """The enclave's own check of its platform, as the enclave runtime makes it."""
        key = self.platform.handle(self.identity, {"op": "report_key"})["key"]
        problems = platform_problems(verify_report(key, body, mac), self.policy)
        if problems:
            raise LocalAttestationFailed("; ".join(problems))

    def open_artifact(
        self, path: Path, wrapped: bytes, key_id: str, aad: bytes, signer: VerifyKey
    ) -> None:
        """Open a sealed artifact with a released key, as the enclave loads one: the manifest's
        signer checked, every chunk authenticated, the plaintext wiped once done. The artifact is
        then claimed in the next evidence. StrongroomError if anything does not check out."""
        if self._key is None:
            raise IntegrityError("no evidence was made, so no key can be opened")
        key, _lease = keywrap.unwrap_key(self._key, wrapped, key_id=key_id, aad=aad)
        plaintext = bytearray()
        try:
            with path.open("rb") as f:
                signed = artifact.read_manifest(f)
                manifest = signed.verify(signer)
                plaintext = bytearray(manifest.size)
                for _chunk in artifact.open_stream(f, signed, key, into=plaintext):
                    pass
        finally:
            key[:] = bytes(len(key))
            plaintext[:] = bytes(len(plaintext))
        self.artifacts.append((manifest.name, manifest.version, manifest.sha256))

    def revoke(self, command: bytes, verifier: VerifyKey) -> str:
        """Obey a revoke command signed by the fleet verifier, as the enclave runtime does: the
        command checked, then its key and the artifacts it opened forgotten. The reason, or
        IntegrityError for a command that does not verify."""
        try:
            reason = verify_command(command, verifier).reason
        except StrongroomError as e:
            raise IntegrityError(f"command refused: {e}") from e
        self._key = None
        self.artifacts.clear()
        return reason[:200]
