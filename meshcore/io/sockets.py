"""Socket set-up for the data path (the event loop in meshcore._ext.loop makes the per-request
syscalls itself): the per-worker SO_REUSEPORT listener, and parsing HOST:PORT flags.
"""
from __future__ import annotations

import socket


def reuseport_listener(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening socket of this worker's own; the kernel spreads connections across workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'127.0.0.1:15001', ':15001', '[::1]:15001' -> (host, port). Raises ValueError."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = text.rpartition(":")
    if not port.isascii() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid address {text!r}: expected HOST:PORT")
    return host or default_host, int(port)
