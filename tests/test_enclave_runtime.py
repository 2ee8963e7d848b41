"""The enclave runtime in-process, against an in-memory platform (our own seam): zeroisation."""

from __future__ import annotations

import socket
import sys
import types

from agent.channel import Channel
from agent.enclave_app.runtime import Enclave
from strongroom.artifact import ArtifactManifest
from strongroom.signing import SigningKey


class _NoPlatform:
    """Stands in for the platform channel; these tests never reach the platform."""


def _manifest(name: str, kind: str) -> ArtifactManifest:
    return ArtifactManifest(
        name=name,
        version=1,
        kind=kind,
        size=0,
        sha256="0" * 64,
        chunk_size=16,
        min_svn=0,  # type: ignore[arg-type]
        key_id="k",
        key_check=bytes(32),
        nonce_prefix=bytes(7),
        signer_key=SigningKey.generate().verify_key,
    )


def _enclave() -> Enclave:
    policy = types.SimpleNamespace(ARTIFACT_SIGNER="00" * 32, SEAL_POLICY="signer")
    host, _peer = socket.socketpair()
    return Enclave(_NoPlatform(), Channel(host), policy, [])  # type: ignore[arg-type]


def test_wipe_zeroises_plaintext_and_unloads_protected_modules() -> None:
    enclave = _enclave()
    code = bytearray(b"SECRET = 'zeroise-me'\n")
    model = bytearray(b"model-bytes-zeroise-me")
    enclave._install(_manifest("zcode", "code"), code)
    enclave._install(_manifest("zmodel", "model"), model)
    module = __import__("zcode")
    assert module.SECRET == "zeroise-me"
    assert enclave.model("zmodel") is model

    enclave.wipe()

    assert code == bytes(len(code)) and model == bytes(len(model))
    assert "zcode" not in sys.modules
    assert not any(getattr(f, "provides", None) and f.provides("zcode") for f in sys.meta_path)


def test_reloading_an_artifact_wipes_the_previous_plaintext() -> None:
    enclave = _enclave()
    first = bytearray(b"first-plaintext")
    enclave._install(_manifest("zmodel2", "model"), first)
    enclave._install(_manifest("zmodel2", "model"), bytearray(b"second"))
    assert first == bytes(len(first))
    assert enclave.model("zmodel2") == bytearray(b"second")
    enclave.wipe()
