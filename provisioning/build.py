"""`enclave build`: package a source tree into a signed, reproducible enclave image and register
its measurement as a reference value in the fleet policy."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from provisioning.home import FleetHome
from provisioning.policy_file import add_enclave_reference
from strongroom.errors import InputError
from strongroom.fields import check_version
from strongroom.fsutil import PUBLIC_FILE, ensure_absent, read_file, write_atomic
from strongroom.image import MAX_FILES, Sigstruct, build_image
from strongroom.policy import EnclaveReference

_SKIPPED_DIRS = frozenset({"__pycache__"})


def collect_tree(src: Path) -> dict[str, bytes]:
    """Read every regular file under `src`, keyed by POSIX relative path.

    Skipped: `__pycache__`, compiled `.pyc` files and hidden names (".git", ".DS_Store"), which are
    build debris rather than source. Symbolic links are refused: an image holds what it names.
    """
    if not src.is_dir():
        raise InputError(
            f"source directory not found: {src}", hint="pass a directory of Python source"
        )
    files: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        here = Path(dirpath)
        for d in list(dirnames):
            if (here / d).is_symlink():
                raise InputError(
                    f"symbolic link in enclave source: {here / d}", hint="replace it by a copy"
                )
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIPPED_DIRS and not d.startswith(".")
        )
        for name in filenames:
            path = here / name
            if name.startswith(".") or name.endswith(".pyc"):
                continue
            try:
                name.encode()
            except UnicodeEncodeError as e:
                raise InputError(
                    f"file name is not valid UTF-8: {here / name!r}", hint="rename the file"
                ) from e
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise InputError(
                    f"symbolic link in enclave source: {path}", hint="replace it by a copy"
                )
            if not stat.S_ISREG(mode):
                continue
            files[path.relative_to(src).as_posix()] = read_file(path, "enclave source file")
            if len(files) > MAX_FILES:
                raise InputError(f"an enclave image holds at most {MAX_FILES} files")
    if not any(p.endswith(".py") for p in files):
        raise InputError(f"no Python source in {src}", hint="pass a directory of Python source")
    return files


def build_enclave(
    home: FleetHome,
    src: Path,
    out: Path,
    *,
    svn: int,
    product_id: int = 1,
    debug: bool = False,
) -> Sigstruct:
    check_version(svn, "SVN")
    if not 0 <= product_id <= 65535:
        raise InputError("product id must be between 0 and 65535")
    ensure_absent(out, "image")
    files = collect_tree(src)
    image, sigstruct = build_image(
        files, home.signing_key("enclave"), svn=svn, product_id=product_id, debug=debug
    )
    write_atomic(out, image, PUBLIC_FILE)
    try:
        add_enclave_reference(
            home.policy_path,
            EnclaveReference(sigstruct.mrenclave, svn, product_id, debug),
        )
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return sigstruct
