"""meshcore._ext.h1conn and its pure twin meshcore.proto.h1conn: the same tests over both.

The compiled parameter fails (it does not skip) when the extension is not built, unless
MESHCORE_NO_EXTENSIONS=1 is set. The property tests (twins agree on generated streams, framing
survives a re-send) are in tests/fuzz/test_h1_properties.py.
"""
import importlib
import os
import re
from pathlib import Path

import pytest

from h1parse_corpus import CHUNKED_INVALID, CHUNKED_VALID, CORPUS, EXTRA, NEXT_REQUEST
from meshcore.errors import ProtocolError
from meshcore.proto import h1conn as pure
from meshcore.proto.h1_parse import BODY_CHUNKED, BODY_CLOSE, BODY_LENGTH, BODY_NONE

IMPLS = ["pure", "compiled"]
PXD = Path(__file__).resolve().parents[2] / "ext" / "meshcore" / "_ext" / "h1conn.pxd"


def _compiled():
    if os.environ.get("MESHCORE_NO_EXTENSIONS") == "1":
        pytest.skip("MESHCORE_NO_EXTENSIONS=1: pure-Python build, compiled h1conn not tested")
    try:
        return importlib.import_module("meshcore._ext.h1conn")
    except ImportError as e:
        pytest.fail(f"meshcore._ext.h1conn is not built ({e}); build it with "
                    "`python setup.py build_ext --inplace` or set MESHCORE_NO_EXTENSIONS=1")


@pytest.fixture(params=IMPLS)
def h1c(request):
    return pure if request.param == "pure" else _compiled()


# ---------------------------------------------------------------------------------------------
# helpers

STOP = ("need_data", "paused", "eof", "error", "upgrade")


def merge(events):
    """Drop need_data and join consecutive data events: how the body was split is not an event."""
    out = []
    for ev in events:
        if ev[0] == "need_data":
            continue
        if ev[0] == "data" and out and out[-1][0] == "data":
            out[-1] = ("data", out[-1][1] + ev[1])
        else:
            out.append(ev)
    return out


def pull(conn):
    """Events up to and including the next one that waits (need_data, paused, eof, error,
    upgrade)."""
    evs = []
    while True:
        ev = conn.event()
        evs.append(ev)
        if ev[0] in STOP:
            return evs
        assert len(evs) < 100000


def feed(conn, data):
    conn.receive_data(data)
    return pull(conn)


def request(path=b"/", method=b"GET", version=b"1.1", headers=b"", body=b""):
    return (method + b" " + path + b" HTTP/" + version + b"\r\nHost: a\r\n" + headers + b"\r\n"
            + body)


def chunked(*pieces, ext=b"", trailers=b""):
    return b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in pieces) + b"0\r\n" + trailers + \
        b"\r\n"


def serve(mod, pieces, eof=False):
    """Drive a ServerConn as a proxy does: feed the pieces, answer every complete request with an
    empty response, go on while finish_response says so. Returns (merged trace, conn); the trace
    holds the events (no paused) and ("response", keep_alive, carries_on) for each answer."""
    conn = mod.ServerConn()
    trace = []

    def run():
        while True:
            ev = conn.event()
            if ev[0] == "need_data":
                return True
            if ev[0] == "paused":
                keep = conn.begin_response(BODY_NONE)
                out, more = conn.finish_response()
                assert out == b""
                trace.append(("response", keep, more))
                if not more:
                    return False
                continue
            trace.append(ev)
            if ev[0] in ("eof", "error"):
                return False

    going = True
    for piece in pieces:
        conn.receive_data(piece)
        going = run()
        if not going:
            break
    if going and eof:
        conn.receive_eof()
        run()
    return merge(trace), conn


def split_all(data):
    """The same bytes whole, in two pieces at every offset, and one byte at a time."""
    yield [data]
    for k in range(1, len(data)):
        yield [data[:k], data[k:]]
    yield [data[i:i + 1] for i in range(len(data))]


def respond(conn, body=b"", kind=None):
    kind = (BODY_LENGTH if body else BODY_NONE) if kind is None else kind
    keep = conn.begin_response(kind, len(body))
    out = conn.send_body(body) if body else b""
    end, more = conn.finish_response()
    return keep, out + end, more


def client(mod, data=b"", head_request=False, upgrade=False):
    conn = mod.ClientConn()
    conn.begin_request(head_request, BODY_NONE, 0, upgrade)
    evs = feed(conn, data) if data else []
    return conn, evs


def response(status=b"200 OK", headers=b"", body=b"", version=b"1.1"):
    return b"HTTP/" + version + b" " + status + b"\r\n" + headers + b"\r\n" + body


# ---------------------------------------------------------------------------------------------
# the module surface

