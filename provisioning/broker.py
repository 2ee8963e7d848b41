"""The broker's files: the generated Mosquitto configuration and ACL, and copies of the TLS
material and fleet CRL, in a state directory owned by the unprivileged user the broker runs as.

Mosquitto 2.0 drops its privileges right after parsing its configuration, before it loads the
certificates, key, CRL, ACL and persistence file, and it reads them all again as that user on
SIGHUP. A fleet home is private to its owner (0700, often inside another private directory), so
the broker gets what it needs in a directory of its own::

    <state>/mosquitto<tag>.conf, acl<tag>     generated here
    <state>/ca.pem, server.pem, server.key     copied from the fleet home
    <state>/crl.pem                            the fleet CRL, copied again whenever it changes
    <state>/data<tag>/                         persistence

Started by root, the broker runs as `mosquitto` (the user Debian's package creates) or the user
named, never as root, and the state directory defaults to /var/lib/strongroom-broker/<fleet id>.
Started by another user, it runs as that user and the state directory defaults to HOME/broker.
Running it is provisioning/broker_supervisor.py's part.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from provisioning import ca, crl
from provisioning.broker_config import BrokerSettings, acl_text, mosquitto_conf
from provisioning.home import (
    DASHBOARD_CN,
    MAX_DASHBOARD_INSTANCES,
    MAX_VERIFIER_INSTANCES,
    VERIFIER_CN,
    FleetHome,
)
from strongroom.errors import EnvironmentFault, InputError
from strongroom.fsutil import PRIVATE_DIR, PUBLIC_FILE, SECRET_FILE, atomic_writer, read_file

DEFAULT_PORT = 8883
BROKER_USER = "mosquitto"
STATE_ROOT = Path("/var/lib/strongroom-broker")


@dataclass(frozen=True)
class BrokerUser:
    """The account Mosquitto runs as."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @property
    def is_current(self) -> bool:
        return self.uid == os.geteuid()


@dataclass(frozen=True)
class BrokerFiles:
    config: Path
    acl: Path
    crl: Path
    data_dir: Path
    state_dir: Path
    user: BrokerUser
    crl_version: tuple[int, int, int] | None = None  # of the fleet CRL staged (crl.version)


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
    )
    if found is None:
        raise EnvironmentFault(
            "mosquitto is not installed",
            hint="install it (e.g. apt-get install mosquitto), or use --embedded for a demo broker",
        )
    return found


