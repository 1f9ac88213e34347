"""Property tests (hypothesis) of the HTTP/1.1 connection objects, compiled and pure.

Properties:

* twins agree: meshcore._ext.h1conn and meshcore.proto.h1conn, driven identically over generated
  byte streams (valid messages cut into random pieces, the same mutated, and garbage), give the
  same events, the same state after every event, the same error statuses and reasons, and the
  same bytes to send;
* split invariance: each twin gives the same events (body bytes joined) whether a stream arrives
  whole or in pieces;
* validate_buffered predicts the decoder: asked right after a head, it is False exactly when
  decoding the bytes already buffered ends in an error (which is then the next event), it
  consumes nothing, and the twins give the same verdict;
* re-framing: whatever a ServerConn accepts, re-sent through a ClientConn with the decoded
  framing (begin_request/send_body/finish_request), is a message with the same body, the same
  kind of framing (Content-Length stays the same length, chunked stays chunked) in canonical form
  (lowercase hex sizes, no extensions, no trailers), which parses back to the same body and is a
  fixed point of a second round; the same for responses (ClientConn in, ServerConn out, a
  close-delimited body re-framed as chunked).

Bounded for CI: about 30-60 s in all on one shared core. Longer runs:
MESHCORE_FUZZ_EXAMPLES=N sets every test's example count (e.g. 20000). Runs are derandomized
(the same examples every run, so a failure reproduces) and use no example database; a failure
prints the example and a @reproduce_failure blob.
"""
import importlib
import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from meshcore.errors import ProtocolError
from meshcore.proto import h1conn as pure
from meshcore.proto.h1_parse import BODY_CHUNKED, BODY_CLOSE, BODY_LENGTH, BODY_NONE

_EXAMPLES = int(os.environ.get("MESHCORE_FUZZ_EXAMPLES", "0") or 0)


def fuzz(default_examples):
    return settings(max_examples=_EXAMPLES or default_examples, deadline=None, derandomize=True,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def _compiled():
    if os.environ.get("MESHCORE_NO_EXTENSIONS") == "1":
        pytest.skip("MESHCORE_NO_EXTENSIONS=1: pure-Python build, compiled h1conn not tested")
    try:
        return importlib.import_module("meshcore._ext.h1conn")
    except ImportError as e:
        pytest.fail(f"meshcore._ext.h1conn is not built ({e}); build it with "
                    "`python setup.py build_ext --inplace` or set MESHCORE_NO_EXTENSIONS=1")


@pytest.fixture(params=["pure", "compiled"])
def h1c(request):
    return pure if request.param == "pure" else _compiled()


@pytest.fixture
def both():
    return pure, _compiled()


# ---------------------------------------------------------------------------------------------
# generators

SPICE = [b" ", b"\t", b"\r", b"\n", b"\r\n", b":", b",", b";", b"=", b"\"", b"\x00", b"\x7f",
         b"\xff", b"0", b"9", b"a", b"f", b"F", b"x", b"-", b"+", b"\r\n\r\n", b"\r\n ",
         b"chunked", b"close", b"keep-alive", b"100-continue", b"Content-Length: 3\r\n",
         b"Transfer-Encoding: chunked\r\n", b"HTTP/1.1 ", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]

CHUNK_EXTS = [b"", b"", b";a", b";a=b", b' ;q="x y"', b";a=b;c", b"\t;k=\"\\\"\""]
TRAILERS = [b"", b"", b"T: v\r\n", b"Server-Timing: a, b\r\nX: 1\r\n"]


@st.composite
def chunked_body(draw, data):
    """`data` chunked at random cuts, with random size spellings, extensions and trailers."""
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=4))))
    pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)]) if data[a:b]]
    out = []
    for p in pieces:
        size = draw(st.sampled_from([b"%x", b"%X", b"0%x"])) % len(p)
        out.append(size + draw(st.sampled_from(CHUNK_EXTS)) + b"\r\n" + p + b"\r\n")
    out.append(draw(st.sampled_from([b"0", b"000"])) + draw(st.sampled_from(CHUNK_EXTS))
               + b"\r\n" + draw(st.sampled_from(TRAILERS)) + b"\r\n")
    return b"".join(out)


def _fields(draw, pool):
    picked = draw(st.lists(st.sampled_from(pool), max_size=4, unique=True))
    return b"".join(f + b"\r\n" for f in picked)


