"""Import Python modules from bytes held in memory: plaintext source never touches disk.

Used by the enclave bootstrap (for the enclave image) and by the enclave runtime (for protected
code artifacts). Modules get a synthetic `__file__` ("<sealed:NAME>/path.py") that names no real
file, so tracebacks and `inspect` cannot fetch their source, and no bytecode is ever written.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from importlib.abc import Loader


class MemoryFinder:
    """Finds and loads modules whose source is in `files` (POSIX paths -> source bytes).

    A meta path finder and loader by protocol (find_spec; create_module, exec_module), without
    importlib.abc's base classes: importing importlib.abc (and the importlib.resources it
    pulls in) is a noticeable part of the enclave's start, and they add nothing used here."""

    def __init__(self, files: Mapping[str, bytes], origin: str) -> None:
        self._files = files
        self._origin = origin

    def _locate(self, fullname: str) -> tuple[str, bool] | None:
        rel = fullname.replace(".", "/")
        if f"{rel}/__init__.py" in self._files:
            return f"{rel}/__init__.py", True
        if f"{rel}.py" in self._files:
            return f"{rel}.py", False
        return None

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        found = self._locate(fullname)
        if found is None:
            return None
        rel, package = found
        origin = f"<sealed:{self._origin}>/{rel}"
        loader = cast("Loader", self)  # a Loader by protocol (see the class)
        spec = importlib.machinery.ModuleSpec(fullname, loader, origin=origin, is_package=package)
        if package:
            spec.submodule_search_locations = []
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        found = self._locate(module.__name__)
        if found is None:
            raise ImportError(f"no sealed module {module.__name__}")
        rel = found[0]
        code = compile(
            self._files[rel], f"<sealed:{self._origin}>/{rel}", "exec", dont_inherit=True
        )
        exec(code, module.__dict__)  # noqa: S102 - executing verified, decrypted code is the point

    def provides(self, top_level: str) -> bool:
        """Whether this finder serves the top-level module or package `top_level`."""
        return f"{top_level}.py" in self._files or f"{top_level}/__init__.py" in self._files

    def install(self) -> None:
        sys.meta_path.insert(0, self)