def test_constants_match_the_pxd_and_the_compiled_module(h1c):
    # The R_*/W_*/EV_* numbers are C enums in the .pxd; the pure twin names them for Python.
    enum = dict(re.findall(r"^\s+([A-Z][A-Z0-9_]*) = (\d+)", PXD.read_text(), re.M))
    for name in ("R_IDLE", "R_HEAD", "R_BODY", "R_DONE", "R_ERROR", "R_UPGRADED",
                 "W_IDLE", "W_BODY", "W_DONE"):
        assert getattr(pure, name) == int(enum[name]), name
    for name in ("NEED_DATA", "HEAD", "DATA", "END", "PAUSED", "EOF", "ERROR", "INFORMATIONAL",
                 "UPGRADE"):
        assert getattr(pure, name) == int(enum["EV_" + name]), name
        assert getattr(h1c, name) == getattr(pure, name)
    for name in ("R_BODY_TRUNCATED", "R_UNSOLICITED_101", "R_STRAY", "R_BODY_OVERRUN",
                 "R_204_BODY"):
        assert getattr(h1c, name) == getattr(pure, name)
    assert all(hasattr(pure, n) for n in pure.__all__)
    if h1c is not pure:  # everything the compiled module exports, the pure twin exports
        public = {n for n in dir(h1c) if not n.startswith("_") and n != "ProtocolError"}
        assert public <= set(pure.__all__)


def test_fresh_objects(h1c):
    s = h1c.ServerConn()
    assert (s.state, s.send_state, s.head, s.keep_alive, s.error_status, s.error_reason,
            s.body_kind, s.body_received, s.buffered_bytes) == (
        pure.R_HEAD, pure.W_IDLE, None, False, 0, None, BODY_NONE, 0, 0)
    assert s.event() == ("need_data",)
    assert not s.wants_continue()
    c = h1c.ClientConn()
    assert (c.state, c.send_state, c.head, c.got_bytes, c.can_reuse()) == (
        pure.R_IDLE, pure.W_IDLE, None, False, False)
    assert c.event() == ("need_data",)


def test_receive_data_takes_any_buffer(h1c):
    data = request(b"/b", headers=b"Content-Length: 2\r\n", body=b"ok")
    for kind in (bytes, bytearray, memoryview):
        s = h1c.ServerConn()
        s.receive_data(kind(data))
        assert merge(pull(s)) == [("head",), ("data", b"ok"), ("end",), ("paused",)]
        assert s.head.path == b"/b"


# ---------------------------------------------------------------------------------------------
# server: request framing

def test_request_without_body(h1c):
    s = h1c.ServerConn()
    # A request without a body goes from head straight to paused (there is no end event).
    assert feed(s, request(b"/x?y")) == [("head",), ("paused",)]
    h = s.head
    assert (h.method, h.target, h.path, h.host, h.version) == (b"GET", b"/x?y", b"/x?y", b"a", 1)
    assert (s.state, s.send_state, s.body_kind, s.keep_alive) == (
        pure.R_DONE, pure.W_IDLE, BODY_NONE, True)
    assert s.event() == ("paused",)  # stays paused until the response is finished


def test_content_length_zero_is_no_body(h1c):
    s = h1c.ServerConn()
    assert feed(s, request(method=b"POST", headers=b"Content-Length: 0\r\n")) == [
        ("head",), ("paused",)]
    assert s.body_kind == BODY_NONE


def test_content_length_body(h1c):
    s = h1c.ServerConn()
    assert feed(s, request(method=b"POST", headers=b"Content-Length: 11\r\n", body=b"hello")) == [
        ("head",), ("data", b"hello"), ("need_data",)]
    assert (s.state, s.body_kind, s.body_received) == (pure.R_BODY, BODY_LENGTH, 5)
    assert feed(s, b" world") == [("data", b" world"), ("end",), ("paused",)]
    assert (s.state, s.body_received, s.buffered_bytes) == (pure.R_DONE, 11, 0)


def test_chunked_body_drops_extensions_and_trailers(h1c):
    body = (b"5;name=value\r\nhello\r\n6 ; q=\"a b\"\r\n world\r\n0;last\r\n"
            b"Trailer-One: x\r\nTrailer-Two: y\r\n\r\n")
    s = h1c.ServerConn()
    evs = feed(s, request(method=b"POST", headers=b"Transfer-Encoding: chunked\r\n", body=body))
    assert evs == [("head",), ("data", b"hello"), ("data", b" world"), ("end",), ("paused",)]
    assert (s.body_kind, s.body_received, s.buffered_bytes) == (BODY_CHUNKED, 11, 0)
    # trailers are consumed, never handed out: the next request starts right after them
    assert respond(s)[2] is True
    assert feed(s, request(b"/2")) == [("head",), ("paused",)]
    assert s.head.path == b"/2"


def test_chunked_data_is_handed_out_as_it_arrives(h1c):
    s = h1c.ServerConn()
    assert feed(s, request(method=b"POST", headers=b"Transfer-Encoding: chunked\r\n",
                           body=b"a\r\n01234")) == [("head",), ("data", b"01234"), ("need_data",)]
    assert feed(s, b"56789") == [("data", b"56789"), ("need_data",)]
    assert feed(s, b"\r\n0\r\n") == [("need_data",)]  # the trailer section is still open
    assert feed(s, b"\r\n") == [("end",), ("paused",)]


# ---------------------------------------------------------------------------------------------
# server: pipelining and keep-alive

