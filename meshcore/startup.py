"""Process start-up checks shared by the supervisor and its workers (no sockets kept open).

* `raise_nofile_limit()`: RLIMIT_NOFILE's soft limit up to the hard limit, as Envoy's packaging
  does, so a proxy under a low default `ulimit -n` (1024) does not run out of descriptors at a
  few hundred client connections. Workers inherit it (they are spawned after it runs).
* `probe(address)`: whether this process could listen on `address` now (SO_REUSEADDR, so sockets
  in TIME_WAIT do not count); the socket is closed at once. A port another listener holds fails
  here, even one bound with SO_REUSEPORT (which the workers' own sockets would silently share,
  splitting the traffic with a stranger), so the proxy stops before it starts anything.
* `listen_problem(address, exc)`: the one line a failed bind is reported with,
  `cannot listen on 127.0.0.1:15001: address already in use`.
"""
from __future__ import annotations

import errno
import os
import resource
import socket

__all__ = ["raise_nofile_limit", "probe", "listen_problem", "format_address"]


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # e.g. an unlimited hard limit the kernel caps lower
            pass
    return soft, hard


def format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use"
    text = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
    return text[:1].lower() + text[1:]


def listen_problem(address: tuple[str, int], exc: OSError) -> str:
    return f"cannot listen on {format_address(address)}: {_reason(exc)}"


def probe(address: tuple[str, int]) -> str | None:
    """None when `address` could be listened on now, else the one-line problem."""
    host, port = address
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1)
    except OSError as exc:
        return listen_problem(address, exc)
    return None