REQUEST_FIELDS = [b"Accept: */*", b"Connection: close", b"Connection: keep-alive",
                  b"X-Thing: a b", b"Expect: 100-continue", b"TE: trailers",
                  b"Upgrade: websocket", b"Connection: x-thing", b"Keep-Alive: timeout=5"]


@st.composite
def request_msg(draw, valid_only=True):
    """One request with its body framed as the generator chose. Returns (bytes, body)."""
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS"]))
    target = draw(st.sampled_from([b"/", b"/a/b?c=d&e", b"http://h.example:8080/p?q",
                                   b"/%7Euser"]))
    if method == b"OPTIONS" and draw(st.booleans()):
        target = b"*"
    host = draw(st.sampled_from([b"Host: a\r\n", b"Host: h.example:80\r\n", b"host: [::1]\r\n"]))
    if version == b"1.0" and draw(st.booleans()):
        host = b""
    framing = draw(st.sampled_from(["none", "cl", "cl", "cl0", "chunked", "chunked"]))
    if version == b"1.0" and framing == "chunked" and valid_only:
        framing = "cl"
    body = draw(st.binary(max_size=40)) if framing in ("cl", "chunked") else b""
    if framing == "cl":
        frame, wire = b"Content-Length: %d\r\n" % len(body), body
    elif framing == "cl0":
        frame, wire = b"Content-Length: 0\r\n", b""
    elif framing == "chunked":
        frame, wire = b"Transfer-Encoding: chunked\r\n", draw(chunked_body(body))
    else:
        frame, wire = b"", b""
    fields = [host, frame, _fields(draw, REQUEST_FIELDS)]
    fields = draw(st.permutations(fields))
    lead = draw(st.sampled_from([b"", b"", b"", b"\r\n"]))
    return (lead + method + b" " + target + b" HTTP/" + version + b"\r\n" + b"".join(fields)
            + b"\r\n" + wire, body)


RESPONSE_FIELDS = [b"Server: x", b"Connection: close", b"Connection: keep-alive",
                   b"Cache-Control: no-cache", b"Set-Cookie: a=b", b"Keep-Alive: timeout=5"]
STATUSES = [b"200 OK", b"200 OK", b"201 Created", b"404 Not Found", b"500 Oops", b"204 No Content",
            b"304 Not Modified", b"302 Found", b"200"]


@st.composite
def response_msg(draw, head_request=False, valid_only=True):
    """Zero to two 1xx, then one final response. Returns (bytes, body as a client decodes it)."""
    info = draw(st.lists(st.sampled_from([b"HTTP/1.1 100 Continue\r\n\r\n",
                                          b"HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n"]),
                         max_size=2))
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    status = draw(st.sampled_from(STATUSES))
    framing = draw(st.sampled_from(["close", "cl", "cl", "cl", "chunked", "chunked", "chunked"]))
    if version == b"1.0" and framing == "chunked" and valid_only:
        framing = "cl"
    bodiless = head_request or status.startswith((b"204", b"304"))
    if status.startswith(b"204") and valid_only:
        framing = draw(st.sampled_from(["close", "cl0"]))
    body = draw(st.binary(max_size=40))
    if framing == "cl0":
        frame, wire, body = b"Content-Length: 0\r\n", b"", b""
    elif framing == "cl":
        frame, wire = b"Content-Length: %d\r\n" % len(body), body
    elif framing == "chunked":
        frame, wire = b"Transfer-Encoding: chunked\r\n", draw(chunked_body(body))
    else:
        frame, wire = b"", body
    if bodiless:
        wire, body = b"", b""
    fields = draw(st.permutations([frame, _fields(draw, RESPONSE_FIELDS)]))
    return (b"".join(info) + b"HTTP/" + version + b" " + status + b"\r\n" + b"".join(fields)
            + b"\r\n" + wire, body)


@st.composite
def mutated(draw, data):
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.integers(0, 2))
        at = draw(st.integers(0, len(data)))
        if op == 0:
            data[at:at] = draw(st.sampled_from(SPICE))
        elif op == 1 and at < len(data):
            del data[at:at + draw(st.integers(1, 4))]
        elif at < len(data):
            data[at] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def cut(draw, data):
    """`data` in pieces at random offsets (sometimes one byte at a time)."""
    if data and draw(st.integers(0, 9)) == 0:
        return [data[i:i + 1] for i in range(len(data))]
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=6))))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


