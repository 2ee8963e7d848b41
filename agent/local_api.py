"""The agent's local API for applications on the device: a Unix socket (mode 0600).

One JSON line in (`{"entrypoint": "module:function", "input": ...}`), one JSON line out
(`{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`). Requests are capped at 1 MiB.
Only results of protected code cross it, never plaintext.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.errors import InvokeError
from strongroom.errors import EnvironmentFault, InputError, StrongroomError

MAX_REQUEST = 1024 * 1024
MAX_SOCKET_PATH = 100
Invoke = Callable[[str, Any], Any]


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        line = self.rfile.readline(MAX_REQUEST + 1)
        try:
            if len(line) > MAX_REQUEST:
                raise InputError("request larger than 1 MiB")
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("entrypoint"), str):
                raise InputError("request needs an 'entrypoint' string")
            result = self.server.invoke(request["entrypoint"], request.get("input"))
            reply: dict[str, Any] = {"ok": True, "result": result}
        except (ValueError, RecursionError):  # JSON errors, bad UTF-8, absurd nesting
            reply = {"ok": False, "error": "request is not valid JSON"}
        except StrongroomError as e:
            reply = {"ok": False, "error": str(e)}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = 64  # bursts of local callers wait instead of being turned away

    def __init__(self, path: Path, invoke: Invoke) -> None:
        self.invoke = invoke
        super().__init__(str(path), _Handler)


def _remove_stale(path: Path) -> None:
    """Remove what is left of an earlier agent's socket at `path`; refuse to touch anything
    else: a socket some process still serves, or a file that is not a socket at all."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise InputError(
            f"{path} exists and is not a socket", hint="pass another --socket, or remove it"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listens: a stale socket
        except OSError as e:
            raise EnvironmentFault(f"cannot check the socket {path}: {e.strerror}") from e
        else:
            raise EnvironmentFault(
                f"another process serves the local API at {path}",
                hint="is another agent running? stop it, or pass another --socket",
            )
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class LocalApi:
    """The server. It removes only a stale socket at its path when it starts, and only the
    socket it made itself when it stops (one that has since been replaced stays)."""

    def __init__(self, path: Path, invoke: Invoke) -> None:
        if len(str(path)) > MAX_SOCKET_PATH:
            raise InputError(f"socket path is too long: {path}", hint="pass a shorter --socket")
        _remove_stale(path)
        old = os.umask(0o177)  # the socket is created 0600
        try:
            self._server = _Server(path, invoke)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        st = path.lstat()
        self._made = (st.st_dev, st.st_ino)  # which file is ours, to remove it and no other
        self.path = path
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> LocalApi:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._made:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def call(path: Path, entrypoint: str, value: Any, timeout: float = 60.0) -> Any:
    """Client side: ask the agent at `path` to invoke protected code; return the result."""
    request = json.dumps({"entrypoint": entrypoint, "input": value}).encode() + b"\n"
    if len(request) > MAX_REQUEST:
        raise InputError("the request is larger than 1 MiB", hint="send a smaller input")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as e:
            raise InputError(
                f"cannot reach the agent at {path}: {e.strerror}",
                hint="is `strongroom agent run` running with this bundle?",
            ) from e
        try:
            sock.sendall(request)
            with sock.makefile("rb") as f:
                line = f.readline(MAX_REQUEST + 1)
        except OSError as e:
            raise InvokeError(f"the agent dropped the request: {e.strerror or e}") from e
    try:
        reply = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError("the agent gave no valid answer") from e
    if not reply.get("ok"):
        raise InvokeError(str(reply.get("error", "the agent refused")))
    return reply.get("result")
