"""The simulator's MQTT connection: aiomqtt's client, with its socket registration made safe.

aiomqtt registers paho's socket with the event loop through callbacks. It defers adding the
reader and the writer (`call_soon_threadsafe`, since paho may call from the executor thread that
connects) but removes them, and paho closes the socket, at once. So when a connection ends in the
same turn as a write was queued (a broker fault, a revoked certificate, every clean disconnect
whose DISCONNECT packet the broker answers by closing), the deferred `add_writer` runs on a closed
descriptor: "Exception in callback BaseSelectorEventLoop.add_writer ... OSError: [Errno 9] Bad
file descriptor" on stderr, thousands of times in a large run. Worse, if the number was reused
meanwhile by a new connection, the dead client's writer lands on that connection's descriptor,
which is always writable: a callback spinning on every loop turn.

`Connection` checks, when a deferred registration runs in the loop, that paho still has that
very socket open (paho forgets its socket before closing it) and, for the writer, still wants
it (a writer added after paho unregistered it would never be removed: called on every turn);
otherwise there is nothing to register. Nothing else of aiomqtt's behaviour changes. The names
it relies on (aiomqtt's `_loop`, `_disconnected`, `_misc_loop`, `_misc_task`, paho's
`_registered_write`) are aiomqtt 2's and paho 2's (setup.cfg pins aiomqtt to the minors
verified, `>=2.3,<2.6`, and `paho-mqtt>=2.1,<3`); tests/test_simulator.py checks that the
installed versions have them and exercises both races.
"""

from __future__ import annotations

from typing import Any

import aiomqtt


def _still_open(client: Any, sock: Any) -> bool:
    """Whether paho still has `sock` as its open socket."""
    return bool(client.socket() is sock and sock.fileno() >= 0)


class Connection(aiomqtt.Client):
    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        def read() -> None:
            # as aiomqtt: a read error means the connection broke, so it is over
            try:
                while True:
                    client.loop_read()
                    pending = getattr(client.socket(), "pending", None)  # TLS: decoded bytes left
                    if pending is not None and pending() > 0:
                        continue
                    break
            except Exception as exc:  # handed to the connection's waiters
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def register() -> None:
            if _still_open(client, sock):
                self._loop.add_reader(sock.fileno(), read)
                self._misc_task = self._loop.create_task(self._misc_loop())

        self._loop.call_soon_threadsafe(register)

    def _on_socket_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        def write() -> None:
            try:
                client.loop_write()
            except Exception as exc:  # handed to the connection's waiters
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def register() -> None:
            # paho may have closed the socket, or unregistered the writer, meanwhile
            # paho's own flag, read directly: were it renamed, this fails loudly (a test checks
            # paho has it) rather than quietly registering every writer
            if _still_open(client, sock) and client._registered_write:
                self._loop.add_writer(sock.fileno(), write)

        self._loop.call_soon_threadsafe(register)

    def _on_socket_unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if sock.fileno() >= 0:
            self._loop.remove_writer(sock.fileno())
