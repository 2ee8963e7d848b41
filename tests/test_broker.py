"""`strongroom broker run` never runs Mosquitto as root: the generated configuration names an
unprivileged user, a broker started by root runs as `mosquitto`, and it can still read all it
needs and write its persistence, with the fleet home private to root."""

from __future__ import annotations

import os
import pwd
import re
import signal
from pathlib import Path

import pytest

from provisioning.broker import BrokerUser, broker_user, write_broker_config
from provisioning.broker_config import BrokerSettings, mosquitto_conf
from provisioning.enroll import enroll_device
from provisioning.home import FleetHome
from strongroom.errors import EnvironmentFault, InputError
from tests.fleet import Broker, wait_until
from tests.mqtt_probe import ACCEPTED, connect_once

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _uids(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uid of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", status, re.MULTILINE)
    assert match is not None
    return [int(u) for u in match.groups()]


def _settings(user: str) -> BrokerSettings:
    p = Path("/x")
    return BrokerSettings(8883, "127.0.0.1", p, p, p, p, p, p, user)


def test_a_configuration_running_the_broker_as_root_is_never_generated() -> None:
    assert "\nuser mosquitto\n" in mosquitto_conf(_settings("mosquitto"))
    with pytest.raises(InputError, match="as root"):
        mosquitto_conf(_settings("root"))


@as_root
@pytest.mark.skipif(not _has_user("mosquitto"), reason="no mosquitto user")
def test_started_by_root_the_broker_is_configured_as_mosquitto(
    fleet_home: FleetHome, tmp_path: Path
) -> None:
    user = broker_user()
    assert user.name == "mosquitto" and user.uid != 0
    place = Broker(fleet_home, 0, tmp_path)  # a state directory outside private directories

    files = write_broker_config(fleet_home, state_dir=place.state_dir)

    conf = files.config.read_text()
    assert re.search(r"^user mosquitto$", conf, re.MULTILINE)
    assert not re.search(r"^user root$", conf, re.MULTILINE)
    owned = [files.state_dir, files.config, files.acl, files.crl, files.data_dir]
    owned += [files.state_dir / n for n in ("ca.pem", "server.pem", "server.key")]
    assert {p.stat().st_uid for p in owned} == {user.uid}
    assert (files.state_dir / "server.key").stat().st_mode & 0o077 == 0


@as_root
def test_without_an_unprivileged_user_root_is_refused(
    fleet_home: FleetHome, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_such_user(name: str) -> pwd.struct_passwd:
        raise KeyError(name)

    monkeypatch.setattr(pwd, "getpwnam", no_such_user)
    with pytest.raises(EnvironmentFault, match="refusing to run the broker as root"):
        broker_user()
    monkeypatch.undo()
    with pytest.raises(InputError, match="root account"):
        broker_user("root")


@as_root
@pytest.mark.skipif(not _has_user("mosquitto"), reason="no mosquitto user")
def test_a_state_directory_the_broker_cannot_reach_is_refused(
    fleet_home: FleetHome, tmp_path: Path
) -> None:
    with pytest.raises(EnvironmentFault, match="cannot reach"):
        write_broker_config(fleet_home, state_dir=tmp_path / "private" / "state")  # under 0700


def test_only_root_may_name_another_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 12345)
    monkeypatch.setattr(
        pwd, "getpwuid", lambda uid: pwd.struct_passwd(("alice", "x", uid, uid, "", "/", "/bin/sh"))
    )
    monkeypatch.setattr(os, "getgrouplist", lambda name, gid: [gid])
    assert broker_user() == BrokerUser("alice", 12345, 12345, (12345,))
    with pytest.raises(InputError, match="only root"):
        broker_user("mosquitto")


@pytest.fixture
def root_broker(fresh_broker: Broker) -> Broker:
    return fresh_broker


@as_root
@pytest.mark.skipif(not _has_user("mosquitto"), reason="no mosquitto user")
def test_a_broker_started_by_root_serves_and_persists_as_its_unprivileged_user(
    root_broker: Broker, tmp_path: Path
) -> None:
    """The fleet home stays private to root (pytest's tmp directories are 0700): the broker,
    as `mosquitto`, reads its certificate, key, ACL and CRL and writes its persistence."""
    mosquitto = pwd.getpwnam("mosquitto").pw_uid
    cam = tmp_path / "cam-1"
    enroll_device(root_broker.home, "cam-1", cam)
    root_broker.start()

    assert _uids(root_broker.mosquitto_pid()) == [mosquitto] * 4
    assert connect_once(root_broker.port, cam) == ACCEPTED  # certificate, key, CA, CRL, ACL
    assert os.stat(root_broker.home.root).st_mode & 0o077 == 0

    root_broker.stop()  # Mosquitto saves its database on the way out
    saved = root_broker.data_dir / "mosquitto.db"
    wait_until(saved.exists, 10, "the saved database")
    assert saved.stat().st_uid == mosquitto


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited


def test_broker_run_passes_sigterm_on_and_exits_with_mosquittos_status(
    root_broker: Broker, tmp_path: Path
) -> None:
    enroll_device(root_broker.home, "cam-1", tmp_path / "cam-1")
    root_broker.start()
    # serving: past the start-up window where a SIGTERM kills it before it handles signals
    assert connect_once(root_broker.port, tmp_path / "cam-1") == ACCEPTED
    pid = root_broker.mosquitto_pid()
    proc = root_broker.proc
    assert proc is not None
    assert proc.stop() == 0  # SIGTERM: Mosquitto stops cleanly, broker run says so
    assert not _running(pid)


def test_no_broker_is_left_behind_when_broker_run_is_killed(root_broker: Broker) -> None:
    root_broker.start()
    pid = root_broker.mosquitto_pid()
    proc = root_broker.proc
    assert proc is not None
    proc.p.kill()  # SIGKILL: no chance to pass anything on
    proc.p.wait(10)
    wait_until(lambda: not _running(pid), 10, "Mosquitto to follow its parent")


def test_sighup_to_broker_run_hands_the_broker_the_crl_again(root_broker: Broker) -> None:
    root_broker.start()
    proc = root_broker.proc
    assert proc is not None
    proc.p.send_signal(signal.SIGHUP)  # at once: Mosquitto may not handle SIGHUP yet
    wait_until(lambda: "Reloading config." in proc.log(), 10, "Mosquitto to reload")
    assert '"crl_reloaded"' in proc.log()
    assert _running(root_broker.mosquitto_pid())


@as_root
@pytest.mark.skipif(not _has_user("mosquitto"), reason="no mosquitto user")
def test_a_link_the_broker_planted_in_its_state_directory_does_not_redirect_roots_chmod(
    fleet_home: FleetHome, tmp_path: Path
) -> None:
    place = Broker(fleet_home, 0, tmp_path)
    files = write_broker_config(fleet_home, state_dir=place.state_dir)
    target = tmp_path / "roots-own"
    target.mkdir(mode=0o755)
    files.data_dir.rmdir()
    files.data_dir.symlink_to(target)  # what a compromised broker could leave for root
    with pytest.raises(EnvironmentFault, match="cannot create directory"):
        write_broker_config(fleet_home, state_dir=place.state_dir)
    st = target.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o755)