@st.composite
def request_stream(draw):
    """Requests as a client may send them (pipelined), sometimes mutated, or garbage."""
    kind = draw(st.sampled_from(["valid", "valid", "valid", "mutated", "mutated", "garbage"]))
    if kind == "garbage":
        prefix = draw(st.sampled_from([b"", b"GET / HTTP/1.1\r\n", b"POST / HTTP/1.1\r\nHost: a\r\n"
                                       b"Transfer-Encoding: chunked\r\n\r\n"]))
        return prefix + draw(st.binary(max_size=80))
    msgs = draw(st.lists(request_msg(valid_only=kind == "valid"), min_size=1, max_size=3))
    data = b"".join(m for m, _ in msgs)
    if draw(st.integers(0, 5)) == 0:
        data = data[:draw(st.integers(0, len(data)))]  # cut short
    return draw(mutated(data)) if kind == "mutated" else data


@st.composite
def response_bytes(draw, head_request):
    """The upstream's answer to one request: valid, mutated, garbage, or a 101 and tunnel
    bytes; sometimes followed by stray bytes."""
    kind = draw(st.sampled_from(["valid"] * 6 + ["mutated"] * 3 + ["garbage", "upgrade"]))
    if kind == "garbage":
        prefix = draw(st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\n"
                                       b"Transfer-Encoding: chunked\r\n\r\n"]))
        return prefix + draw(st.binary(max_size=80))
    if kind == "upgrade":
        return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade"
                b"\r\n\r\n" + draw(st.binary(max_size=10)))
    data = draw(response_msg(head_request, valid_only=kind == "valid"))[0]
    if draw(st.integers(0, 9)) == 0:
        data = data[:draw(st.integers(0, len(data)))]  # cut short
    if draw(st.integers(0, 7)) == 0:
        data += draw(st.sampled_from([b"X", b"\r\n", b"HTTP/1.1 200 OK\r\n\r\n"]))  # stray
    return draw(mutated(data)) if kind == "mutated" else data


# a body to send: its length matters (Content-Length checks), not its bytes
short_body = st.integers(0, 12).map(lambda n: b"abcdefghijkl"[:n])