def test_pipelined_request_waits_for_the_response(h1c):
    second = request(b"/2", method=b"POST", headers=b"Content-Length: 3\r\n", body=b"abc")
    s = h1c.ServerConn()
    assert feed(s, request(b"/1") + second + request(b"/3")) == [("head",), ("paused",)]
    assert s.head.path == b"/1"
    # the next requests are buffered, not parsed, while the first is answered
    for _ in range(3):
        assert s.event() == ("paused",)
    assert s.buffered_bytes == len(second) + len(request(b"/3"))
    assert respond(s, b"one") == (True, b"one", True)
    assert (s.state, s.head) == (pure.R_HEAD, None)
    assert pull(s) == [("head",), ("data", b"abc"), ("end",), ("paused",)]
    assert s.head.path == b"/2"
    assert respond(s)[2] is True
    assert pull(s) == [("head",), ("paused",)]
    assert s.head.path == b"/3"
    assert respond(s)[2] is True
    assert pull(s) == [("need_data",)]


def test_pipelined_request_never_parsed_after_close(h1c):
    s = h1c.ServerConn()
    feed(s, request(b"/1", headers=b"Connection: close\r\n") + request(b"/2"))
    keep, _, more = respond(s)
    assert (keep, more) == (False, False)
    assert s.event() == ("paused",)
    assert s.head.path == b"/1"
    assert s.buffered_bytes == len(request(b"/2"))


@pytest.mark.parametrize("version,headers,keep", [
    (b"1.1", b"", True),
    (b"1.1", b"Connection: close\r\n", False),
    (b"1.1", b"Connection: keep-alive, Close\r\n", False),
    (b"1.1", b"Connection: x-a\r\nConnection: close\r\n", False),
    (b"1.1", b"Connection: keep-alive\r\n", True),
    (b"1.0", b"", False),
    (b"1.0", b"Connection: keep-alive\r\n", True),
    (b"1.0", b"Connection: Keep-Alive\r\n", True),
    (b"1.0", b"Connection: keep-alive, close\r\n", False),
])
def test_keep_alive_rules(h1c, version, headers, keep):
    s = h1c.ServerConn()
    feed(s, request(version=version, headers=headers) + request(b"/next"))
    assert s.keep_alive is keep
    got = respond(s, b"x")
    assert (got[0], got[2]) == (keep, keep)
    assert pull(s)[0] == (("head",) if keep else ("paused",))


def test_draining_ends_the_connection_after_the_response(h1c):
    s = h1c.ServerConn()
    feed(s, request(b"/1") + request(b"/2"))
    s.set_draining()
    assert respond(s) == (False, b"", False)
    assert s.keep_alive is False
    # decided when the response starts: draining after that does not cut the exchange short
    s = h1c.ServerConn()
    feed(s, request(b"/1") + request(b"/2"))
    assert s.begin_response(BODY_NONE) is True
    s.set_draining()
    assert s.finish_response() == (b"", True)
    assert pull(s) == [("head",), ("paused",)]
    assert s.begin_response(BODY_NONE) is False
    # and it can be switched off again
    s = h1c.ServerConn()
    feed(s, request(b"/1"))
    s.set_draining()
    s.set_draining(False)
    assert respond(s)[2] is True


def test_early_response_while_the_body_is_unread(h1c):
    s = h1c.ServerConn()
    feed(s, request(method=b"POST", headers=b"Content-Length: 10\r\n", body=b"abc"))
    assert s.state == pure.R_BODY
    assert respond(s, b"denied") == (False, b"denied", False)
    # the rest of the body is still decoded (a caller may drain it), but nothing after it is
    assert feed(s, b"defghij") == [("data", b"defghij"), ("end",), ("paused",)]
    assert s.event() == ("paused",)


def test_response_before_end_is_pulled_is_not_kept_alive(h1c):
    # "read whole" means the end event was taken: a caller answers after `end`, or closes.
    s = h1c.ServerConn()
    s.receive_data(request(method=b"POST", headers=b"Content-Length: 3\r\n", body=b"abc"))
    assert s.event() == ("head",)
    assert s.event() == ("data", b"abc")
    assert s.begin_response(BODY_NONE) is False


def test_early_response_on_chunked_body(h1c):
    s = h1c.ServerConn()
    feed(s, request(method=b"POST", headers=b"Transfer-Encoding: chunked\r\n", body=b"3\r\nabc"))
    assert respond(s)[::2] == (False, False)


def test_client_half_close_ends_keep_alive(h1c):
    s = h1c.ServerConn()
    feed(s, request())
    s.receive_eof()
    assert s.event() == ("paused",)  # the request is complete; it is answered
    assert respond(s, b"ok") == (False, b"ok", False)


# ---------------------------------------------------------------------------------------------
# server: 100-continue

EXPECT = b"Expect: 100-continue\r\n"


def test_wants_continue_while_body_wanted(h1c):
    s = h1c.ServerConn()
    feed(s, request(method=b"POST", headers=EXPECT + b"Content-Length: 5\r\n"))
    assert s.wants_continue() is True
    assert s.wants_continue() is True  # asking does not change it
    s.mark_continue_sent()
    assert s.wants_continue() is False
    assert feed(s, b"hello") == [("data", b"hello"), ("end",), ("paused",)]


