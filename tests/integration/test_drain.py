"""Drain as Envoy drains (issue 9 item 3): after SIGTERM every response started carries
`connection: close` and ends its connection, idle keep-alive connections are closed between
requests (after a quiet second), never after a request was read, and no request read from a
client is left without an answer.

The clients are what a keep-alive client does: send the next request on the same connection as
long as the last response did not say `connection: close`, and not on a connection the server
has already closed. A request written and then met by EOF or a reset is lost: there must be none.
"""
import select
import signal
import socket
import threading
import time
from contextlib import closing

import pytest

from harness import Client, Proxy, one_service_mesh, write_config
from recording_upstream import Upstream

CLIENTS = 16



@pytest.fixture(scope="module")
def upstream():
    up = Upstream()
    yield up
    up.close()


@pytest.fixture
def mesh_path(tmp_path, upstream):
    return write_config(str(tmp_path), one_service_mesh(upstream.port))


def _closed_by_server(sock) -> bool:
    """The server's EOF (or reset) is already here: the connection ended before a write."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class KeepAliveClient(threading.Thread):
    def __init__(self, port, started):
        super().__init__(daemon=True)
        self.port = port
        self.started = started
        self.sent = self.answered = self.lost = 0
        self.ending = None  # "close-header", "closed-before-write", or what went wrong

    def run(self):
        c = Client(self.port, timeout=15)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if _closed_by_server(c.sock):
                    self.ending = "closed-before-write"
                    return
                c.send(b"GET /k HTTP/1.1\r\nHost: up\r\n\r\n")
                self.sent += 1
                try:
                    r = c.read_response()
                except (EOFError, OSError) as exc:
                    self.lost += 1
                    self.ending = f"lost: {exc!r}"
                    return
                assert r.status == 200, r
                self.answered += 1
                if self.answered == 5:
                    self.started.release()
                if r.header("connection") == "close":
                    self.ending = "close-header"
                    return
            self.ending = "never drained"
        finally:
            c.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_keep_alive_load_loses_no_request(mesh_path, workers):
    px = Proxy([mesh_path], workers=workers, extra=["--no-access-log"])
    try:
        started = threading.Semaphore(0)
        clients = [KeepAliveClient(px.port, started) for _ in range(CLIENTS)]
        for c in clients:
            c.start()
        for _ in clients:  # every client is in its request loop
            assert started.acquire(timeout=15)
        px.signal(signal.SIGTERM)
        for c in clients:
            c.join(25)
        assert px.proc.wait(15) == 0
    finally:
        px.stop()
    endings = [c.ending for c in clients]
    assert sum(c.lost for c in clients) == 0, endings
    assert all(e in ("close-header", "closed-before-write") for e in endings), endings
    assert "close-header" in endings  # responses during the drain said so
    assert all(c.answered == c.sent for c in clients)


def test_idle_keep_alive_connection_is_closed_by_the_drain(mesh_path):
    # The drain grace is long here: the idle connection is closed after its quiet second, not
    # when the worker finally exits.
    px = Proxy([mesh_path], workers=1, extra=["--no-access-log", "--drain-grace", "20"])
    try:
        with closing(Client(px.port)) as c:
            r = c.request("GET", "/", host="up")
            assert r.status == 200 and r.header("connection") is None
            px.signal(signal.SIGTERM)
            assert c.is_closed(wait=8.0)
        assert px.proc.wait(15) == 0
    finally:
        px.stop()


def test_request_in_flight_when_the_drain_starts_is_answered_with_close(mesh_path, upstream):
    px = Proxy([mesh_path], workers=1, extra=["--no-access-log"])
    try:
        with closing(Client(px.port)) as c:
            assert c.request("GET", "/", host="up").status == 200
            px.signal(signal.SIGTERM)
            time.sleep(0.3)  # the drain has begun; the connection is idle and not yet quiet
            r = c.request("GET", "/after-sigterm", host="up")
            assert (r.status, r.header("connection")) == (200, "close")
            assert c.is_closed()
    finally:
        px.stop()