@st.composite
def exchanges(draw):
    """1-4 exchanges on one upstream connection: (request action, response pieces)."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        act = draw(st.tuples(
            st.integers(0, 3).map(lambda v: v == 0),         # HEAD request
            st.integers(0, 3),                               # 0: ask for an upgrade
            st.sampled_from([BODY_NONE, BODY_LENGTH, BODY_CHUNKED]),
            short_body,                                      # request body
            st.integers(0, 5),                               # 0: the request is not sent whole
        ))
        out.append((act, draw(cut(draw(response_bytes(act[0]))))))
    return out


# what a proxy does at each decision point, drawn once and replayed identically on both twins
server_actions = st.lists(st.tuples(
    st.integers(0, 4),                                   # 0: answer at the head (early)
    st.sampled_from([BODY_NONE, BODY_LENGTH, BODY_CHUNKED]),
    short_body,                                          # response body
    st.sampled_from([0, 0, 0, -1, 1]),                   # Content-Length minus the body's length
    st.integers(0, 5),                                   # 0: drain before answering
    st.booleans(),                                       # send 100 Continue when wanted
), max_size=5)


# ---------------------------------------------------------------------------------------------
# drivers: the same calls on either twin, everything observable logged

def _req_summary(h):
    return (h.method, h.target, h.path, h.version, h.host, h.content_length, h.chunked,
            h.keep_alive, h.expect_continue, h.upgrade, h.headers(), h.forward_headers())


def _resp_summary(h):
    return (h.status, h.reason, h.version, h.content_length, h.chunked, h.keep_alive,
            h.headers(), h.forward_headers())


def _try(fn, *args):
    try:
        return fn(*args)
    except ProtocolError as e:
        return ("raised", e.status, e.reason)


EOF_NONE, EOF_AFTER, EOF_WITH_LAST = 0, 1, 2  # when the peer closes: never, after the last
eofs = st.sampled_from([EOF_NONE, EOF_AFTER, EOF_WITH_LAST])  # piece was handled, or with it


def drive_server(mod, pieces, eof, actions):
    """Feed `pieces`, answer requests as `actions` say; return the log of everything seen."""
    conn = mod.ServerConn()
    log = []
    acts = iter(actions)
    closing = False

    def snap():
        return (conn.state, conn.send_state, conn.keep_alive, conn.body_kind,
                conn.body_received, conn.buffered_bytes, conn.wants_continue(),
                conn.error_status, conn.error_reason)

    def answer(act):
        _, kind, body, delta, drain, send_continue = act
        if send_continue and conn.wants_continue():
            conn.mark_continue_sent()
            log.append(("continue",))
        if drain == 0:
            conn.set_draining()
        keep = conn.begin_response(kind, max(0, len(body) + delta))
        sent = [_try(conn.send_body, p) for p in (body[:1], body[1:5], body[5:])]
        out, more = conn.finish_response()
        log.append(("response", keep, sent, out, more))
        return more

    def run():
        nonlocal closing
        for _ in range(10000):
            ev = conn.event()
            log.append(("event", ev, snap()))
            if ev[0] == "head":
                log.append(("head", _req_summary(conn.head)))
                act = next(acts, (1, BODY_NONE, b"", 0, 1, True))
                if act[0] == 0:  # answer before the body is read
                    closing = not answer(act)
                else:
                    pending.append(act)
            elif ev[0] == "paused":
                if closing or not pending:
                    return False
                if not answer(pending.pop()):
                    return False
            elif ev[0] != "data" and ev[0] != "end":
                return ev[0] == "need_data"
        raise AssertionError("no progress")

    pending = []
    going = True
    for i, piece in enumerate(pieces):
        conn.receive_data(piece)
        if eof == EOF_WITH_LAST and i == len(pieces) - 1:
            conn.receive_eof()
        going = run()
        if not going:
            break
    if going and eof == EOF_AFTER:
        conn.receive_eof()
        run()
    return log


def drive_client(mod, exchanges, eof):
    """Send each request as its action says and feed its response's pieces; go on to the next
    exchange only while the connection is reusable. `eof`: when the upstream closes."""
    conn = mod.ClientConn()
    log = []

    def snap():
        return (conn.state, conn.send_state, conn.body_kind, conn.body_received,
                conn.buffered_bytes, conn.got_bytes, conn.can_reuse(), conn.error_status,
                conn.error_reason)

    def run():
        """Events until one that waits; True when the response is still incomplete."""
        for _ in range(10000):
            ev = conn.event()
            log.append(("event", ev, snap()))
            if ev[0] == "head" or ev[0] == "upgrade":
                log.append(("head", _resp_summary(conn.head)))
            elif ev[0] not in ("data", "end", "informational"):
                return ev[0] == "need_data"
        raise AssertionError("no progress")

    for i, (act, pieces) in enumerate(exchanges):
        if i:
            reuse = conn.can_reuse()
            log.append(("reuse", reuse))
            if not reuse:
                return log
            conn.recycle()
        head_request, upgrade, kind, body, whole = act
        conn.begin_request(head_request, kind, len(body), upgrade == 0)
        sent = [_try(conn.send_body, p) for p in (body[:1], body[1:5], body[5:])]
        log.append(("request", sent, conn.finish_request() if whole else None, snap()))
        waiting = True
        for j, piece in enumerate(pieces):
            conn.receive_data(piece)
            if eof == EOF_WITH_LAST and i == len(exchanges) - 1 and j == len(pieces) - 1:
                conn.receive_eof()
            if waiting:  # after the response, more bytes are only buffered (stray)
                waiting = run()
                if not waiting and conn.state != pure.R_DONE:
                    return log  # eof, error, upgrade: the connection is done
        if waiting:
            break
    if eof == EOF_AFTER or (eof == EOF_WITH_LAST and waiting):
        conn.receive_eof()  # (waiting: an exchange before the last one never completed)
        run()
    return log


def split_free(log):
    """The parts of a log that cannot depend on how the bytes were cut: events (need_data
    dropped, body bytes joined), heads and what was sent. States and buffered counts can."""
    out = []
    for entry in log:
        if entry[0] == "event":
            ev = entry[1]
            if ev[0] == "need_data":
                continue
            if ev[0] == "data" and out and out[-1][0] == "data":
                out[-1] = ("data", out[-1][1] + ev[1])
                continue
            out.append(ev)
        elif entry[0] != "continue":
            out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------
# property: the twins agree, and a stream's cut does not matter

@fuzz(400)
@given(st.data(), request_stream(), eofs, server_actions)
def test_server_twins_agree(both, data, stream, eof, actions):
    p, c = both
    pieces = data.draw(cut(stream))
    log = drive_server(p, pieces, eof, actions)
    assert drive_server(c, pieces, eof, actions) == log
    whole = drive_server(p, [stream], eof, actions)
    assert drive_server(c, [stream], eof, actions) == whole
    if eof != EOF_WITH_LAST:  # (a close that comes with the bytes may overtake an answer)
        assert split_free(whole) == split_free(log)


@fuzz(300)
@given(exchanges(), eofs)
def test_client_twins_agree(both, exs, eof):
    p, c = both
    log = drive_client(p, exs, eof)
    assert drive_client(c, exs, eof) == log
    whole = [(act, [b"".join(pieces)]) for act, pieces in exs]
    assert drive_client(c, whole, eof) == drive_client(p, whole, eof)


@fuzz(150)
@given(exchanges(), st.sampled_from([EOF_NONE, EOF_AFTER]))
def test_client_cut_does_not_matter(h1c, exs, eof):
    whole = [(act, [b"".join(pieces)]) for act, pieces in exs]
    assert split_free(drive_client(h1c, exs, eof)) == split_free(drive_client(h1c, whole, eof))


# ---------------------------------------------------------------------------------------------
# property: validate_buffered predicts the decoder, consumes nothing, and the twins agree

def _until_wait(conn):
    evs = []
    while True:
        ev = conn.event()
        evs.append(ev)
        if ev[0] in ("need_data", "paused", "error", "eof", "upgrade"):
            return evs
        assert len(evs) < 100000


def _predicts(mod, make, data):
    """validate_buffered after the head of `data`: it is False exactly when decoding the bytes
    already there ends in an error, which is then the next event; when True, the events are
    those of a connection never asked. Returns the verdict (None: no head)."""
    conn, ref = make(mod), make(mod)
    conn.receive_data(data)
    ref.receive_data(data)
    first = [conn.event(), ref.event()]
    while first[0][0] == "informational":  # (a 1xx before the response is skipped)
        first = [conn.event(), ref.event()]
    if first != [("head",), ("head",)]:
        return None
    buffered = conn.buffered_bytes
    ok = conn.validate_buffered()
    want = _until_wait(ref)
    if ok:
        assert conn.buffered_bytes == buffered
        assert _until_wait(conn) == want
    else:
        assert want[-1][0] == "error"
        assert conn.event() == want[-1]
    return ok


def _server(mod):
    return mod.ServerConn()


def _client(mod):
    conn = mod.ClientConn()
    conn.begin_request(False, BODY_NONE)
    return conn


@st.composite
def chunked_after_head(draw, head):
    """A chunked message's head and its body (whole, cut short, mutated after the head, or
    followed by the next message): the cases validate_buffered is for."""
    body = draw(chunked_body(draw(st.binary(max_size=40))))
    how = draw(st.sampled_from(["whole", "short", "mutated", "mutated", "then-next"]))
    if how == "short":
        body = body[:draw(st.integers(0, len(body)))]
    elif how == "mutated":
        body = draw(mutated(body))
    elif how == "then-next":
        body += draw(st.sampled_from([b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"zz\r\n"]))
    return head + body


REQUEST_HEAD = b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
RESPONSE_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@fuzz(300)
@given(st.one_of(request_stream(), chunked_after_head(REQUEST_HEAD)))
def test_validate_buffered_predicts_the_request_decoder(both, stream):
    p, c = both
    verdict = _predicts(p, _server, stream)
    assert _predicts(c, _server, stream) == verdict
    event(f"verdict: {verdict}")


@fuzz(300)
@given(st.one_of(response_bytes(False), chunked_after_head(RESPONSE_HEAD)))
def test_validate_buffered_predicts_the_response_decoder(both, data):
    p, c = both
    verdict = _predicts(p, _client, data)
    assert _predicts(c, _client, data) == verdict
    event(f"verdict: {verdict}")


# ---------------------------------------------------------------------------------------------
# property: what is accepted re-serialises with the same framing, canonically

def _collect(conn, pieces, eof=False):
    """Events of one message: (head seen, body pieces, last event)."""
    body = []
    head = False
    for piece in pieces + [None]:
        if piece is None:
            if not eof:
                break
            conn.receive_eof()
        else:
            conn.receive_data(piece)
        while True:
            ev = conn.event()
            if ev[0] == "head":
                head = True
            elif ev[0] == "data":
                body.append(ev[1])
            elif ev[0] == "informational":
                continue
            elif ev[0] != "end":
                break
        if ev[0] != "need_data":
            return head, body, ev
    return head, body, ev


def canonical(kind, pieces):
    if kind == BODY_CHUNKED:
        return b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in pieces if p) + b"0\r\n\r\n"
    return b"".join(pieces)


def resend_request(mod, head, kind, pieces):
    """The request re-sent upstream through a ClientConn, the way a proxy frames it."""
    framing = {BODY_LENGTH: b"Content-Length: %d\r\n" % head.content_length,
               BODY_CHUNKED: b"Transfer-Encoding: chunked\r\n", BODY_NONE: b""}[kind]
    wire = (head.method + b" " + head.target + b" HTTP/1.1\r\nHost: " + (head.host or b"x")
            + b"\r\n" + head.forward_headers() + framing + b"\r\n")
    up = mod.ClientConn()
    up.begin_request(head.method == b"HEAD", kind, max(head.content_length, 0), head.upgrade)
    body = b"".join(up.send_body(p) for p in pieces) + up.finish_request()
    assert up.send_state == pure.W_DONE
    return wire, body


def receive_request(mod, pieces):
    conn = mod.ServerConn()
    seen, body, last = _collect(conn, pieces)
    return conn, seen, body, last


@fuzz(250)
@given(st.data(), request_msg())
def test_request_reframing(h1c, data, msg):
    raw, want = msg
    conn, seen, pieces, last = receive_request(h1c, data.draw(cut(raw)))
    assert seen and last == ("paused",), last  # valid requests are accepted whole
    head, kind = conn.head, conn.body_kind
    assert b"".join(pieces) == want
    assert kind == (BODY_CHUNKED if head.chunked else BODY_LENGTH if head.content_length > 0
                    else BODY_NONE)
    wire, body = resend_request(h1c, head, kind, pieces)
    assert body == canonical(kind, pieces)  # same framing kind, canonical form
    # it parses back to the same message, and a second round changes nothing (a fixed point)
    again, seen2, pieces2, last2 = receive_request(h1c, [wire + body])
    assert seen2 and last2 == ("paused",) and again.buffered_bytes == 0
    assert b"".join(pieces2) == want
    assert (again.body_kind, again.head.method, again.head.target) == (
        kind, head.method, head.target)
    if kind == BODY_LENGTH:
        assert again.head.content_length == head.content_length
    assert resend_request(h1c, again.head, again.body_kind, pieces2) == (wire, body)


def resend_response(mod, head, kind, pieces, head_request):
    """The response re-sent downstream through a ServerConn (close-delimited becomes chunked)."""
    out_kind = BODY_CHUNKED if kind == BODY_CLOSE else kind
    framing = {BODY_LENGTH: b"Content-Length: %d\r\n" % head.content_length,
               BODY_CHUNKED: b"Transfer-Encoding: chunked\r\n", BODY_NONE: b""}[out_kind]
    wire = (b"HTTP/1.1 %d " % head.status + head.reason + b"\r\n" + head.forward_headers()
            + framing + b"\r\n")
    down = mod.ServerConn()
    down.receive_data(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n" if head_request else
                      b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [down.event(), down.event()] == [("head",), ("paused",)]
    down.begin_response(out_kind, max(head.content_length, 0))
    body = b"".join(down.send_body(p) for p in pieces)
    out, _ = down.finish_response()
    return out_kind, wire, body + out


def receive_response(mod, pieces, head_request):
    conn = mod.ClientConn()
    conn.begin_request(head_request, BODY_NONE)
    seen, body, last = _collect(conn, pieces, eof=True)
    return conn, seen, body, last


@fuzz(250)
@given(st.data(), st.booleans())
def test_response_reframing(h1c, data, head_request):
    raw, want = data.draw(response_msg(head_request))
    conn, seen, pieces, last = receive_response(h1c, data.draw(cut(raw)), head_request)
    assert seen and last == ("paused",), last
    head, kind = conn.head, conn.body_kind
    assert b"".join(pieces) == want
    out_kind, wire, body = resend_response(h1c, head, kind, pieces, head_request)
    assert out_kind == (BODY_CHUNKED if kind == BODY_CLOSE else kind)
    assert body == canonical(out_kind, pieces)
    again, seen2, pieces2, last2 = receive_response(h1c, [wire + body], head_request)
    assert seen2 and last2 == ("paused",) and again.buffered_bytes == 0
    assert b"".join(pieces2) == want
    assert again.body_kind == out_kind
    assert resend_response(h1c, again.head, again.body_kind, pieces2, head_request) == (
        out_kind, wire, body)
