"""Where a virtual device's enclave runs: in the simulator's process (`inline`) or as the real
platform and enclave processes (`process`, through `EnclaveHost`). Both make real evidence with
the device's real simulated platform, open released keys and artifacts with real code, and obey
a signed revoke command. They are what the device protocol's actions (`agent.protocol`) are
carried out with; the protocol itself is not here."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Protocol

from agent.host import EnclaveHost, HostConfig, WrappedKey
from device_sim.inline import InlineEnclave, image_identity
from strongroom.signing import VerifyKey


class Attester(Protocol):
    async def start(self) -> None: ...

    async def evidence(self, nonce: bytes | None = None) -> bytes: ...

    async def open_artifact(self, path: Path, key_id: str, wrapped: bytes, aad: bytes) -> None: ...

    async def revoke(self, command: bytes) -> str: ...

    async def stop(self) -> None: ...


class InlineAttester:
    def __init__(self, bundle: Path, image: Path, signer: VerifyKey, verifier: VerifyKey) -> None:
        """`signer`: the fleet's artifact signer; `verifier`: the key that signs commands (both
        in the image's own policy, for a real enclave)."""
        self.bundle, self.image, self.signer, self.verifier = bundle, image, signer, verifier
        self.enclave: InlineEnclave | None = None

    async def start(self) -> None:
        # the image's signature is checked and it is measured, as the platform does at launch
        self.enclave = InlineEnclave.load(self.bundle, image_identity(self.image.read_bytes()))

    async def evidence(self, nonce: bytes | None = None) -> bytes:
        assert self.enclave is not None  # noqa: S101 - started first
        return self.enclave.evidence(nonce)

    async def open_artifact(self, path: Path, key_id: str, wrapped: bytes, aad: bytes) -> None:
        assert self.enclave is not None  # noqa: S101 - started first
        self.enclave.open_artifact(path, wrapped, key_id, aad, self.signer)

    async def revoke(self, command: bytes) -> str:
        assert self.enclave is not None  # noqa: S101 - started first
        return self.enclave.revoke(command, self.verifier)

    async def stop(self) -> None:
        self.enclave = None


class ProcessAttester:
    def __init__(self, bundle: Path, image: Path, state_dir: Path) -> None:
        self.image = image
        # the simulator's devices all run as the simulator's user, by design
        config = HostConfig(bundle=bundle, state_dir=state_dir, separation_required=False)
        self.host = EnclaveHost(config)

    async def start(self) -> None:
        await asyncio.to_thread(self.host.start, self.image)

    async def evidence(self, nonce: bytes | None = None) -> bytes:
        return await asyncio.to_thread(self.host.evidence, nonce or os.urandom(32))

    async def open_artifact(self, path: Path, key_id: str, wrapped: bytes, aad: bytes) -> None:
        await asyncio.to_thread(self.host.load_artifact, path, WrappedKey(wrapped, aad))

    async def revoke(self, command: bytes) -> str:
        return await asyncio.to_thread(self.host.revoke, command)

    async def stop(self) -> None:
        await asyncio.to_thread(self.host.stop)
