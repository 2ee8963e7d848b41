"""Builders for enclave tests: a fleet, enrolled devices, enclave images and sealed artifacts.

Everything is real: real keys, real images built from the standard enclave source, real artifacts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from agent.enclave_source import write_enclave_source
from agent.host import EnclaveHost, HostConfig, WrappedKey
from provisioning.build import build_enclave
from provisioning.devkeys import dev_wrapped_key
from provisioning.enroll import enroll_device
from provisioning.home import FleetHome, init_home
from provisioning.seal import seal_artifact
from strongroom import bundle, canonical

# Unique markers: they must never appear outside the enclave except in declared results.
CODE_MARKER = "SR-CODE-MARKER-7f3a9c1e"
MODEL_MARKER = b"SR-MODEL-MARKER-b24d08e6"

PROTECTED_CODE = f'''
import strongroom_enclave

_SECRET = "{CODE_MARKER}"


def echo(value):
    return {{"echo": value}}


def model_size(name):
    return len(strongroom_enclave.model_bytes(name))


def model_has_marker(name):
    return {MODEL_MARKER!r} in strongroom_enclave.model_bytes(name)


def secret_length(_):
    return len(_SECRET)


def fail(_):
    raise ValueError("bad input")


def syntax(_):
    exec("def broken(:")


def crash(_):
    import os
    os._exit(9)


def spin(_):
    while True:
        pass


def stubborn(_):
    import signal
    signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGALRM}})
    while True:
        pass


def not_json(_):
    return {{1, 2}}


def huge(_):
    return "x" * (2 * 1024 * 1024)
'''


@dataclass
class DeviceEnv:
    root: Path
    home: FleetHome
    bundles: dict[str, Path] = field(default_factory=dict)
    images: dict[str, Path] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)

    def enroll(self, device_id: str, **kwargs: object) -> Path:
        out = self.root / f"bundle-{device_id}"
        enroll_device(self.home, device_id, out, **kwargs)  # type: ignore[arg-type]
        self.bundles[device_id] = out
        return out

    def set_profile(self, device_id: str, **changes: object) -> None:
        """Change a device's simulated platform (as a different physical platform would be)."""
        path = self.bundles[device_id] / bundle.PROFILE_FILE
        doc = json.loads(path.read_bytes())
        doc.update(changes)
        path.write_bytes(canonical.dumps(doc))

    def build(
        self,
        name: str,
        *,
        svn: int = 1,
        debug: bool = False,
        home: FleetHome | None = None,
        extra: dict[str, str] | None = None,
        **policy: object,
    ) -> Path:
        src = self.root / f"src-{name}"
        write_enclave_source(
            src,
            self.home.verify_key("artifact"),
            self.home.result_verify_key(),
            **policy,  # type: ignore[arg-type]
        )
        for rel, text in (extra or {}).items():
            (src / rel).write_text(text)
        out = self.root / f"{name}.img"
        build_enclave(home or self.home, src, out, svn=svn, debug=debug)
        self.images[name] = out
        return out

    def seal(self, name: str, data: bytes, *, kind: str, version: int = 1, **kw: object) -> Path:
        src = self.root / f"plain-{name}-{version}"
        src.write_bytes(data)
        out = self.root / f"{name}-v{version}.sra"
        seal_artifact(self.home, src, out, name=name, version=version, kind=kind, **kw)  # type: ignore[arg-type]
        src.unlink()
        self.artifacts[f"{name}@{version}"] = out
        return out

    def host(self, device_id: str, *, production: bool = False, state: str = "") -> EnclaveHost:
        state_dir = self.root / f"state-{state or device_id}"
        config = HostConfig(
            bundle=self.bundles[device_id],
            state_dir=state_dir,
            production=production,
            invoke_timeout_s=5,
            separation_required=False,  # the separated mode: tests/test_privilege_separation.py
        )
        return EnclaveHost(config)

    def key_for(self, host: EnclaveHost, artifact: Path) -> WrappedKey:
        assert host.enclave is not None
        return dev_wrapped_key(self.home.root, host.enclave, artifact)


def make_env(root: Path) -> DeviceEnv:
    env = DeviceEnv(root=root, home=init_home(root / "home"))
    env.enroll("dev-a")
    env.seal("vendor", PROTECTED_CODE.encode(), kind="code")
    env.seal("model", b"\x00" * 1000 + MODEL_MARKER + b"\x01" * 5000, kind="model")
    env.build("debug", debug=True)
    return env