def test_no_continue_once_body_bytes_arrived(h1c):
    s = h1c.ServerConn()
    s.receive_data(request(method=b"POST", headers=EXPECT + b"Content-Length: 5\r\n", body=b"he"))
    assert s.event() == ("head",)
    assert s.wants_continue() is False  # buffered, not yet read
    assert s.event() == ("data", b"he")
    assert s.wants_continue() is False  # read


def test_no_continue_after_a_response_started(h1c):
    s = h1c.ServerConn()
    feed(s, request(method=b"POST", headers=EXPECT + b"Transfer-Encoding: chunked\r\n"))
    assert s.wants_continue() is True
    assert s.begin_response(BODY_LENGTH, 3) is False
    assert s.wants_continue() is False


@pytest.mark.parametrize("head", [
    request(method=b"POST", headers=EXPECT + b"Content-Length: 0\r\n"),
    request(headers=EXPECT),
    request(method=b"POST", version=b"1.0", headers=EXPECT + b"Content-Length: 5\r\n"),
    request(method=b"POST", headers=b"Content-Length: 5\r\n"),
])
def test_no_continue_when_not_asked_or_no_body(h1c, head):
    s = h1c.ServerConn()
    feed(s, head)
    assert s.wants_continue() is False


def test_continue_is_per_request(h1c):
    s = h1c.ServerConn()
    post = request(method=b"POST", headers=EXPECT + b"Content-Length: 1\r\n")
    feed(s, post)
    s.mark_continue_sent()
    feed(s, b"x")
    respond(s)
    feed(s, post)
    assert s.wants_continue() is True


# ---------------------------------------------------------------------------------------------
# server: errors and EOF

HEAD_ERRORS = [
    (b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n", 400),
    (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"GET /" + b"a" * 9000, 414),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 62000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: v\r\n" * 100 + b"\r\n", 431),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\n\r\n", 417),
]


@pytest.mark.parametrize("data,status", HEAD_ERRORS, ids=lambda v: str(v)[:40])
def test_head_errors_carry_their_status(h1c, data, status):
    s = h1c.ServerConn()
    evs = feed(s, data)
    assert len(evs) == 1 and evs[0][:2] == ("error", status), evs
    assert (s.state, s.error_status, s.error_reason) == (pure.R_ERROR, status, evs[0][2])
    assert isinstance(s.error_reason, str) and s.error_reason
    # sticky: more bytes or EOF change nothing
    assert feed(s, request()) == evs
    s.receive_eof()
    assert s.event() == evs[0]


def test_101st_field_line_refused_at_its_first_byte(h1c):
    # The parser refuses a 101st field line as soon as its first byte arrives; fed whole or
    # byte by byte, the connection must say so without waiting for a line end.
    data = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: v\r\n" * 99 + b"Y"
    whole = h1c.ServerConn()
    assert feed(whole, data)[-1][:2] == ("error", 431)
    s = h1c.ServerConn()
    for i in range(len(data) - 1):
        assert feed(s, data[i:i + 1]) == [("need_data",)], i
    assert feed(s, b"Y")[-1][:2] == ("error", 431)


@pytest.mark.parametrize("body", [
    b"zz\r\nhello\r\n0\r\n\r\n",
    b"0x5\r\nhello\r\n0\r\n\r\n",
    b"5 \r\nhello\r\n0\r\n\r\n",
    b"5;\r\nhello\r\n0\r\n\r\n",
    b"+5\r\nhello\r\n0\r\n\r\n",
    b"5\nhello\n0\n\n",
    b"f" * 40 + b"\r\nxxx",
    b"3\r\nxxx__1a\r\n0\r\n\r\n",
    b"3\r\nabc\r\n0\r\nbad trailer\r\n\r\n",
])
def test_malformed_chunks_are_400_downstream(h1c, body):
    s = h1c.ServerConn()
    evs = merge(feed(s, request(method=b"POST", headers=b"Transfer-Encoding: chunked\r\n",
                                body=body)))
    assert evs[-1][:2] == ("error", 400), evs
    assert s.state == pure.R_ERROR
    # validate before forwarding: a bad first chunk line is found before any body byte is out
    if not body.startswith(b"3\r\n"):
        assert evs == [("head",), evs[-1]]


def test_eof_before_a_head_is_clean(h1c):
    s = h1c.ServerConn()
    s.receive_eof()
    assert s.event() == ("eof",)
    assert (s.state, s.buffered_bytes) == (pure.R_HEAD, 0)
    # and between requests on a kept-alive connection
    s = h1c.ServerConn()
    feed(s, request())
    respond(s)
    s.receive_eof()
    assert s.event() == ("eof",)
    assert s.buffered_bytes == 0