def broker_user(name: str | None = None) -> BrokerUser:
    """The user the broker runs as: as root, `name` or `mosquitto`, never a uid-0 account; as
    anyone else, oneself (only root can start a process as another user)."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        if name is not None and name != me.pw_name:
            raise InputError(
                f"only root can run the broker as {name}", hint="drop --user, or run as root"
            )
        return _user(me)
    wanted = name or BROKER_USER
    try:
        entry = pwd.getpwnam(wanted)
    except KeyError as e:
        raise EnvironmentFault(
            f"refusing to run the broker as root, and there is no user {wanted} to run it as",
            hint=f"create a system user {wanted} (Debian's mosquitto package does), pass --user "
            "NAME, or start the broker as an unprivileged user",
        ) from e
    if entry.pw_uid == 0:
        raise InputError(
            f"refusing to run the broker as {wanted}: it is a root account",
            hint="name an unprivileged user with --user",
        )
    return _user(entry)


def _user(entry: pwd.struct_passwd) -> BrokerUser:
    groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    return BrokerUser(entry.pw_name, entry.pw_uid, entry.pw_gid, tuple(groups))


def default_state_dir(home: FleetHome, user: BrokerUser) -> Path:
    if user.is_current:
        return home.root / "broker"
    return STATE_ROOT / home.fleet_id


def scratch_state_dir(prefix: str = "strongroom-broker-") -> Path:
    """Where a throwaway broker (a demo, a simulation, a test) may keep its state: `state` in a
    new directory under the system's temporary directory, which other users may pass through
    (0711) but not list, since a temporary fleet home is closed to the broker's user. The
    caller removes the parent when done."""
    parent = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(parent, 0o711)  # noqa: S103 - search only, so the broker's user reaches `state`
    return parent / "state"


def write_broker_config(
    home: FleetHome,
    *,
    port: int = DEFAULT_PORT,
    bind: str = "127.0.0.1",
    tag: str = "",
    state_dir: Path | None = None,
    user: BrokerUser | None = None,
) -> BrokerFiles:
    """Write the broker's configuration, ACL, TLS material and CRL into its state directory
    (created if missing, owned by the broker's user) and return where they are."""
    user = user or broker_user()
    state = (state_dir or default_state_dir(home, user)).absolute()
    prepare_state_dir(state, user)
    data = state / f"data{tag}"
    _make_dir(data, user)
    files = BrokerFiles(
        config=state / f"mosquitto{tag}.conf",
        acl=state / f"acl{tag}",
        crl=state / "crl.pem",
        data_dir=data,
        state_dir=state,
        user=user,
    )
    settings = BrokerSettings(
        port=port,
        bind=bind,
        ca=state / "ca.pem",
        cert=state / "server.pem",
        key=state / "server.key",
        acl=files.acl,
        crl=files.crl,
        data_dir=data,
        user=user.name,
    )
    conf = mosquitto_conf(settings).encode()  # refuses `user root` before anything is written
    broker_dir = home.root / "broker"
    _write_as(user, settings.ca, read_file(home.ca_cert, "CA cert"), PUBLIC_FILE)
    _write_as(user, settings.cert, read_file(broker_dir / "server.pem", "broker cert"), PUBLIC_FILE)
    _write_as(user, settings.key, read_file(broker_dir / "server.key", "broker key"), SECRET_FILE)
    verifiers = _instances(VERIFIER_CN, MAX_VERIFIER_INSTANCES)
    dashboards = _instances(DASHBOARD_CN, MAX_DASHBOARD_INSTANCES)
    _write_as(user, files.acl, acl_text(verifiers, dashboards).encode(), SECRET_FILE)
    crl.ensure_crl(home)  # a fleet home made before there was a CRL
    staged = crl.version(home)  # before the read: a change after it is seen by the supervisor
    stage_crl(home, files)
    _write_as(user, files.config, conf, SECRET_FILE)
    return replace(files, crl_version=staged)


def stage_crl(home: FleetHome, files: BrokerFiles) -> ca.Crl:
    """Copy the fleet CRL into the state directory once it verifies under the fleet CA.

    Never anything else: Mosquitto 2.0.11 reloading an unreadable or malformed `crlfile` logs
    an error and then accepts every certificate the CA issued, revoked or not."""
    pem, verified = crl.read_crl(home)
    _write_as(files.user, files.crl, pem, PUBLIC_FILE)
    return verified


def prepare_state_dir(path: Path, user: BrokerUser) -> None:
    """Create the state directory for `user` (0700), or check an existing one is theirs, and
    check that `user` can reach it through its parents."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise InputError(f"the broker state directory {path} is not a directory")
    if path.exists():
        if path.stat().st_uid != user.uid:
            raise InputError(
                f"the broker state directory {path} is not owned by {user.name}",
                hint="choose a new directory (it is created for the broker's user)",
            )
        os.chmod(path, PRIVATE_DIR)
    else:
        missing = [p for p in path.parents if not p.exists()]
        for parent in reversed(missing):  # e.g. /var/lib/strongroom-broker: others may pass
            parent.mkdir(mode=0o755)
        _make_dir(path, user)
    for parent in path.parents:
        if not _searchable(parent, user):
            raise EnvironmentFault(
                f"the broker's user {user.name} cannot reach {path}: {parent} is closed to it",
                hint=f"choose a --state-dir outside private directories (default {STATE_ROOT})",
            )


def _searchable(directory: Path, user: BrokerUser) -> bool:
    st = directory.stat()
    if user.uid == 0:
        return True
    if st.st_uid == user.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in user.groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _make_dir(path: Path, user: BrokerUser) -> None:
    """Create `path` (0700) for `user`, or take the one there, never through a link: it may sit
    in a directory the broker's user writes, and root must not chmod or chown what a link
    planted there points to."""
    try:
        path.mkdir(mode=PRIVATE_DIR, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise EnvironmentFault(f"cannot create directory {path}: {e.strerror}") from e
    try:
        os.fchmod(fd, PRIVATE_DIR)
        if not user.is_current:
            os.fchown(fd, user.uid, user.gid)
    except OSError as e:
        raise EnvironmentFault(f"cannot create directory {path}: {e.strerror}") from e
    finally:
        os.close(fd)


def _write_as(user: BrokerUser, path: Path, data: bytes, mode: int) -> None:
    """Write atomically, owned by `user` from before the rename: the broker may read it at any
    moment (a reload), and must never find a file it cannot read."""
    try:
        with atomic_writer(path, mode) as f:
            if not user.is_current:
                os.fchown(f.fileno(), user.uid, user.gid)
            f.write(data)
    except OSError as e:
        raise EnvironmentFault(f"cannot write {path}: {e.strerror}") from e


def _instances(cn: str, maximum: int) -> tuple[str, ...]:
    """A role's identities: the default one and its numbered instances (issued on first use)."""
    return (cn, *(f"{cn}-{i}" for i in range(1, maximum + 1)))
