"""Plaintext never leaves the enclave: not to disk, not to the host, not to other processes."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent.channel import Channel
from tests.enclave_env import CODE_MARKER, MODEL_MARKER, DeviceEnv
from tests.privileges import unprivileged

MARKERS = (CODE_MARKER.encode(), MODEL_MARKER)


def _files_containing(root: Path, needles: tuple[bytes, ...]) -> list[Path]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(n in data for n in needles):
                hits.append(path)
    return hits


def test_markers_appear_nowhere_on_disk_nor_in_what_the_host_received(
    device_env: DeviceEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[bytes] = []
    real_recv = Channel.recv

    def recording_recv(self: Channel, timeout: float | None = None) -> dict[str, Any]:
        msg = real_recv(self, timeout)
        received.append(cbor2.dumps(msg))
        return msg

    monkeypatch.setattr(Channel, "recv", recording_recv)
    started = time.time()
    code, model = device_env.artifacts["vendor@1"], device_env.artifacts["model@1"]
    results = []
    with device_env.host("dev-a") as host:
        host.start(device_env.images["debug"])
        host.load_artifact(code, device_env.key_for(host, code))
        host.load_artifact(model, device_env.key_for(host, model))
        results.append(host.invoke("vendor:secret_length", None))
        results.append(host.invoke("vendor:model_has_marker", "model"))
        results.append(host.invoke("vendor:model_size", "model"))
    with device_env.host("dev-a") as host:  # and again from sealed keys
        host.start(device_env.images["debug"])
        host.load_artifact(code)
        host.load_artifact(model)
        results.append(host.invoke("vendor:model_has_marker", "model"))
    assert results == [len(CODE_MARKER), True, 6024, True]  # the enclave did see the plaintext

    assert len(received) > 10
    assert not [m for m in received if any(n in m for n in MARKERS)]
    # bundle, host state, fleet home, images, artifacts: everything the test created
    assert _files_containing(device_env.root, MARKERS) == []
    tmp = Path(tempfile.gettempdir())
    fresh = [p for p in tmp.iterdir() if p.is_file() and p.stat().st_mtime >= started]
    assert [p for p in fresh if any(n in p.read_bytes() for n in MARKERS)] == []


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from agent.host import EnclaveHost, HostConfig
    from provisioning.devkeys import dev_wrapped_key
    from strongroom import logs
    logs.configure("error")
    root, image, code, home = (Path(a) for a in sys.argv[1:5])
    host = EnclaveHost(HostConfig(bundle=root, state_dir=root.parent / "state-nonroot",
                                  production=False))
    info = host.start(image)
    host.load_artifact(code, dev_wrapped_key(home, info, code))
    assert host.invoke("vendor:secret_length", None) > 0
    print(info.pid, flush=True)
    sys.stdin.readline()
    host.stop()
    """
)

_READER = textwrap.dedent(
    """
    import sys
    pid = int(sys.argv[1])
    try:
        maps = open(f"/proc/{pid}/maps").read().splitlines()
        start = int(maps[0].split("-")[0], 16)
        with open(f"/proc/{pid}/mem", "rb") as f:
            f.seek(start)
            f.read(16)
        print("READ")
    except PermissionError:
        print("DENIED")
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux /proc")
def test_another_process_of_the_same_user_cannot_read_enclave_memory(
    device_env: DeviceEnv,
) -> None:
    holder = subprocess.Popen(
        unprivileged(
            [
                sys.executable,
                "-c",
                _HOLDER,
                str(device_env.bundles["dev-a"]),
                str(device_env.images["debug"]),
                str(device_env.artifacts["vendor@1"]),
                str(device_env.home.root),
            ]
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    control = subprocess.Popen(unprivileged([sys.executable, "-c", "import time; time.sleep(60)"]))
    try:
        assert holder.stdout is not None
        enclave_pid = int(holder.stdout.readline())
        read = [sys.executable, "-c", _READER]

        def probe(pid: int) -> str:
            out = subprocess.run(
                unprivileged([*read, str(pid)]), capture_output=True, text=True, check=True
            )
            return out.stdout.strip()

        assert probe(control.pid) == "READ"  # an ordinary process of the same user is readable
        assert probe(enclave_pid) == "DENIED"  # the enclave is not
    finally:
        control.kill()
        if holder.stdin is not None:
            holder.stdin.write("\n")
            holder.stdin.flush()
        holder.wait(timeout=20)