@pytest.mark.parametrize("partial", [b"G", b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n"])
def test_eof_mid_head(h1c, partial):
    s = h1c.ServerConn()
    assert feed(s, partial) == [("need_data",)]
    s.receive_eof()
    assert s.event() == ("eof",)
    assert (s.state, s.buffered_bytes) == (pure.R_HEAD, len(partial))


@pytest.mark.parametrize("headers,body,data", [
    (b"Content-Length: 10\r\n", b"abc", b"abc"),
    (b"Content-Length: 10\r\n", b"", b""),
    (b"Transfer-Encoding: chunked\r\n", b"5\r\nhel", b"hel"),
    (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n", b"hello"),
    (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\nT: x\r\n", b"hello"),
    (b"Transfer-Encoding: chunked\r\n", b"", b""),
])
def test_eof_mid_body_is_truncated(h1c, headers, body, data):
    s = h1c.ServerConn()
    s.receive_data(request(method=b"POST", headers=headers, body=body))
    s.receive_eof()
    evs = merge(pull(s))
    want = [("head",)] + ([("data", data)] if data else [])
    assert evs == want + [("error", 400, pure.R_BODY_TRUNCATED)]


# ---------------------------------------------------------------------------------------------
# server: split at every position, and the hardening corpus

STREAMS = [
    request(b"/1") + request(b"/2", method=b"POST", headers=b"Content-Length: 4\r\n", body=b"abcd"),
    request(method=b"POST", headers=b"Transfer-Encoding: chunked\r\n",
            body=chunked(b"hello", b" ", b"world", ext=b";e=\"x y\"", trailers=b"T: 1\r\n"))
    + request(b"/after"),
    b"\r\n" + request(headers=b"Connection: close\r\n") + request(b"/never"),
    request(version=b"1.0", headers=b"Connection: keep-alive\r\n") + request(b"/2", version=b"1.0"),
    request(method=b"POST", headers=EXPECT + b"Content-Length: 2\r\n", body=b"ok"),
    request(method=b"POST", headers=b"Transfer-Encoding: chunked\r\n", body=b"5\r\nhello\r\nzz\r\n"),
    request() + b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n",
    request(method=b"POST", headers=b"Content-Length: 5\r\n", body=b"ab"),
    request(b"/1") + b"GET /partial HTTP/1.1\r\nHos",
]


@pytest.mark.parametrize("data", STREAMS, ids=range(len(STREAMS)))
@pytest.mark.parametrize("eof", [False, True])
def test_split_anywhere_gives_the_same_events(h1c, data, eof):
    ref = serve(h1c, [data], eof)[0]
    for pieces in split_all(data):
        assert serve(h1c, pieces, eof)[0] == ref, [len(p) for p in pieces]


ALL_CASES = CORPUS + EXTRA


def _check_corpus(trace, expected):
    if isinstance(expected, int):
        assert trace[-1][:2] == ("error", expected), trace
        return
    what, checks = expected
    if what == "incomplete":
        assert trace and trace[-1][0] not in ("error", "response"), trace
        return
    checks = dict(checks or {})
    n = checks.pop("n_requests", 1)
    assert sum(1 for ev in trace if ev[0] == "head") == n, trace
    assert not any(ev[0] == "error" for ev in trace), trace
    if "body" in checks:
        first = trace[:trace.index(("end",))] if ("end",) in trace else trace
        assert b"".join(ev[1] for ev in first if ev[0] == "data") == checks["body"]


@pytest.mark.parametrize("case", ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_hardening_corpus(h1c, case):
    _, data, expected = case
    trace = serve(h1c, [data])[0]
    _check_corpus(trace, expected)
    if len(data) <= 2000:
        assert serve(h1c, [data[i:i + 1] for i in range(len(data))])[0] == trace
    else:
        assert serve(h1c, [data[i:i + 4093] for i in range(0, len(data), 4093)])[0] == trace
    if isinstance(expected, int):
        assert serve(h1c, [data + NEXT_REQUEST])[0] == trace  # what follows never matters


# ---------------------------------------------------------------------------------------------
# validate_buffered: the body bytes that came with a head are checked before it is forwarded

CHUNKED_POST = request(method=b"POST", headers=b"Transfer-Encoding: chunked\r\n")


def _decoded_error(h1c, conn_factory, prefix, body):
    """The error event plain decoding of `prefix + body` ends in (the reference)."""
    conn = conn_factory()
    evs = merge(feed(conn, prefix + body))
    assert evs[-1][0] == "error", evs
    return evs[-1]


@pytest.mark.parametrize("body", CHUNKED_INVALID, ids=range(len(CHUNKED_INVALID)))
def test_validate_buffered_finds_the_decoders_fault_before_the_head_goes_on(h1c, body):
    s = h1c.ServerConn()
    s.receive_data(CHUNKED_POST + body)
    assert s.event() == ("head",)
    assert s.validate_buffered() is False
    want = _decoded_error(h1c, h1c.ServerConn, CHUNKED_POST, body)
    assert want[1] == 400
    # nothing of the body was handed out: the next event is the decoder's own error
    assert (s.event(), s.state, s.body_received) == (want, pure.R_ERROR, 0)
    c = h1c.ClientConn()
    c.begin_request(False, BODY_NONE)
    head = response(headers=b"Transfer-Encoding: chunked\r\n")
    c.receive_data(head + body)
    assert c.event() == ("head",)
    assert c.validate_buffered() is False
    got = c.event()
    assert got[:2] == ("error", 502) and got[2] == want[2]


@pytest.mark.parametrize("body,data", CHUNKED_VALID, ids=range(len(CHUNKED_VALID)))
def test_validate_buffered_passes_valid_bodies_and_consumes_nothing(h1c, body, data):
    for cut in (len(body), len(body) // 2, 1):
        s = h1c.ServerConn()
        s.receive_data(CHUNKED_POST + body[:cut] + (NEXT_REQUEST if cut == len(body) else b""))
        assert s.event() == ("head",)
        before = s.buffered_bytes
        assert s.validate_buffered() is True
        assert s.buffered_bytes == before
        evs = merge(pull(s) + (feed(s, body[cut:]) if cut < len(body) else []))
        assert evs[-2:] == [("end",), ("paused",)] and b"".join(
            e[1] for e in evs if e[0] == "data") == data


def test_validate_buffered_reads_on_from_where_the_decoder_is(h1c):
    # Mid-body (data partly handed out, a chunk open), the check goes on from the decoder's
    # state: the rest of an open chunk is data, not a size line.
    s = h1c.ServerConn()
    assert feed(s, CHUNKED_POST + b"a\r\n01234") == [("head",), ("data", b"01234"), ("need_data",)]
    s.receive_data(b"5\r\n0\r\n")  # the chunk's last 5 bytes, then no CRLF (fresh: size 5)
    assert s.validate_buffered() is False
    assert s.event()[:2] == ("error", 400)
    s = h1c.ServerConn()
    feed(s, CHUNKED_POST + b"a\r\n01234")
    s.receive_data(b"zzzzz\r\n0\r\n\r\n")  # data, though "zzzzz" is no size line
    assert s.validate_buffered() is True
    assert merge(pull(s)) == [("data", b"zzzzz"), ("end",), ("paused",)]


def test_validate_buffered_is_a_no_op_outside_chunked_bodies(h1c):
    s = h1c.ServerConn()
    s.receive_data(request(method=b"POST", headers=b"Content-Length: 3\r\n", body=b"abcGARBAGE"))
    assert s.event() == ("head",)
    assert s.validate_buffered() is True  # bytes past the length are the next request's
    s = h1c.ServerConn()
    assert s.validate_buffered() is True  # no head yet
    s.receive_data(request() + b"zz\r\n")
    assert s.event() == ("head",)
    assert s.validate_buffered() is True


# ---------------------------------------------------------------------------------------------
# sending: framing is canonical, lengths are enforced

def test_chunked_encoding_is_canonical(h1c):
    s = h1c.ServerConn()
    feed(s, request())
    assert s.begin_response(BODY_CHUNKED) is True
    assert s.send_state == pure.W_BODY
    assert s.send_body(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert s.send_body(b"") == b""  # never a zero-size chunk before the end
    assert s.send_body(bytearray(b"y" * 4096)) == b"1000\r\n" + b"y" * 4096 + b"\r\n"
    assert s.send_body(memoryview(b"\x00")) == b"1\r\n\x00\r\n"
    assert s.finish_response() == (b"0\r\n\r\n", True)
    assert s.send_state == pure.W_DONE


def test_content_length_overrun_raises(h1c):
    s = h1c.ServerConn()
    feed(s, request())
    s.begin_response(BODY_LENGTH, 5)
    assert s.send_body(b"abc") == b"abc"
    with pytest.raises(ProtocolError) as exc:
        s.send_body(b"def")
    assert (exc.value.status, exc.value.reason) == (502, pure.R_BODY_OVERRUN)
    assert s.send_body(b"de") == b"de"  # the refused piece was not counted
    with pytest.raises(ProtocolError):
        s.send_body(b"!")
    assert s.finish_response() == (b"", True)


def test_body_for_a_bodiless_response_raises(h1c):
    s = h1c.ServerConn()
    feed(s, request())
    s.begin_response(BODY_NONE)
    with pytest.raises(ProtocolError) as exc:
        s.send_body(b"x")
    assert exc.value.status == 502
    assert s.finish_response() == (b"", True)


def test_client_request_framing(h1c):
    c = h1c.ClientConn()
    c.begin_request(False, BODY_CHUNKED)
    assert (c.state, c.send_state) == (pure.R_HEAD, pure.W_BODY)
    assert c.send_body(b"hello") == b"5\r\nhello\r\n"
    assert c.send_body(b"z" * 255) == b"ff\r\n" + b"z" * 255 + b"\r\n"
    assert c.finish_request() == b"0\r\n\r\n"
    assert c.send_state == pure.W_DONE
    c = h1c.ClientConn()
    c.begin_request(False, BODY_LENGTH, 4)
    assert c.send_body(b"abcd") == b"abcd"
    with pytest.raises(ProtocolError) as exc:
        c.send_body(b"e")
    assert exc.value.reason == pure.R_BODY_OVERRUN
    assert c.finish_request() == b""
    c = h1c.ClientConn()
    c.begin_request(False, BODY_NONE)
    assert c.send_state == pure.W_DONE
    assert c.finish_request() == b""


# ---------------------------------------------------------------------------------------------
# client: responses

def test_content_length_response_and_reuse(h1c):
    c, evs = client(h1c, response(headers=b"Content-Length: 5\r\n", body=b"hello"))
    assert evs == [("head",), ("data", b"hello"), ("end",), ("paused",)]
    assert (c.head.status, c.head.reason, c.body_kind, c.body_received) == (
        200, b"OK", BODY_LENGTH, 5)
    assert (c.state, c.got_bytes, c.can_reuse()) == (pure.R_DONE, True, True)
    c.recycle()
    assert (c.state, c.send_state, c.head, c.got_bytes, c.can_reuse()) == (
        pure.R_IDLE, pure.W_IDLE, None, False, False)
    assert c.event() == ("need_data",)
    c.begin_request(False, BODY_NONE)
    assert feed(c, response(b"404 Not Found", b"Content-Length: 0\r\n")) == [
        ("head",), ("end",), ("paused",)]
    assert c.head.status == 404 and c.can_reuse()


def test_chunked_response(h1c):
    body = chunked(b"abc", b"defg", ext=b";x", trailers=b"Server-Timing: 1\r\n")
    c, evs = client(h1c, response(headers=b"Transfer-Encoding: chunked\r\n", body=body))
    assert merge(evs) == [("head",), ("data", b"abcdefg"), ("end",), ("paused",)]
    assert (c.body_kind, c.body_received, c.can_reuse()) == (BODY_CHUNKED, 7, True)


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
def test_close_delimited_response(h1c, version):
    c, evs = client(h1c, response(body=b"part one", version=version))
    assert evs == [("head",), ("data", b"part one"), ("need_data",)]
    assert c.body_kind == BODY_CLOSE
    assert feed(c, b", two") == [("data", b", two"), ("need_data",)]
    c.receive_eof()
    assert pull(c) == [("end",), ("paused",)]
    assert c.body_received == 13
    assert c.can_reuse() is False  # never reusable, whatever the headers said


def test_close_delimited_response_with_keep_alive_header_is_not_reused(h1c):
    c, _ = client(h1c, response(headers=b"Connection: keep-alive\r\n", body=b"x", version=b"1.0"))
    c.receive_eof()
    assert pull(c) == [("end",), ("paused",)]
    assert c.can_reuse() is False


@pytest.mark.parametrize("status,headers,head_request", [
    (b"200 OK", b"Content-Length: 100\r\n", True),
    (b"200 OK", b"Transfer-Encoding: chunked\r\n", True),
    (b"200 OK", b"", True),
    (b"204 No Content", b"", False),
    (b"204 No Content", b"Content-Length: 0\r\n", False),
    (b"304 Not Modified", b"Content-Length: 100\r\n", False),
    (b"304 Not Modified", b"", False),
])
def test_responses_without_a_body(h1c, status, headers, head_request):
    c, evs = client(h1c, response(status, headers) + response(), head_request=head_request)
    assert evs == [("head",), ("end",), ("paused",)]
    assert (c.body_kind, c.body_received) == (BODY_NONE, 0)
    assert c.buffered_bytes == len(response())
    assert c.can_reuse() is False  # the next response's bytes are stray here
    c, evs = client(h1c, response(status, headers), head_request=head_request)
    assert evs == [("head",), ("end",), ("paused",)]
    assert c.can_reuse() is True


@pytest.mark.parametrize("headers", [b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n"])
def test_204_with_a_body_is_502(h1c, headers):
    c, evs = client(h1c, response(b"204 No Content", headers, b"abc"))
    assert evs == [("error", 502, pure.R_204_BODY)]
    assert (c.state, c.error_status, c.head) == (pure.R_ERROR, 502, None)


def test_informational_responses_are_skipped(h1c):
    data = (response(b"100 Continue") + response(b"103 Early Hints", b"Link: </a>\r\n")
            + response(headers=b"Content-Length: 2\r\n", body=b"ok"))
    c, evs = client(h1c, data)
    assert evs == [("informational", 100), ("informational", 103), ("head",),
                   ("data", b"ok"), ("end",), ("paused",)]
    assert c.head.status == 200 and c.can_reuse()


def test_101_without_an_upgrade_request_is_502(h1c):
    c, evs = client(h1c, response(b"101 Switching Protocols", b"Upgrade: websocket\r\n"))
    assert evs == [("error", 502, pure.R_UNSOLICITED_101)]
    assert c.state == pure.R_ERROR


def test_101_to_an_upgrade_request_switches(h1c):
    tunnel = b"\x81\x05hello"
    c, evs = client(h1c, response(b"101 Switching Protocols", b"Upgrade: websocket\r\n"
                                  b"Connection: Upgrade\r\n") + tunnel, upgrade=True)
    assert evs == [("upgrade",)]
    assert (c.state, c.head.status, c.buffered_bytes) == (pure.R_UPGRADED, 101, len(tunnel))
    assert c.event() == ("paused",)  # the tunnel's bytes are not HTTP
    assert c.can_reuse() is False


def test_non_101_answer_to_an_upgrade_request_is_a_normal_response(h1c):
    c, evs = client(h1c, response(b"426 Upgrade Required", b"Content-Length: 1\r\n", b"!"),
                    upgrade=True)
    assert evs == [("head",), ("data", b"!"), ("end",), ("paused",)]
    assert c.can_reuse() is True


def test_stray_bytes_after_a_response_prevent_reuse(h1c):
    c, evs = client(h1c, response(headers=b"Content-Length: 2\r\n", body=b"okEXTRA"))
    assert evs == [("head",), ("data", b"ok"), ("end",), ("paused",)]
    assert (c.buffered_bytes, c.can_reuse()) == (5, False)


def test_bytes_before_any_request_are_502(h1c):
    c = h1c.ClientConn()
    c.receive_data(b"HTTP/1.1 200 OK\r\n\r\n")
    assert c.event() == ("error", 502, pure.R_STRAY)
    assert c.state == pure.R_ERROR


def test_bytes_buffered_at_begin_request_count_as_got_bytes(h1c):
    c = h1c.ClientConn()
    c.receive_data(b"HTTP/1.1 2")
    c.begin_request(False, BODY_NONE)
    assert c.got_bytes is True


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/2 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    b"ICY 200 OK\r\n\r\n",
])
def test_malformed_response_head_is_502(h1c, data):
    c, evs = client(h1c, data)
    assert len(evs) == 1 and evs[0][:2] == ("error", 502), evs
    assert (c.state, c.got_bytes) == (pure.R_ERROR, True)


@pytest.mark.parametrize("body", [b"zz\r\n", b"+5\r\nhello\r\n0\r\n\r\n", b"f" * 40 + b"\r\n",
                                  b"5\r\nhelloX\r\n0\r\n\r\n", b"5\nhello\r\n"])
def test_malformed_response_chunk_line_is_502(h1c, body):
    c, evs = client(h1c, response(headers=b"Transfer-Encoding: chunked\r\n", body=body))
    evs = merge(evs)
    assert evs[-1][:2] == ("error", 502), evs
    if not body.startswith(b"5\r\nhello"):
        assert evs == [("head",), evs[-1]]  # found before any body byte is handed out


def test_upstream_eof_before_any_byte(h1c):
    c = h1c.ClientConn()
    c.begin_request(False, BODY_NONE)
    c.receive_eof()
    assert c.event() == ("eof",)
    assert (c.got_bytes, c.state) == (False, pure.R_HEAD)


def test_upstream_eof_mid_head(h1c):
    c, _ = client(h1c, b"HTTP/1.1 200 OK\r\nContent-")
    c.receive_eof()
    assert c.event() == ("eof",)
    assert (c.got_bytes, c.buffered_bytes) == (True, 25)


@pytest.mark.parametrize("headers,body", [
    (b"Content-Length: 10\r\n", b"abc"),
    (b"Transfer-Encoding: chunked\r\n", b"5\r\nab"),
    (b"Transfer-Encoding: chunked\r\n", b"2\r\nab\r\n0\r\n"),
])
def test_upstream_eof_mid_body_is_502(h1c, headers, body):
    c, _ = client(h1c, response(headers=headers, body=body))
    c.receive_eof()
    assert merge(pull(c))[-1] == ("error", 502, pure.R_BODY_TRUNCATED)


@pytest.mark.parametrize("version,headers,reuse", [
    (b"1.1", b"", True),
    (b"1.1", b"Connection: close\r\n", False),
    (b"1.0", b"", False),
    (b"1.0", b"Connection: keep-alive\r\n", True),
])
def test_response_keep_alive(h1c, version, headers, reuse):
    c, evs = client(h1c, response(headers=headers + b"Content-Length: 1\r\n", body=b"x",
                                  version=version))
    assert evs[-2:] == [("end",), ("paused",)]
    assert c.can_reuse() is reuse


def test_not_reusable_until_the_request_was_sent_whole(h1c):
    c = h1c.ClientConn()
    c.begin_request(False, BODY_LENGTH, 10)
    c.send_body(b"abc")
    assert feed(c, response(b"413 Too Large", b"Content-Length: 0\r\n"))[-2:] == [
        ("end",), ("paused",)]
    assert c.can_reuse() is False
    c.finish_request()
    assert c.can_reuse() is True


def test_not_reusable_after_upstream_close(h1c):
    c, _ = client(h1c, response(headers=b"Content-Length: 1\r\n", body=b"x"))
    assert c.can_reuse() is True
    c.receive_eof()
    assert c.can_reuse() is False


def test_response_split_anywhere_gives_the_same_events(h1c):
    data = (response(b"100 Continue")
            + response(headers=b"Transfer-Encoding: chunked\r\n",
                       body=chunked(b"hello", b"world", ext=b";a=b", trailers=b"T: v\r\n")))

    def run(pieces):
        c = h1c.ClientConn()
        c.begin_request(False, BODY_NONE)
        evs = []
        for p in pieces:
            evs += feed(c, p)
        return merge(evs), c.can_reuse()

    ref = run([data])
    assert ref == ([("informational", 100), ("head",), ("data", b"helloworld"), ("end",),
                    ("paused",)], True)
    for pieces in split_all(data):
        got = run(pieces)
        # waiting for more bytes may repeat `paused`-free prefixes; the sequence must match
        assert got == ref, [len(p) for p in pieces]
