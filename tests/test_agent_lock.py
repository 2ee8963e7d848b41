"""One agent per bundle: a second `agent run` is refused with one line naming the holder, and the
first one keeps serving; the local API never removes a socket it did not make."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from agent.local_api import LocalApi, call
from agent.lock import AgentLock, AgentRunning
from strongroom.errors import EnvironmentFault, InputError
from tests.fleet import Fleet, cli, short_socket_dir, wait_until


def test_a_second_lock_on_one_state_directory_names_the_holder(tmp_path: Path) -> None:
    first = AgentLock.acquire(tmp_path)
    assert first is not None
    try:
        with pytest.raises(AgentRunning) as raised:
            AgentLock.acquire(tmp_path)  # another open file description: flock refuses it
        assert f"PID {os.getpid()}" in str(raised.value)
        assert "\n" not in raised.value.diagnostics()
    finally:
        first.release()
    again = AgentLock.acquire(tmp_path)  # released: free again, the file left in place
    assert again is not None
    again.release()
    assert (tmp_path / "agent.lock").stat().st_mode & 0o077 == 0


def test_the_lock_is_not_taken_through_a_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(EnvironmentFault):
        AgentLock.acquire(tmp_path / "link")
    assert AgentLock.acquire(tmp_path / "missing") is None


def _echo(entrypoint: str, value: object) -> object:
    return {"entrypoint": entrypoint, "value": value}


def test_a_served_socket_is_neither_taken_nor_removed() -> None:
    d = short_socket_dir()
    path = d / "agent.sock"
    first = LocalApi(path, _echo).start()
    try:
        with pytest.raises(EnvironmentFault, match="another process serves"):
            LocalApi(path, _echo)
        assert call(path, "m:f", 1)["value"] == 1
    finally:
        first.stop()
    assert not path.exists()


def test_stop_leaves_a_socket_that_replaced_its_own() -> None:
    d = short_socket_dir()
    path = d / "agent.sock"
    api = LocalApi(path, _echo).start()
    path.unlink()  # someone else's socket now lives at the path
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(path))
    try:
        api.stop()
        assert path.exists()
    finally:
        other.close()


def test_a_stale_socket_is_replaced_and_a_plain_file_is_refused() -> None:
    d = short_socket_dir()
    stale = d / "stale.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(stale))
    leftover.close()  # nobody listens: what a killed agent leaves
    api = LocalApi(stale, _echo).start()
    try:
        assert call(stale, "m:f", 2)["value"] == 2
    finally:
        api.stop()
    plain = d / "not-a-socket"
    plain.write_text("keep me")
    with pytest.raises(InputError, match="not a socket"):
        LocalApi(plain, _echo)
    assert plain.read_text() == "keep me"


def test_a_second_agent_on_one_bundle_is_refused_and_the_first_keeps_serving(
    fleet: Fleet,
) -> None:
    fleet.start()
    fleet.enroll("cam-1")
    first = fleet.agent("cam-1")
    assert fleet.observer is not None
    fleet.observer.wait_result("cam-1", "affirming")
    wait_until(
        lambda: fleet.invoke("cam-1", "vendor:echo", "1").returncode == 0, 30, "the first agent"
    )
    second = subprocess.run(
        cli(
            "agent",
            "run",
            "--bundle",
            str(fleet.root / "cam-1"),
            "--broker",
            fleet.broker.url,
            "--socket",
            str(fleet.socket("cam-1")),
            "--no-privilege-separation",
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode != 0
    errors = [line for line in second.stderr.splitlines() if line.startswith("strongroom: error")]
    assert len(errors) == 1, second.stderr
    assert f"PID {first.p.pid}" in errors[0] and "already running" in errors[0]
    assert "Traceback" not in second.stderr
    assert first.p.poll() is None
    answer = fleet.invoke("cam-1", "vendor:echo", '{"after": true}')  # its socket still works
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout) == {"echo": {"after": True}}
