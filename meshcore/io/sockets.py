"""The only place that makes socket syscalls for the data path.

Calls go straight to non-blocking stdlib sockets; trio is awaited only on EAGAIN
(`wait_readable`/`wait_writable`), because every trio.socket call yields to the scheduler even
when the kernel could answer at once (performance.md: ~2.5 µs per checkpoint).
"""
from __future__ import annotations

import errno
import socket

import trio

RECV_SIZE = 65536
_PEEK_NOWAIT = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)  # an int: flag enums cost per call

_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable


async def recv(sock: socket.socket) -> bytes:
    """Receive whatever is available (waiting if nothing is). b"" means the peer closed."""
    while True:
        try:
            return sock.recv(RECV_SIZE)
        except BlockingIOError:
            await _wait_readable(sock)


async def recv_later(sock: socket.socket) -> bytes:
    """Like `recv`, for when the peer cannot have answered yet (a response just requested, the
    next keep-alive request): waiting first saves a failed syscall and its exception."""
    while True:
        await _wait_readable(sock)
        try:
            return sock.recv(RECV_SIZE)
        except BlockingIOError:
            pass


def send_nowait(sock: socket.socket, data) -> int:
    """One non-blocking send; returns the bytes sent (0 when the buffer is full). Callers await
    `send_all` on the rest only when it is not all gone, which saves a coroutine per send."""
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


async def send_all(sock: socket.socket, data) -> None:
    """Send every byte; waits for writability only when the kernel buffer is full (backpressure)."""
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    while view:
        await _wait_writable(sock)
        try:
            sent = sock.send(view)
        except BlockingIOError:
            continue
        view = view[sent:]


async def connect(host: str, port: int, timeout: float) -> socket.socket:
    """Open a non-blocking TCP connection. Raises OSError (ECONNREFUSED ...) or TimeoutError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((host, port))
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            with trio.move_on_after(timeout) as scope:
                await _wait_writable(sock)
            if scope.cancelled_caught:
                raise TimeoutError("connect timeout")
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, errno.errorcode.get(err, str(err)))
        return sock
    except BaseException:
        sock.close()
        raise


def is_stale(sock: socket.socket) -> bool:
    """True when an idle pooled connection has become readable: EOF or stray bytes, never reusable."""
    try:
        sock.recv(1, _PEEK_NOWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True  # b"" (EOF) or bytes nobody asked for


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
