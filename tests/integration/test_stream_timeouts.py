"""Stream timeouts (issue 9 item 8): `--stream-idle-timeout` and `--request-timeout`.

Envoy's stream_idle_timeout ends a stream on which no bytes moved for that long: before the
response, 408 `stream timeout` while the request is still arriving and 504 once it is complete
(Http::Utility::maybeRequestTimeoutCode; flag SI, details stream_idle_timeout); after the response
started, the stream is reset. Any byte passing through resets Envoy's timer (FilterManager
decodeData/encodeData call resetIdleTimer), so a client trickling its body keeps the stream alive
there, and here: what bounds a trickled upload is request_timeout, the time to receive the whole
request (408 `request timeout`), off in Envoy and 300 s by default here.

The upstream is a raw loopback server whose path picks its behaviour. Timeouts are short; the
tests assert what happens, never how long it took. The last test runs the same four cases through
Envoy 1.40 with the same two timeouts and compares the answers.
"""
import socket
import threading
import time
from contextlib import closing

import pytest

from harness import Client, Proxy, envoy_on, one_service_mesh, write_config


class Upstream:
    """/hang: read the head, never answer. /stall: answer a head and 5 of 100 body bytes, then
    nothing. /len: read the Content-Length body whole, answer 200 with its length."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = c.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                path = head.split(b" ")[1]
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v)
                while len(buf) < length:
                    chunk = c.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                body, buf = buf[:length], buf[length:]
                if path == b"/hang":
                    c.recv(1)  # until the proxy gives up on it
                    return
                if path == b"/stall":
                    c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello")
                    c.recv(1)
                    return
                text = b"%d" % len(body)
                c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(text), text))
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self.sock.close()



@pytest.fixture(scope="module")
def upstream():
    up = Upstream()
    yield up
    up.close()


@pytest.fixture(scope="module")
def mesh_path(tmp_path_factory, upstream):
    return write_config(str(tmp_path_factory.mktemp("timeouts")),
                        one_service_mesh(upstream.port))


@pytest.fixture(scope="module")
def idle_proxy(mesh_path, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("timeouts-log") / "access.log")
    px = Proxy([mesh_path], workers=1, log_path=log,
               extra=["--stream-idle-timeout", "0.5", "--request-timeout", "0"])
    yield px
    px.stop()


def _log_lines(px, needle, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(px.log_path, "rb") as f:
            lines = [l for l in f.read().splitlines() if needle in l]
        if lines:
            return lines
        time.sleep(0.1)
    return []


def test_hung_upstream_after_a_complete_request_is_a_504_stream_timeout(idle_proxy):
    with closing(Client(idle_proxy.port)) as c:
        for _ in range(3):  # earlier requests on the same connection do not matter
            assert c.request("GET", "/len", host="up").status == 200
        r = c.request("GET", "/hang", host="up")
        assert (r.status, r.body) == (504, b"stream timeout")
        assert r.header("connection") is None  # the request was whole: the connection goes on
        assert c.request("GET", "/len", host="up").status == 200
    line = _log_lines(idle_proxy, b'"GET /hang ')[0]
    assert b" 504 SI stream_idle_timeout " in line


def test_stalled_request_body_is_a_408_stream_timeout(idle_proxy):
    with closing(Client(idle_proxy.port)) as c:
        c.send(b"POST /len HTTP/1.1\r\nHost: up\r\nContent-Length: 10\r\n\r\nabc")  # no more
        r = c.read_response()
        assert (r.status, r.body, r.header("connection")) == (408, b"stream timeout", "close")
        assert c.is_closed()
    assert b" 408 SI stream_idle_timeout " in _log_lines(idle_proxy, b'"POST /len ')[0]


def test_stalled_response_is_reset_after_it_started(idle_proxy):
    with closing(Client(idle_proxy.port)) as c:
        c.send(b"GET /stall HTTP/1.1\r\nHost: up\r\n\r\n")
        with pytest.raises(EOFError):  # the head and 5 bytes came, then the connection ended
            c.read_response()
    assert b" 200 SI " in _log_lines(idle_proxy, b'"GET /stall ')[0]


def test_trickled_body_keeps_the_stream_alive_as_in_envoy(idle_proxy):
    # one byte every 0.1 s for 3 s, with a 0.5 s idle timeout and the request timeout off
    with closing(Client(idle_proxy.port)) as c:
        c.send(b"POST /len HTTP/1.1\r\nHost: up\r\nContent-Length: 30\r\n\r\n")
        for _ in range(30):
            time.sleep(0.1)
            c.send(b"x")
        r = c.read_response()
        assert (r.status, r.body) == (200, b"30")


def test_request_timeout_ends_a_trickled_upload(mesh_path):
    px = Proxy([mesh_path], workers=1,
               extra=["--no-access-log", "--stream-idle-timeout", "1", "--request-timeout", "1"])
    try:
        with closing(Client(px.port)) as c:
            c.send(b"POST /len HTTP/1.1\r\nHost: up\r\nContent-Length: 60\r\n\r\n")
            for _ in range(60):  # one byte every 0.1 s: 6 s in all, unless answered first
                time.sleep(0.1)
                try:
                    c.send(b"x")
                except OSError:
                    break
                c.sock.settimeout(0.001)
                try:
                    if c.sock.recv(1, socket.MSG_PEEK):
                        break
                except (BlockingIOError, TimeoutError):
                    pass
            c.sock.settimeout(5)
            r = c.read_response()
            assert (r.status, r.body, r.header("connection")) == (408, b"request timeout",
                                                                  "close")
    finally:
        px.stop()


def test_zero_turns_the_stream_idle_timeout_off(mesh_path, upstream):
    px = Proxy([mesh_path], workers=1,
               extra=["--no-access-log", "--stream-idle-timeout", "0", "--request-timeout", "0"])
    try:
        with closing(Client(px.port, timeout=1.5)) as c:
            c.send(b"GET /hang HTTP/1.1\r\nHost: up\r\n\r\n")
            with pytest.raises(TimeoutError):  # nothing ends it (no route timeout either)
                c.read_response()
    finally:
        px.stop()


def test_the_flags_are_checked(mesh_path):
    from meshcore.cli import main
    for bad in ("-1", "soon", "inf"):
        with pytest.raises(SystemExit):
            main(["run", "--config", mesh_path, "--stream-idle-timeout", bad])


# ---------------------------------------------------------------------------------------------
# the same four cases through Envoy 1.40 (stream_idle_timeout 0.5s, request_timeout 1s)

CASES = {
    "hung-upstream": (b"GET /hang HTTP/1.1\r\nHost: up\r\n\r\n", 0),
    "stalled-body": (b"POST /len HTTP/1.1\r\nHost: up\r\nContent-Length: 10\r\n\r\nabc", 0),
    "stalled-response": (b"GET /stall HTTP/1.1\r\nHost: up\r\n\r\n", 0),
    "trickled-body": (b"POST /len HTTP/1.1\r\nHost: up\r\nContent-Length: 60\r\n\r\n", 60),
}


def _outcome(port, data, trickle):
    """(status, body, connection header), or ("cut", bytes) when the connection ended in the
    middle of a response."""
    with closing(Client(port, timeout=10)) as c:
        c.send(data)
        for _ in range(trickle):  # one byte every 0.1 s until something is answered
            time.sleep(0.1)
            try:
                c.send(b"x")
            except OSError:
                break
            c.sock.settimeout(0.001)
            try:
                if c.sock.recv(1, socket.MSG_PEEK):
                    break
            except (BlockingIOError, TimeoutError):
                pass
        c.sock.settimeout(10)
        body = []
        try:
            r = c.read_response(sink=body.append)
        except EOFError:
            return ("cut", b"".join(body) + c.buf)
        return (r.status, b"".join(body), r.header("connection"))


@pytest.fixture(scope="module")
def envoy_timeouts(mesh_path, tmp_path_factory):
    with envoy_on(mesh_path, str(tmp_path_factory.mktemp("envoy-timeouts")),
                  hcm={"stream_idle_timeout": "0.5s", "request_timeout": "1s"}) as port:
        yield port


@pytest.fixture(scope="module")
def same_flags_proxy(mesh_path):
    px = Proxy([mesh_path], workers=1, extra=["--no-access-log", "--stream-idle-timeout", "0.5",
                                              "--request-timeout", "1"])
    yield px
    px.stop()


@pytest.mark.parametrize("case", list(CASES))
def test_ends_as_envoy_ends_it(envoy_timeouts, same_flags_proxy, case):
    data, trickle = CASES[case]
    want = _outcome(envoy_timeouts, data, trickle)
    got = _outcome(same_flags_proxy.port, data, trickle)
    assert got == want
    assert want == {"hung-upstream": (504, b"stream timeout", None),
                    "stalled-body": (408, b"stream timeout", "close"),
                    "stalled-response": ("cut", b"hello"),
                    "trickled-body": (408, b"request timeout", "close")}[case]
