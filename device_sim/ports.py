"""Local TCP ports for the services the demo and the simulator start."""

from __future__ import annotations

import socket
import time

from strongroom.errors import EnvironmentFault


def free_port() -> int:
    """A port nothing listens on now (the service started next takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_listening(port: int, timeout: float, what: str) -> None:
    """Wait until something accepts connections on `port`; EnvironmentFault after `timeout`."""
    deadline = time.monotonic() + timeout
    while not listening(port):
        if time.monotonic() > deadline:
            raise EnvironmentFault(
                f"{what} did not listen on port {port} within {timeout:g} s",
                hint="see its log for why it did not start",
            )
        time.sleep(0.05)
