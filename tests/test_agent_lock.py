"""One agent per bundle: a second `agent run` is refused with one line naming the holder, and the
first one keeps serving; the local API never removes a socket it did not make."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from agent.local_api import LocalApi, call
from agent.lock import PID_FILE, AgentLock, AgentRunning, holder
from strongroom.cli import EXIT_ENVIRONMENT
from strongroom.errors import EnvironmentFault, InputError
from tests.fleet import Fleet, Proc, children_of, cli, short_socket_dir, wait_until


def test_a_second_lock_on_one_bundle_names_the_holder_whatever_its_state(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    first = AgentLock.acquire(bundle, tmp_path / "state-a")
    try:
        with pytest.raises(AgentRunning) as raised:  # another open file description: refused
            AgentLock.acquire(bundle, tmp_path / "state-b")
        assert f"PID {os.getpid()}" in str(raised.value)
        assert "\n" not in raised.value.diagnostics()
        with pytest.raises(AgentRunning, match=r"an agent is running with this bundle \(PID"):
            AgentLock.acquire(bundle, by="enclave run")
        assert holder(bundle) == os.getpid()  # read without taking the lock
    finally:
        first.release()
    assert holder(bundle) is None
    AgentLock.acquire(bundle).release()  # released: free again
    assert os.listdir(bundle) == []  # no file is made in the bundle


def test_the_pid_file_is_written_for_the_holder_and_removed_with_the_lock(tmp_path: Path) -> None:
    lock = AgentLock.acquire(tmp_path)
    lock.record_pid(tmp_path)
    assert (tmp_path / PID_FILE).read_text() == f"{os.getpid()}\n"
    assert (tmp_path / PID_FILE).stat().st_mode & 0o077 == 0
    lock.release()
    assert not (tmp_path / PID_FILE).exists()


def test_the_lock_is_not_taken_through_a_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(EnvironmentFault, match="cannot open the bundle directory"):
        AgentLock.acquire(tmp_path / "link")


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


def _serving_agent(fleet: Fleet) -> Proc:
    fleet.start()
    fleet.enroll("cam-1")
    first = fleet.agent("cam-1")
    assert fleet.observer is not None
    fleet.observer.wait_result("cam-1", "affirming")
    wait_until(
        lambda: fleet.invoke("cam-1", "vendor:echo", "1").returncode == 0, 30, "the first agent"
    )
    return first


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == EXIT_ENVIRONMENT, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("strongroom: error")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def test_a_second_agent_on_one_bundle_is_refused_whatever_its_state_and_the_first_keeps_serving(
    fleet: Fleet, tmp_path: Path
) -> None:
    first = _serving_agent(fleet)
    for state in ([], ["--state", str(tmp_path / "other-state")]):  # the default, and its own
        second = subprocess.run(
            cli(
                "agent",
                "run",
                "--bundle",
                str(fleet.root / "cam-1"),
                "--broker",
                fleet.broker.url,
                "--socket",
                str(fleet.socket("cam-1").with_name("second.sock")),
                *state,
                "--no-privilege-separation",
            ),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        error = _one_error_line(second)
        assert f"PID {first.p.pid}" in error and "already running" in error
    assert not (tmp_path / "other-state").exists()  # refused before anything was made
    assert first.p.poll() is None
    answer = fleet.invoke("cam-1", "vendor:echo", '{"after": true}')  # its socket still works
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout) == {"echo": {"after": True}}


def test_enclave_run_is_refused_while_an_agent_holds_the_bundle(
    fleet: Fleet, tmp_path: Path
) -> None:
    first = _serving_agent(fleet)
    bundle = fleet.root / "cam-1"
    done = subprocess.run(
        cli(
            "enclave",
            "run",
            "vendor:echo",
            "1",
            "--bundle",
            str(bundle),
            "--image",
            str(bundle / "enclave.img"),
            "--state",
            str(tmp_path / "enclave-state"),
            "--no-privilege-separation",
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    error = _one_error_line(done)
    assert f"an agent is running with this bundle (PID {first.p.pid})" in error
    assert not (tmp_path / "enclave-state").exists()  # refused before a platform started
    assert first.p.poll() is None


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_platform_and_enclave_run_outside_the_terminals_group_and_stop_with_the_agent(
    fleet: Fleet, sig: signal.Signals
) -> None:
    agent = _serving_agent(fleet)
    platform = children_of(agent.p.pid)
    assert len(platform) == 1, "the agent's platform process is not running"
    enclave = children_of(platform[0])
    assert len(enclave) == 1, "the enclave process is not running"
    # a Ctrl-C signals the terminal's process group, the agent's: the platform (from its start)
    # and its enclave are in a group of their own
    group = os.getpgid(platform[0])
    assert group != os.getpgid(agent.p.pid)
    assert os.getpgid(enclave[0]) == group
    agent.p.send_signal(sig)
    assert agent.p.wait(30) in (0, 130)
    wait_until(
        lambda: not any(_running(pid) for pid in platform + enclave),
        10,
        "the agent's platform and enclave to stop",
    )
    assert "Traceback" not in agent.log()
