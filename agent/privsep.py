"""Privilege separation on the device: the agent, started as root, runs the platform and the
enclave under system users of their own and then drops its own privileges.

- Three users, distinct from each other and from root: the agent's (the host), the platform's
  (the only reader of `BUNDLE/platform`) and the enclave's (vendor code, which must not read the
  platform's secrets either). Missing ones are created as system users without a home or a shell.
- The bundle is given to them: `platform/` to the platform's user (directory 0700, files 0600),
  everything else and the state directory to the agent's user, except the bundle directory
  itself, which becomes root's (0755): the agent's user could otherwise rename `platform/` and
  put a decoy in its place, and the next start would give it the real one. Entries owned by the
  platform's or the enclave's user are never given to the agent's, wherever they sit. Ownership
  is changed through descriptors opened without following links, and files with several links
  are left alone, so a link planted in the bundle by the agent's user cannot turn root's `chown`
  (or `chmod`) against another file.
- The privileged launcher (`agent.launcher_main`) starts with a descriptor of the platform
  directory; then this process becomes the agent's user for good (groups, gid, uid).

Why a dedicated uid and not only `PR_SET_DUMPABLE`: a process can make itself undumpable only
once it runs, and until then any process of its own uid may attach (and skip the call). A process
of another uid, started by root with that uid already set before `exec`, is never traceable by the
agent's user: ptrace and `/proc/PID/mem` need the same uid or CAP_SYS_PTRACE.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

import agent
import strongroom
from agent.launcher import SeparatedLauncher, SeparationError, SeparationFault
from strongroom import bundle

log = structlog.get_logger()

AGENT_USER = "strongroom-agent"
PLATFORM_USER = "strongroom-platform"
ENCLAVE_USER = "strongroom-enclave"
_NO_FOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True)
class DeviceUsers:
    """The names of the three users (options of `agent run` and `enclave run`)."""

    agent: str = AGENT_USER
    platform: str = PLATFORM_USER
    enclave: str = ENCLAVE_USER


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class Accounts:
    agent: Account
    platform: Account
    enclave: Account


def _create_system_user(name: str) -> None:
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    nologin = shutil.which("nologin", path="/usr/sbin:/sbin:/usr/bin:/bin") or "/bin/false"
    argv = [useradd, "--system", "--user-group", "--no-create-home"]
    argv += ["--home-dir", "/nonexistent", "--shell", nologin, name]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SeparationFault(f"cannot create the system user {name}: {e}") from e
    if done.returncode != 0:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)  # created meanwhile by another agent starting at the same time
            return
        reason = (done.stderr.strip().splitlines() or ["useradd failed"])[-1][:200]
        raise SeparationFault(f"cannot create the system user {name}: {reason}")
    log.info("system_user_created", user=name)


def resolve_account(name: str, *, create: bool = True) -> Account:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if not create:
            raise SeparationFault(f"there is no user {name!r}") from None
        _create_system_user(name)
        entry = pwd.getpwnam(name)
    return Account(name, entry.pw_uid, entry.pw_gid)


def resolve_accounts(users: DeviceUsers) -> Accounts:
    accounts = Accounts(
        resolve_account(users.agent),
        resolve_account(users.platform),
        resolve_account(users.enclave),
    )
    uids = [a.uid for a in (accounts.agent, accounts.platform, accounts.enclave)]
    if 0 in uids or len(set(uids)) != 3:
        raise SeparationFault(
            "the agent's, the platform's and the enclave's users must be three different "
            f"users other than root (got uids {uids})"
        )
    return accounts


# -- can the users run this installation? --------------------------------------------------------


def _allowed(st: os.stat_result, account: Account, want: int) -> bool:
    if st.st_uid == account.uid:
        bits = st.st_mode >> 6
    elif st.st_gid == account.gid:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & want == want


def _unreachable(path: Path, account: Account, want: int) -> Path | None:
    """The first component of `path` (links followed) `account` cannot pass, or None."""
    for candidate in (path, path.resolve()):
        parts = candidate.parts
        for i in range(1, len(parts)):
            parent = Path(*parts[:i])
            if not _allowed(parent.stat(), account, 0o1):
                return parent
        if not _allowed(candidate.stat(), account, want):
            return candidate
    return None


def check_installation(accounts: Accounts) -> None:
    """The platform and the enclave run this interpreter and these packages as their own users,
    and the agent goes on importing from them as its own: refuse early, in one line, when one of
    them could not (a virtual environment under /root, say)."""
    needs = [
        (Path(sys.executable), 0o1),
        (Path(agent.__file__).parent, 0o5),
        (Path(strongroom.__file__).parent, 0o5),
    ]
    for account in (accounts.agent, accounts.platform, accounts.enclave):
        for path, want in needs:
            blocked = _unreachable(path, account, want)
            if blocked is not None:
                raise SeparationFault(
                    f"the user {account.name} cannot use {path} ({blocked} is closed to it)",
                    hint="install Strongroom where system users can run it (e.g. a virtual "
                    "environment outside /root), or pass --no-privilege-separation",
                )
    writable = _writable_by_roles([path for path, _want in needs], accounts)
    if writable is not None:
        raise SeparationFault(
            f"{writable} can be changed by a user of the device's roles: the code the platform "
            "runs would be theirs to write",
            hint="install Strongroom owned by root and not writable by others",
        )


def _writable_by_roles(paths: list[Path], accounts: Accounts) -> Path | None:
    """The first file or directory of the installation (the interpreter, the packages and
    every component above them) that one of the three users owns or may write, or None. The
    launcher runs this code as the platform's user, and as root at the agent's next start."""
    roles = (accounts.agent, accounts.platform, accounts.enclave)
    uids, gids = {a.uid for a in roles}, {a.gid for a in roles}

    def writable(st: os.stat_result) -> bool:
        if stat.S_ISLNK(st.st_mode):
            return st.st_uid in uids
        other = st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX  # /tmp is fine
        group = st.st_mode & stat.S_IWGRP and st.st_gid in gids
        return st.st_uid in uids or bool(other) or bool(group)

    for top in paths:
        resolved = top.resolve()
        for component in (*reversed(resolved.parents), resolved):
            if writable(os.lstat(component)):
                return component
        if resolved.is_dir():
            for entry in resolved.rglob("*"):
                if writable(os.lstat(entry)):
                    return entry
    return None


# -- the bundle's ownership ------------------------------------------------------------------------


def _entries(dir_fd: int) -> Iterator[tuple[str, os.stat_result]]:
    for name in os.listdir(dir_fd):
        yield name, os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def _give_tree(
    dir_fd: int,
    account: Account,
    *,
    dir_mode: int | None = None,
    file_mode: int | None = None,
    skip: frozenset[str] = frozenset(),
    keep_uids: frozenset[int] = frozenset(),
) -> None:
    """Give the directory `dir_fd` and what it holds to `account`, never following a link."""
    os.fchown(dir_fd, account.uid, account.gid)
    if dir_mode is not None:
        os.fchmod(dir_fd, dir_mode)
    _give_entries(
        dir_fd, account, dir_mode=dir_mode, file_mode=file_mode, skip=skip, keep_uids=keep_uids
    )


def _give_entries(
    dir_fd: int,
    account: Account,
    *,
    dir_mode: int | None = None,
    file_mode: int | None = None,
    skip: frozenset[str] = frozenset(),
    keep_uids: frozenset[int] = frozenset(),
) -> None:
    """Give what the directory `dir_fd` holds to `account` (not the directory itself). Entries
    owned by `keep_uids` (another role's) are left alone, wherever they were moved to."""
    for name, st in _entries(dir_fd):
        if name in skip or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            continue  # links, sockets (the local API's), fifos: left as they are
        if st.st_uid in keep_uids:
            log.warning("bundle_entry_left_alone", entry=name, reason="owned by another role")
            continue
        flags = _NO_FOLLOW | (os.O_DIRECTORY if stat.S_ISDIR(st.st_mode) else 0)
        try:
            fd = os.open(name, flags, dir_fd=dir_fd)
        except OSError:
            continue  # replaced meanwhile by a link or removed
        try:
            opened = os.fstat(fd)
            if opened.st_uid in keep_uids:
                continue  # swapped in meanwhile
            if stat.S_ISDIR(opened.st_mode):
                _give_tree(fd, account, dir_mode=dir_mode, file_mode=file_mode, keep_uids=keep_uids)
            elif stat.S_ISREG(opened.st_mode) and opened.st_nlink == 1:
                os.fchown(fd, account.uid, account.gid)
                if file_mode is not None:
                    os.fchmod(fd, file_mode)
            else:
                log.warning("bundle_file_left_alone", file=name, reason="several links")
        finally:
            os.close(fd)


def _open_dir(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise SeparationFault(f"cannot open {path}: {e.strerror}") from e


def _open_dir_at(dir_fd: int, name: str) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def _private_dir_as_root(path: Path) -> int:
    """A descriptor of the directory at `path`, made if missing, mode 0700, never through a
    link: as root, a link planted there by the agent's user must not redirect the chmod."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    fd = _open_dir(path)  # O_NOFOLLOW: a link in its place is refused
    os.fchmod(fd, 0o700)
    return fd


def prepare_bundle(bundle_dir: Path, state_dir: Path, accounts: Accounts) -> int:
    """Give `platform/` to the platform's user and the rest of the bundle and `state_dir` to the
    agent's user; return a descriptor of the platform directory (for the launcher)."""
    blocked = _unreachable(bundle_dir.absolute().parent, accounts.agent, 0o1)
    if blocked is not None:
        raise SeparationFault(
            f"the user {accounts.agent.name} cannot reach the bundle {bundle_dir} "
            f"({blocked} is closed to it)",
            hint="keep the bundle where that user may pass (e.g. /var/lib/strongroom/DEVICE)",
        )
    others = frozenset({accounts.platform.uid, accounts.enclave.uid})
    bundle_fd = _open_dir(bundle_dir)
    try:  # first of all: the agent's user may no longer rename what the bundle holds
        os.fchown(bundle_fd, 0, 0)
        os.fchmod(bundle_fd, 0o755)
        platform_fd = _open_dir_at(bundle_fd, bundle.PLATFORM_DIR)
    except OSError as e:
        os.close(bundle_fd)
        raise SeparationFault(f"cannot take back the bundle directory: {e.strerror}") from e
    try:
        _give_tree(platform_fd, accounts.platform, dir_mode=0o700, file_mode=0o600)
        try:
            _give_entries(  # the directory itself stays root's
                bundle_fd, accounts.agent, skip=frozenset({bundle.PLATFORM_DIR}), keep_uids=others
            )
        finally:
            os.close(bundle_fd)
        platform_dir = (bundle_dir / bundle.PLATFORM_DIR).resolve()
        if state_dir.resolve().is_relative_to(platform_dir):
            raise SeparationFault("the state directory cannot be inside the platform directory")
        state_fd = _private_dir_as_root(state_dir)
        try:
            _give_tree(
                state_fd, accounts.agent, skip=frozenset({bundle.PLATFORM_DIR}), keep_uids=others
            )
        finally:
            os.close(state_fd)
        blocked = _unreachable(state_dir, accounts.agent, 0o7)
        if blocked is not None:
            raise SeparationFault(
                f"the user {accounts.agent.name} cannot use the state directory {state_dir} "
                f"({blocked} is closed to it)",
                hint="choose a state directory whose parents it may pass, e.g. BUNDLE/state",
            )
        st = os.fstat(platform_fd)
        if st.st_uid != accounts.platform.uid or stat.S_IMODE(st.st_mode) != 0o700:
            raise SeparationFault("the platform directory did not take its owner and mode")
    except OSError as e:
        os.close(platform_fd)
        raise SeparationFault(f"cannot set the bundle's owners: {e.strerror}") from e
    except BaseException:
        os.close(platform_fd)
        raise
    return platform_fd


# -- the whole set-up ------------------------------------------------------------------------------


def drop_privileges(account: Account) -> None:
    """Become `account` for good: no supplementary groups, its gid, its uid (all three ids)."""
    try:
        os.setgroups([])
        os.setresgid(account.gid, account.gid, account.gid)
        os.setresuid(account.uid, account.uid, account.uid)
    except OSError as e:
        raise SeparationFault(f"cannot become the user {account.name}: {e.strerror}") from e
    if os.getresuid() != (account.uid,) * 3 or os.getresgid() != (account.gid,) * 3:
        raise SeparationFault(f"could not become the user {account.name}")


def separate(bundle_dir: Path, state_dir: Path, users: DeviceUsers) -> SeparatedLauncher:
    """As root: set up the users, the bundle and the privileged launcher, then drop this
    process's privileges to the agent's user. Return the launcher for `EnclaveHost`."""
    if os.geteuid() != 0:
        raise SeparationError("privilege separation needs the agent to start as root")
    accounts = resolve_accounts(users)
    check_installation(accounts)
    platform_fd = prepare_bundle(bundle_dir, state_dir, accounts)
    try:
        p, e = accounts.platform, accounts.enclave
        launcher = SeparatedLauncher.start(platform_fd, (p.uid, p.gid), (e.uid, e.gid))
    finally:
        os.close(platform_fd)
    try:
        drop_privileges(accounts.agent)
    except BaseException:
        launcher.close()
        raise
    log.info(
        "privileges_dropped", agent_user=users.agent, platform_user=p.name, enclave_user=e.name
    )
    return launcher
