"""One MQTT connection attempt with a bundle's TLS identity, answered without waiting on a
client's reconnect loop: the broker's CONNACK, or the TLS error that refused the certificate."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

ACCEPTED = "accepted"


def _connect_packet(client_id: str) -> bytes:
    """MQTT 3.1.1 CONNECT, clean session, keepalive 60 s (the broker takes the id from the CN)."""
    name = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(name).to_bytes(2, "big") + name
    return b"\x10" + bytes([len(body)]) + body


def connect_once(port: int, bundle: Path, timeout: float = 10) -> str:
    """`ACCEPTED` if the broker answers CONNACK 0, else what refused it ("tls: ..." when the
    handshake or the first read failed, "connack: N" for an MQTT refusal)."""
    context = ssl.create_default_context(cafile=str(bundle / "tls/ca.pem"))
    context.load_cert_chain(bundle / "tls/client.pem", bundle / "tls/client.key")
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(_connect_packet(bundle.name))
            answer = b""
            while len(answer) < 4:
                chunk = tls.recv(4 - len(answer))
                if not chunk:
                    return "tls: closed before CONNACK"
                answer += chunk
    except ssl.SSLError as e:
        return f"tls: {e.reason or e}"
    except ConnectionError as e:
        return f"tls: {e}"
    if answer[0] != 0x20:
        return f"unexpected packet {answer[0]:#x}"
    return ACCEPTED if answer[3] == 0 else f"connack: {answer[3]}"
