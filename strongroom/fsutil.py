"""Atomic, permission-tight file writes and private directories.

Everything that matters is written to a temporary file in the target's directory, flushed, fsynced
and renamed over the target, so a crash leaves the old file or the new one, never half of either.
`shutil` and `tempfile` are imported where used: the platform and the enclave read files at start
and write only later, if at all.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from strongroom.errors import EnvironmentFault, InputError

PRIVATE_DIR = 0o700
SECRET_FILE = 0o600
PUBLIC_FILE = 0o644


def make_private_dir(path: Path) -> None:
    """Create `path` and any missing parents with mode 0700; tighten `path` if it exists."""
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    try:
        for directory in reversed(missing):
            directory.mkdir(mode=PRIVATE_DIR, exist_ok=True)
            os.chmod(directory, PRIVATE_DIR)
        os.chmod(path, PRIVATE_DIR)
    except OSError as e:
        raise EnvironmentFault(f"cannot create directory {path}: {e.strerror}") from e


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = SECRET_FILE) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces `path` atomically with `mode` when the block succeeds.

    On any exception the temporary file is removed and `path` is left as it was.
    """
    import tempfile  # noqa: PLC0415 - see the module's docstring

    directory = path.parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise EnvironmentFault(f"cannot write in {directory}: {e.strerror}") from e
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes, mode: int = SECRET_FILE) -> None:
    """Write `data` to `path` atomically with permissions `mode`."""
    try:
        with atomic_writer(path, mode) as f:
            f.write(data)
    except OSError as e:
        raise EnvironmentFault(f"cannot write {path}: {e.strerror}") from e


def read_file(path: Path, what: str, limit: int | None = None) -> bytes:
    """Read a whole file, translating OS errors into one-line input errors."""
    try:
        with path.open("rb") as f:
            data = f.read() if limit is None else f.read(limit + 1)
    except FileNotFoundError as e:
        raise InputError(f"{what} not found: {path}", hint="check the path") from e
    except IsADirectoryError as e:
        raise InputError(f"{what} is a directory, not a file: {path}") from e
    except PermissionError as e:
        raise InputError(f"{what} is not readable: {path}", hint="check its permissions") from e
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror}") from e
    if limit is not None and len(data) > limit:
        raise InputError(f"{what} is larger than {limit} bytes: {path}")
    return data


def ensure_absent(path: Path, what: str) -> None:
    """Refuse to overwrite an existing output."""
    if path.exists() or path.is_symlink():
        raise InputError(
            f"{what} already exists: {path}", hint="choose another path or remove the old one"
        )


@contextlib.contextmanager
def staged_dir(target: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a private temporary directory that becomes `target` when the block succeeds.

    The directory is built next to `target` and renamed into place at the end, so a failure leaves
    nothing behind. With `replace`, an existing `target` is swapped out and removed afterwards.
    """
    import shutil  # noqa: PLC0415 - see the module's docstring
    import tempfile  # noqa: PLC0415

    parent = target.parent
    if not parent.is_dir():
        raise InputError(f"parent directory does not exist: {parent}", hint="create it first")
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".stage", dir=parent))
    except OSError as e:
        raise EnvironmentFault(f"cannot write in {parent}: {e.strerror}") from e
    try:
        os.chmod(stage, PRIVATE_DIR)
        yield stage
        old: Path | None = None
        if replace and (target.exists() or target.is_symlink()):
            old = parent / f".{target.name}.{os.getpid()}.old"
            os.replace(target, old)
        os.replace(stage, target)
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
