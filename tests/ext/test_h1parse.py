"""meshcore._ext.h1parse and its pure twin meshcore.proto.h1_parse: the same tests over both.

The compiled parameter fails (it does not skip) when the extension is not built, unless
MESHCORE_NO_EXTENSIONS=1 is set.
"""
import importlib
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from h1parse_corpus import CHUNKED_INVALID, CHUNKED_VALID, CORPUS, EXTRA, NEXT_REQUEST
from meshcore.errors import ProtocolError
from meshcore.proto import h1_parse as pure

IMPLS = ["pure", "compiled"]


def _compiled():
    if os.environ.get("MESHCORE_NO_EXTENSIONS") == "1":
        pytest.skip("MESHCORE_NO_EXTENSIONS=1: pure-Python build, compiled h1parse not tested")
    try:
        return importlib.import_module("meshcore._ext.h1parse")
    except ImportError as e:
        pytest.fail(f"meshcore._ext.h1parse is not built ({e}); build it with "
                    "`MESHCORE_EXT=h1parse python setup.py build_ext --inplace` "
                    "or set MESHCORE_NO_EXTENSIONS=1")


@pytest.fixture(params=IMPLS)
def h1(request):
    return pure if request.param == "pure" else _compiled()


@pytest.fixture
def both():
    return pure, _compiled()


# ---------------------------------------------------------------------------------------------
# helpers

REQ_ATTRS = ("method", "target", "path", "version", "end", "host", "content_length", "chunked",
             "keep_alive", "expect_continue", "upgrade", "n_headers")
RESP_ATTRS = ("status", "version", "reason", "end", "content_length", "chunked", "keep_alive",
              "n_headers")


def req_summary(h):
    return tuple(getattr(h, a) for a in REQ_ATTRS) + (h.headers(), h.forward_headers())


def resp_summary(h):
    return tuple(getattr(h, a) for a in RESP_ATTRS) + (h.headers(), h.forward_headers())


def run_pieces(mod, pieces):
    """Feed the pieces one by one into a receive buffer and parse requests and bodies as a server
    would: the buffer is trimmed after each head, each body piece, and to where NEED_DATA says.

    Returns ("error", status, reason) or ("ok", [(summary, body), ...], tail) with tail "clean"
    (nothing left), "incomplete" (a partial request remains) or "closed" (a request without
    keep-alive ended the connection).
    """
    buf = bytearray()
    reqs = []
    head = reader = None
    need = 0
    body = bytearray()
    try:
        for piece in pieces:
            buf += piece
            while True:
                if head is None:
                    h = mod.parse_request(buf, 0) if buf else None
                    if h is None:
                        break
                    head = h
                    del buf[:h.end]
                    kind, n = mod.request_body_kind(h)
                    body = bytearray()
                    reader = mod.ChunkedReader() if kind == mod.BODY_CHUNKED else None
                    need = n if kind == mod.BODY_LENGTH else 0
                if reader is not None:
                    k, a, b = reader.step(buf, 0, len(buf))
                    if k == mod.DATA:
                        assert b > a
                        body += buf[a:b]
                        del buf[:b]
                        continue
                    assert a == b
                    del buf[:a]
                    if k == mod.NEED_DATA:
                        break
                    assert k == mod.DONE and reader.total == len(body)
                    reader = None
                if need:
                    take = min(need, len(buf))
                    body += buf[:take]
                    del buf[:take]
                    need -= take
                    if need:
                        break
                reqs.append((req_summary(head), bytes(body)))
                keep_alive = head.keep_alive
                head = None
                if not keep_alive:
                    return ("ok", reqs, "closed")
    except ProtocolError as e:
        return ("error", e.status, e.reason)
    return ("ok", reqs, "incomplete" if (head is not None or buf) else "clean")


def run(mod, data, size=None):
    size = size or max(1, len(data))
    return run_pieces(mod, [data[i:i + size] for i in range(0, len(data), size)])


def head_outcome(parse, data, start=0):
    try:
        h = parse(data, start)
    except ProtocolError as e:
        return ("error", e.status, e.reason)
    return None if h is None else ("head", h.end)


def split_offsets(n):
    if n <= 4096:
        return range(n)
    pts = set(range(0, n, 509)) | set(range(max(0, n - 64), n))
    for mark in (pure.MAX_REQUEST_LINE, pure.MAX_REQUEST_HEAD, pure.MAX_RESPONSE_HEAD):
        pts |= set(range(max(0, mark - 40), min(n, mark + 40)))
    return sorted(pts)


def check_prefixes(parse, data):
    """Every prefix: None, or exactly the whole buffer's error, or (once complete) the same head."""
    whole = head_outcome(parse, data)
    for k in split_offsets(len(data)):
        got = head_outcome(parse, data[:k])
        if got is None:
            continue
        assert got == whole, (k, got, whole)
        if whole[0] == "head":
            assert k >= whole[1]
    return whole


ALL_CASES = CORPUS + EXTRA
CASE_IDS = [c[0] for c in ALL_CASES]


def check_expected(res, expected):
    if isinstance(expected, int):
        assert res[0] == "error", res
        assert res[1] == expected, res
        return
    what, checks = expected
    assert res[0] == "ok", res
    reqs, tail = res[1], res[2]
    if what == "incomplete":
        assert tail == "incomplete"
        return
    checks = dict(checks or {})
    n_requests = checks.pop("n_requests", 1)
    assert len(reqs) == n_requests, reqs
    assert tail in ("clean", "closed")
    summary, body = reqs[0]
    attrs = dict(zip(REQ_ATTRS, summary))
    headers = summary[len(REQ_ATTRS)]
    forward = summary[len(REQ_ATTRS) + 1]
    for key, want in checks.items():
        if key == "body":
            assert body == want
        elif key == "forward":
            assert forward == want
        elif key.startswith("get:"):
            name = key[4:].encode()
            assert [v for k, v in headers if k == name][:1] == [want]
        else:
            assert attrs[key] == want, (key, attrs[key], want)


# ---------------------------------------------------------------------------------------------
# the corpus (hardening.md §2.2 and variants): whole, split at every offset, pipelined

def test_corpus_size():
    assert len(CORPUS) == 80
    assert len(set(CASE_IDS)) == len(CASE_IDS)


@pytest.mark.parametrize("case", ALL_CASES, ids=CASE_IDS)
def test_corpus_whole(h1, case):
    _, data, expected = case
    check_expected(run(h1, data), expected)


@pytest.mark.parametrize("case", ALL_CASES, ids=CASE_IDS)
def test_corpus_split(h1, case):
    _, data, expected = case
    whole = check_prefixes(h1.parse_request, data)
    if isinstance(expected, int) and whole[0] == "error":
        assert whole[1] == expected
    ref = run(h1, data)
    if len(data) <= 600:
        for k in range(1, len(data)):
            assert run_pieces(h1, [data[:k], data[k:]]) == ref, k
        assert run(h1, data, 1) == ref
    else:
        assert run(h1, data, 4093) == ref


@pytest.mark.parametrize("case", ALL_CASES, ids=CASE_IDS)
def test_corpus_pipelined(h1, case):
    _, data, expected = case
    if isinstance(expected, tuple) and expected[0] == "incomplete":
        return  # appending bytes would become the missing body
    res = run(h1, data + NEXT_REQUEST)
    if isinstance(expected, int):
        assert res[0] == "error" and res[1] == expected, res
        return
    check_expected(res if res[2] == "closed" else ("ok", res[1][:-1], "clean"), expected)
    if res[2] != "closed":
        last = dict(zip(REQ_ATTRS, res[1][-1][0]))
        assert (last["path"], last["host"]) == (b"/next", b"b")
        assert res[2] == "clean"


def test_pipelined_parse_from_end(h1):
    buf = bytearray(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\n"
                    b"Content-Length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\nHost: a\r\n\r\nGET /4 HT")
    h = h1.parse_request(buf)
    assert h.path == b"/1"
    h2 = h1.parse_request(buf, h.end)
    assert (h2.path, h2.content_length) == (b"/2", 3)
    h3 = h1.parse_request(buf, h2.end + 3)
    assert h3.path == b"/3"
    assert h1.parse_request(buf, h3.end) is None
    assert h1.parse_request(buf, len(buf)) is None


# ---------------------------------------------------------------------------------------------
# valid heads

def test_origin_form(h1):
    data = (b"GET /index.html?q=1&r=%20 HTTP/1.1\r\nHost: example.com:8080\r\n"
            b"User-Agent: curl/8.5.0\r\nAccept: */*\r\nX-Empty:\r\nX-Pad: \t a b \t\r\n\r\nBODY")
    h = h1.parse_request(data)
    assert h.method == b"GET"
    assert h.target == b"/index.html?q=1&r=%20"
    assert h.path == b"/index.html?q=1&r=%20"
    assert h.version == 1
    assert h.end == len(data) - 4
    assert h.host == b"example.com:8080"
    assert h.content_length == -1
    assert (h.chunked, h.keep_alive, h.expect_continue, h.upgrade) == (False, True, False, False)
    assert h.n_headers == 5
    assert h.get(b"user-agent") == b"curl/8.5.0"
    assert h.get(b"USER-AGENT") == b"curl/8.5.0"
    assert h.get(b"x-empty") == b""
    assert h.get(b"x-pad") == b"a b"
    assert h.get(b"missing") is None
    assert h.get_all(b"accept") == [b"*/*"]
    assert h.get_all(b"missing") == []
    assert h.headers() == [(b"host", b"example.com:8080"), (b"user-agent", b"curl/8.5.0"),
                           (b"accept", b"*/*"), (b"x-empty", b""), (b"x-pad", b"a b")]
    assert h.forward_headers() == (b"user-agent: curl/8.5.0\r\naccept: */*\r\nx-empty: \r\n"
                                   b"x-pad: a b\r\n")
    assert h1.request_body_kind(h) == (h1.BODY_NONE, 0)


def test_attributes_are_read_only(h1):
    h = h1.parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    for attr in REQ_ATTRS:
        with pytest.raises(AttributeError):
            setattr(h, attr, 1)
    r = h1.parse_response(b"HTTP/1.1 200 OK\r\n\r\n")
    for attr in RESP_ATTRS:
        with pytest.raises(AttributeError):
            setattr(r, attr, 1)


def test_get_all_and_case(h1):
    h = h1.parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nSet-Thing: 1\r\nset-thing: 2\r\n"
                         b"SET-THING:3\r\n\r\n")
    assert h.get(b"set-thing") == b"1"
    assert h.get_all(b"set-thing") == [b"1", b"2", b"3"]
    assert [k for k, _ in h.headers()] == [b"host", b"set-thing", b"set-thing", b"set-thing"]


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview"])
def test_buffer_types_and_copy(h1, kind):
    raw = b"xxGET /p HTTP/1.1\r\nHost: a\r\nX: v\r\n\r\n"
    buf = {"bytes": bytes, "bytearray": bytearray, "memoryview": lambda b: memoryview(b)}[kind](raw)
    h = h1.parse_request(buf, 2)
    assert h.end == len(raw)
    if kind == "bytearray":
        buf[:] = b"\0" * len(buf)  # the caller reuses its receive buffer
    assert (h.method, h.path, h.host, h.get(b"x")) == (b"GET", b"/p", b"a", b"v")
    assert h.forward_headers() == b"x: v\r\n"


def test_start_out_of_range(h1):
    with pytest.raises(ValueError):
        h1.parse_request(b"GET / HTTP/1.1\r\n\r\n", -1)
    with pytest.raises(ValueError):
        h1.parse_request(b"abc", 4)
    with pytest.raises(ValueError):
        h1.parse_response(b"abc", 4)


def test_http10(h1):
    h = h1.parse_request(b"GET / HTTP/1.0\r\n\r\n")
    assert (h.version, h.keep_alive, h.host) == (0, False, None)
    h = h1.parse_request(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\nHost: a\r\n\r\n")
    assert (h.version, h.keep_alive, h.host) == (0, True, b"a")
    h = h1.parse_request(b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n")
    assert h.keep_alive is False


@pytest.mark.parametrize("value, keep", [(b"close", False), (b"Close", False),
                                         (b"keep-alive", True), (b"x, CLOSE ,y", False),
                                         (b",,", True), (b"upgrade", True)])
def test_keep_alive_11(h1, value, keep):
    h = h1.parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: " + value + b"\r\n\r\n")
    assert h.keep_alive is keep


def test_absolute_form(h1):
    h = h1.parse_request(b"GET https://svc.ns.svc.cluster.local:8443/a/b?c HTTP/1.1\r\n"
                         b"Host: other\r\n\r\n")
    assert h.host == b"svc.ns.svc.cluster.local:8443"
    assert h.path == b"/a/b?c"
    assert h.get(b"host") == b"other"
    assert h.forward_headers() == b""


def test_request_body_kinds(h1):
    h = h1.parse_request(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert h1.request_body_kind(h) == (h1.BODY_NONE, 0)
    h = h1.parse_request(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n")
    assert h1.request_body_kind(h) == (h1.BODY_LENGTH, 12)
    h = h1.parse_request(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n")
    assert h1.request_body_kind(h) == (h1.BODY_CHUNKED, -1)
    assert h.chunked is True


def test_constants(h1):
    assert (h1.MAX_REQUEST_HEAD, h1.MAX_HEADERS, h1.MAX_REQUEST_LINE, h1.MAX_RESPONSE_HEAD,
            h1.MAX_CHUNK_LINE) == (61440, 100, 8192, 81920, 4096)
    assert (h1.BODY_NONE, h1.BODY_LENGTH, h1.BODY_CHUNKED, h1.BODY_CLOSE) == (0, 1, 2, 3)
    assert (h1.NEED_DATA, h1.DATA, h1.DONE) == (0, 1, 2)


# ---------------------------------------------------------------------------------------------
# rules, one status each (the corpus covers most; these pin the remaining ones)

H = b"Host: a\r\n"
RULES = [
    # request line
    (b"GET / HTTP/1.1\r\n" + H, None),
    (b"GET /\tx HTTP/1.1\r\n" + H, 400),
    (b"GET / HTTP/1.1\r\r\n" + H, 400),
    (b"GET / HTTP/1.10\r\n" + H, 400),
    (b"GET / HTTP/1.\r\n" + H, 400),
    (b"GET / HTTP/3.0\r\n" + H, 505),
    (b"GET / HTTPS/1.1\r\n" + H, 400),
    (b"GET\r\n" + H, 400),
    (b"GET \r\n" + H, 400),
    (b" GET / HTTP/1.1\r\n" + H, 400),
    (b"GET / HTTP/1.1\r\n\tHost: a\r\n", 400),
    (b"GET /a b HTTP/1.1\r\n" + H, 400),
    (b"G\x00T / HTTP/1.1\r\n" + H, 400),
    (b"get / HTTP/1.1\r\n" + H, None),  # methods are case-sensitive tokens: forwarded as is
    (b"OPTIONS * HTTP/1.1\r\n" + H, None),
    (b"POST * HTTP/1.1\r\n" + H, 400),
    (b"OPTIONS *x HTTP/1.1\r\n" + H, 400),
    (b"CONNECT [::1]:443 HTTP/1.1\r\n" + H, None),
    (b"CONNECT a:443/x HTTP/1.1\r\n" + H, 400),
    (b"GET //a HTTP/1.1\r\n" + H, None),
    # fields
    (b"GET / HTTP/1.1\r\n" + H + b"X-\xff: v\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"X\t: v\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"X: a\x01\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"X: a\x1f\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"X: a\tb\x80\xff \r\n", None),
    (b"GET / HTTP/1.1\r\n" + H + b"X: \r\n", None),
    (b"GET / HTTP/1.1\r\n" + H + b"X:\x0c\r\n", 400),
    # Host
    (b"GET / HTTP/1.1\r\nHost: a:\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: :80\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: [::1\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: [zz]\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a%20b\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: 10.0.0.1:65535\r\n", None),
    (b"GET / HTTP/1.1\r\nHost: my_svc.ns-1.svc~x\r\n", None),
    (b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n", 400),
    (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n", 400),
    (b"GET / HTTP/1.0\r\nHost: a,b\r\n", 400),
    # framing
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\ncontent-length: 5\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5 \r\n", None),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5 5\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 9223372036854775807\r\n", None),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\nContent-Length: 1\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked;q=1\r\n", 501),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked,\r\n", 501),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: \tchunked \r\n", None),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n", 501),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n", 400),
    (b"CONNECT a:1 HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n", 400),
    (b"CONNECT a:1 HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n", None),
    # Expect
    (b"POST / HTTP/1.1\r\n" + H + b"Expect: 100-CONTINUE\r\n", None),
    (b"POST / HTTP/1.1\r\n" + H + b"Expect: 100-continue, x\r\n", 417),
    (b"POST / HTTP/1.1\r\n" + H + b"Expect:\r\n", 417),
    (b"POST / HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nExpect: 100-continue\r\n", None),
    (b"POST / HTTP/1.1\r\nExpect: nope\r\n", 400),  # the missing Host is reported first
]


@pytest.mark.parametrize("head, status", RULES, ids=[repr(r[0][:48]) for r in RULES])
def test_rules(h1, head, status):
    data = head + b"\r\n"
    if status is None:
        h = h1.parse_request(data)
        assert h is not None and h.end == len(data)
    else:
        with pytest.raises(ProtocolError) as e:
            h1.parse_request(data)
        assert e.value.status == status
    check_prefixes(h1.parse_request, data)


@pytest.mark.parametrize("target", [b"/a#f", b"/#", b"/a?b#c", b"http://a/#", b"http://a#x",
                                    b"*#", b"a:1#"])
def test_fragment_is_400_with_its_own_reason_before_any_other_target_check(h1, target):
    method = b"OPTIONS" if target.startswith(b"*") else b"CONNECT" if target == b"a:1#" else b"GET"
    with pytest.raises(ProtocolError) as e:
        h1.parse_request(method + b" " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (e.value.status, e.value.reason) == (400, "fragment in request target")


def test_limits_raise_while_incomplete(h1):
    # request line over 8192 bytes with no CRLF yet: 414 at once
    with pytest.raises(ProtocolError) as e:
        h1.parse_request(b"GET /" + b"a" * (h1.MAX_REQUEST_LINE + 2))
    assert e.value.status == 414
    assert h1.parse_request(b"GET /" + b"a" * (h1.MAX_REQUEST_LINE - 4)) is None
    # header section over 60 KiB with no terminator: 431
    big = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"x-a: " + b"b" * h1.MAX_REQUEST_HEAD
    with pytest.raises(ProtocolError) as e:
        h1.parse_request(big)
    assert e.value.status == 431
    # many small lines, no terminator yet: 431 as soon as the 101st field starts
    many = b"GET / HTTP/1.1\r\n" + b"".join(b"h%d: x\r\n" % i for i in range(100))
    assert h1.parse_request(many) is None
    assert h1.parse_request(many + b"\r") is None
    with pytest.raises(ProtocolError) as e:
        h1.parse_request(many + b"h")
    assert e.value.status == 431
    # a bad line before the limit wins over the limit
    with pytest.raises(ProtocolError) as e:
        h1.parse_request(b"GET / HTTP/1.1\r\nBad Name: x\r\n" + b"x-a: " + b"b" * h1.MAX_REQUEST_HEAD)
    assert e.value.status == 400


@pytest.mark.parametrize("conn,upgrade,expected", [
    (b"Upgrade", b"websocket", True), (b"keep-alive, UPGRADE", b"WebSocket", True),
    (b"keep-alive", b"websocket", False), (b"Upgrade", None, False)])
def test_an_upgrade_request_needs_the_header_and_its_nomination(h1, conn, upgrade, expected):
    data = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: " + conn + b"\r\n"
    if upgrade is not None:
        data += b"Upgrade: " + upgrade + b"\r\n"
    assert h1.parse_request(data + b"\r\n").upgrade is expected
    # never on HTTP/1.0
    assert not h1.parse_request(data.replace(b"HTTP/1.1", b"HTTP/1.0") + b"\r\n").upgrade


def test_forward_headers_hop_by_hop(h1):
    data = (b"POST /p HTTP/1.1\r\nHost: a\r\nConnection: X-Hop, keep-alive, Content-Length, "
            b"Transfer-Encoding, Host\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
            b"Upgrade: websocket\r\nTE: trailers\r\nX-Hop: 1\r\nx-hop: 2\r\nX-Keep: 3\r\n"
            b"Expect: 100-continue\r\nTransfer-Encoding: chunked\r\nX-Drop: 4\r\nCookie: c=1\r\n\r\n")
    h = h1.parse_request(data)
    # Upgrade without `connection: upgrade` is no upgrade request (RFC 9110 §7.8)
    assert h.chunked and h.host == b"a" and h.keep_alive and not h.upgrade and h.expect_continue
    assert h.forward_headers() == b"te: trailers\r\nx-keep: 3\r\nx-drop: 4\r\ncookie: c=1\r\n"
    assert h.forward_headers((b"x-drop", b"cookie")) == b"te: trailers\r\nx-keep: 3\r\n"
    assert h.forward_headers(drop=(b"te",)) == b"x-keep: 3\r\nx-drop: 4\r\ncookie: c=1\r\n"
    # the nominations did not change framing
    assert h1.request_body_kind(h) == (h1.BODY_CHUNKED, -1)
    assert h.get(b"x-hop") == b"1"


def test_forward_headers_long_lists(h1):
    toks = [b"X-N%d" % i for i in range(80)]
    data = (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: " + b", ".join(toks) + b"\r\n"
            + b"".join(b"x-n%d: v\r\n" % i for i in range(0, 90, 3))
            + b"".join(b"x-d%d: v\r\n" % i for i in range(40)) + b"Keep: 1\r\n\r\n")
    h = h1.parse_request(data)
    want = b"".join(b"x-n%d: v\r\n" % i for i in range(81, 90, 3))
    assert h.forward_headers() == want + b"".join(b"x-d%d: v\r\n" % i for i in range(40)) + b"keep: 1\r\n"
    drop = tuple(b"X-D%d" % i for i in range(40))
    assert h.forward_headers(drop) == want + b"keep: 1\r\n"
    h = h1.parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nx-d3: v\r\nkeep: 1\r\n\r\n")
    assert h.forward_headers(drop) == b"keep: 1\r\n"
    assert h.forward_headers([b"KEEP"]) == b"x-d3: v\r\n"


def test_forward_headers_te(h1):
    h = h1.parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nTE: Trailers\r\n\r\n")
    assert h.forward_headers() == b"te: Trailers\r\n"
    h = h1.parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nTE: trailers, deflate\r\n\r\n")
    assert h.forward_headers() == b""


# ---------------------------------------------------------------------------------------------
# responses

def test_response_valid(h1):
    data = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
            b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: x\r\n"
            b"Server: s\r\n\r\nhello")
    r = h1.parse_response(data)
    assert (r.status, r.version, r.reason, r.end) == (200, 1, b"OK", len(data) - 5)
    assert (r.content_length, r.chunked, r.keep_alive, r.n_headers) == (5, False, True, 7)
    assert r.get(b"server") == b"s"
    assert r.forward_headers() == b"content-type: text/plain\r\nserver: s\r\n"
    assert r.forward_headers((b"server",)) == b"content-type: text/plain\r\n"
    assert h1.response_body_kind(r, False) == (h1.BODY_LENGTH, 5)
    assert h1.response_body_kind(r, True) == (h1.BODY_NONE, 0)


@pytest.mark.parametrize("line, status, version, reason", [
    (b"HTTP/1.1 200 OK", 200, 1, b"OK"),
    (b"HTTP/1.0 404 Not Found", 404, 0, b"Not Found"),
    (b"HTTP/1.1 200 ", 200, 1, b""),
    (b"HTTP/1.1 200", 200, 1, b""),
    (b"HTTP/1.1 599 x\xff\ty", 599, 1, b"x\xff\ty"),
    (b"HTTP/1.1 100 Continue", 100, 1, b"Continue"),
])
def test_response_status_lines(h1, line, status, version, reason):
    r = h1.parse_response(line + b"\r\n\r\n")
    assert (r.status, r.version, r.reason) == (status, version, reason)


RESPONSE_BAD = [
    b"HTTX/9.9 ??? nope\r\n\r\n",
    b"HTTP/2.0 200 OK\r\n\r\n",
    b"HTTP/1.2 200 OK\r\n\r\n",
    b"http/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 099 x\r\n\r\n",
    b"HTTP/1.1 600 x\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1  200 OK\r\n\r\n",
    b"HTTP/1.1 200 O\x00K\r\n\r\n",
    b"HTTP/1.1 200 OK\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\rSet-Cookie: evil=1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\nY: b\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: a b\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"".join(b"h%d: x\r\n" % i for i in range(101)) + b"\r\n",
    b"HTTP/1.1 200 OK\r\nBig: " + b"x" * (100 * 1024) + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBig: " + b"x" * (100 * 1024),
]


@pytest.mark.parametrize("data", RESPONSE_BAD, ids=[repr(d[:40]) for d in RESPONSE_BAD])
def test_response_bad(h1, data):
    with pytest.raises(ProtocolError) as e:
        h1.parse_response(data)
    assert e.value.status == 502
    whole = check_prefixes(h1.parse_response, data)
    assert whole[:2] == ("error", 502)
    check_prefixes(h1.parse_response, data + b"HTTP/1.1 200 OK\r\n\r\n")


def test_response_incomplete_and_pipelined(h1):
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nX: y\r\n\r\n"
    check_prefixes(h1.parse_response, data)
    r = h1.parse_response(data)
    assert r.status == 100 and h1.response_body_kind(r, False) == (h1.BODY_NONE, 0)
    r2 = h1.parse_response(data, r.end)
    assert (r2.status, r2.end, r2.get(b"x")) == (204, len(data), b"y")


@pytest.mark.parametrize("head, was_head, expected", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n", False, (1, 0)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n", False, (1, 7)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n", False, (2, -1)),
    (b"HTTP/1.1 200 OK\r\n", False, (3, -1)),
    (b"HTTP/1.0 200 OK\r\n", False, (3, -1)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n", True, (0, 0)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n", True, (0, 0)),
    (b"HTTP/1.1 100 Continue\r\n", False, (0, 0)),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n", False, (0, 0)),
    (b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n", False, (0, 0)),
    (b"HTTP/1.1 204 No Content\r\n", False, (0, 0)),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n", False, (0, 0)),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n", False, (0, 0)),
    (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n", False, (0, 0)),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n", False, 502),
    (b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n", False, 502),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n", True, 502),
])
def test_response_body_kind(h1, head, was_head, expected):
    r = h1.parse_response(head + b"\r\n")
    if isinstance(expected, int):
        with pytest.raises(ProtocolError) as e:
            h1.response_body_kind(r, was_head)
        assert e.value.status == expected
    else:
        assert h1.response_body_kind(r, was_head) == expected


def test_response_keep_alive(h1):
    assert h1.parse_response(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n").keep_alive is False
    assert h1.parse_response(b"HTTP/1.0 200 OK\r\n\r\n").keep_alive is False
    assert h1.parse_response(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n").keep_alive is True


# ---------------------------------------------------------------------------------------------
# chunked bodies

def decode(mod, body, size=None, pos0=0, tail=b""):
    """Decode with a reader fed `size` bytes at a time; the caller keeps buf[a:] on NEED_DATA."""
    data = b"x" * pos0 + body + tail
    size = size or len(data)
    r = mod.ChunkedReader()
    buf = bytearray(data[:pos0 + size])
    fed = pos0 + size
    pos = pos0
    dropped = 0
    out = bytearray()
    while True:
        k, a, b = r.step(buf, pos, len(buf))
        if k == mod.DATA:
            assert pos <= a < b <= len(buf)
            out += buf[a:b]
            pos = b
        elif k == mod.DONE:
            assert a == b
            assert r.total == len(out)
            return bytes(out), dropped + a - pos0
        else:
            assert a == b and pos <= a <= len(buf)
            if fed >= len(data):
                return None
            del buf[:a]
            dropped += a
            pos = 0
            buf += data[fed:fed + size]
            fed += size


@pytest.mark.parametrize("body, want", CHUNKED_VALID, ids=[repr(b[:20]) for b, _ in CHUNKED_VALID])
def test_chunked_valid(h1, body, want):
    assert decode(h1, body) == (want, len(body))
    assert decode(h1, body, pos0=3, tail=b"GET / HTTP/1.1") == (want, len(body))
    for size in ((1, 2, 5) if len(body) < 1000 else (1, 4093)):
        assert decode(h1, body, size) == (want, len(body)), size
    if len(body) < 1000:
        for k in range(len(body)):
            assert decode(h1, body[:k]) is None


def test_chunked_data_never_past_chunk(h1):
    r = h1.ChunkedReader()
    buf = b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    assert r.step(buf, 0, len(buf)) == (h1.DATA, 3, 6)
    assert r.step(buf, 6, len(buf)) == (h1.DATA, 11, 13)
    assert r.total == 5
    assert r.step(buf, 13, len(buf)) == (h1.DONE, len(buf), len(buf))
    assert r.step(buf, len(buf), len(buf)) == (h1.DONE, len(buf), len(buf))
    r = h1.ChunkedReader()
    assert r.step(buf, 0, 4) == (h1.DATA, 3, 4)
    assert r.step(buf, 4, 5) == (h1.DATA, 4, 5)
    assert r.step(buf, 5, 5) == (h1.NEED_DATA, 5, 5)
    assert r.step(buf, 5, 7) == (h1.DATA, 5, 6)
    assert r.step(buf, 6, 7) == (h1.NEED_DATA, 6, 6)
    assert r.step(buf, 6, 9) == (h1.NEED_DATA, 8, 8)


@pytest.mark.parametrize("body", CHUNKED_INVALID, ids=[repr(b[:24]) for b in CHUNKED_INVALID])
def test_chunked_invalid(h1, body):
    with pytest.raises(ProtocolError) as e:
        decode(h1, body)
    assert e.value.status == 400
    reason = e.value.reason
    for size in ((1, 3) if len(body) < 1000 else (1, 4093)):
        with pytest.raises(ProtocolError) as e:
            decode(h1, body, size)
        assert (e.value.status, e.value.reason) == (400, reason)


def test_chunked_error_is_sticky(h1):
    r = h1.ChunkedReader()
    with pytest.raises(ProtocolError):
        r.step(b"zz\r\n", 0, 4)
    with pytest.raises(ProtocolError):
        r.step(b"0\r\n\r\n", 0, 5)


def test_chunked_bad_range(h1):
    r = h1.ChunkedReader()
    with pytest.raises(ValueError):
        r.step(b"0\r\n\r\n", 3, 2)
    with pytest.raises(ValueError):
        r.step(b"0\r\n\r\n", 0, 6)


def test_chunk_line_limit(h1):
    ok = b"1;" + b"e" * (h1.MAX_CHUNK_LINE - 2) + b"\r\nx\r\n0\r\n\r\n"
    assert decode(h1, ok) == (b"x", len(ok))
    with pytest.raises(ProtocolError):
        decode(h1, b"1;" + b"e" * (h1.MAX_CHUNK_LINE - 1) + b"\r\nx\r\n0\r\n\r\n")
    # no LF yet, but already too long
    with pytest.raises(ProtocolError):
        h1.ChunkedReader().step(b"1;" + b"e" * h1.MAX_CHUNK_LINE, 0, h1.MAX_CHUNK_LINE + 2)


# ---------------------------------------------------------------------------------------------
# differential: compiled vs pure on random and mutated input

def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except ProtocolError as e:
        return ("error", e.status, e.reason)


def diff_request(both, data, start=0):
    p, c = both
    a = _outcome(p.parse_request, data, start)
    b = _outcome(c.parse_request, data, start)
    if a[0] == "ok" and b[0] == "ok":
        if a[1] is None or b[1] is None:
            assert a[1] is None and b[1] is None
            return
        assert req_summary(a[1]) == req_summary(b[1])
        assert a[1].forward_headers((b"x-a", b"Accept")) == b[1].forward_headers((b"x-a", b"Accept"))
        assert _outcome(p.request_body_kind, a[1]) == _outcome(c.request_body_kind, b[1])
    else:
        assert a == b


def diff_response(both, data, was_head=False):
    p, c = both
    a = _outcome(p.parse_response, data)
    b = _outcome(c.parse_response, data)
    if a[0] == "ok" and b[0] == "ok":
        if a[1] is None or b[1] is None:
            assert a[1] is None and b[1] is None
            return
        assert resp_summary(a[1]) == resp_summary(b[1])
        assert (_outcome(p.response_body_kind, a[1], was_head)
                == _outcome(c.response_body_kind, b[1], was_head))
    else:
        assert a == b


def diff_chunked(both, data, size):
    outs = []
    for mod in both:
        try:
            outs.append(("ok", decode(mod, data, size)))
        except ProtocolError as e:
            outs.append(("error", e.status, e.reason))
    assert outs[0] == outs[1]


SPICE = [b" ", b"\t", b"\r", b"\n", b"\r\n", b":", b",", b";", b"=", b"\"", b"\x00", b"\x7f",
         b"\x80", b"\xff", b"/", b"*", b"?", b"[", b"]", b"@", b"0", b"9", b"a", b"Z", b"-",
         b"\r\n\r\n", b"\r\n ", b"chunked", b"close", b"keep-alive", b"100-continue"]
METHODS = ([b"GET", b"POST", b"HEAD"], [b"OPTIONS", b"CONNECT", b"PUT", b"B{D", b""])
TARGETS = ([b"/", b"/a?b=c", b"http://h:80/p"],
           [b"*", b"https://[::1]/", b"h:443", b"//x", b"", b"HTTP://H?Q", b"/\xff", b"http://"])
VERSIONS = ([b"HTTP/1.1", b"HTTP/1.0"], [b"HTTP/2.0", b"HTTP/1.2", b"http/1.1", b""])
STATUS_LINES = ([b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 204 No", b"HTTP/1.1 304"],
                [b"HTTP/1.1 101 Up", b"HTTP/1.1 100 Continue", b"HTTP/1.1 999 x", b"HTTP/2 200 OK"])
NAMES = ([b"X-A", b"Accept", b"Content-Length", b"Transfer-Encoding", b"Connection", b"TE"],
         [b"Host", b"Expect", b"Upgrade", b"Keep-Alive", b"Proxy-Connection", b"host", b"X_B", b""])
VALUES = ([b"a", b"5", b"010", b"0", b"chunked", b"CHUNKED", b"close", b"keep-alive",
           b"x-a, close", b"trailers", b"100-continue", b"", b" v "],
          [b"a:80", b"[::1]:8080", b"-1", b"gzip, chunked", b"chunked, gzip", b"a, b", b"\xa0",
           b"1_0", b"99999999999999999999", b"chunked,", b"Accept, TE"])


def pick(draw, choices, rare_one_in=6):
    common, rare = choices
    if draw(st.integers(0, rare_one_in - 1)) == 0:
        return draw(st.sampled_from(rare))
    return draw(st.sampled_from(common))


@st.composite
def heads(draw, response=False):
    if response:
        line = pick(draw, STATUS_LINES)
    else:
        line = b" ".join([pick(draw, METHODS), pick(draw, TARGETS), pick(draw, VERSIONS)])
    fields = draw(st.lists(st.tuples(st.just(NAMES), st.just(VALUES)), max_size=7))
    fields = [(pick(draw, n), pick(draw, v)) for n, v in fields]
    if not response and draw(st.integers(0, 7)):
        fields.insert(draw(st.integers(0, len(fields))), (b"Host", pick(draw, (VALUES[0][:1], VALUES[1]))))
    data = bytearray(line + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fields)
                     + b"\r\n")
    for _ in range(max(0, draw(st.integers(-3, 3)))):
        op = draw(st.integers(0, 2))
        at = draw(st.integers(0, len(data)))
        if op == 0:
            data[at:at] = draw(st.sampled_from(SPICE))
        elif op == 1 and at < len(data):
            del data[at:at + draw(st.integers(1, 3))]
        elif at < len(data):
            data[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data += draw(st.sampled_from([b"", b"5\r\nhello\r\n0\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"]))
    return bytes(data)


HSET = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@HSET
@given(data=heads())
def test_differential_requests(both, data):
    diff_request(both, data)
    cut = len(data) // 2
    diff_request(both, data[:cut])
    diff_request(both, b"\r\n" + data, 2)


@HSET
@given(data=st.binary(max_size=64))
def test_differential_random_bytes(both, data):
    diff_request(both, b"GET / HTTP/1.1\r\n" + data)
    diff_request(both, data)
    diff_response(both, b"HTTP/1.1 200 OK\r\n" + data)


@HSET
@given(data=heads(response=True), was_head=st.booleans())
def test_differential_responses(both, data, was_head):
    diff_response(both, data, was_head)
    diff_response(both, data[:len(data) // 2], was_head)


@st.composite
def chunked_bodies(draw):
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        payload = draw(st.binary(max_size=12))
        ext = draw(st.sampled_from([b"", b";a", b";a=b", b' ;a="x y"', b";", b" ", b";a=", b"\t;b"]))
        parts.append(b"%x" % len(payload) + ext + b"\r\n" + payload + b"\r\n")
    parts.append(b"0" + draw(st.sampled_from([b"", b";z"])) + b"\r\n")
    parts.append(draw(st.sampled_from([b"", b"T: v\r\n", b"bad\r\n", b"A: \x00\r\n"])) + b"\r\n")
    data = bytearray(b"".join(parts))
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(data)))
        if draw(st.booleans()):
            data[at:at] = draw(st.sampled_from(SPICE))
        elif at < len(data):
            data[at] = draw(st.integers(0, 255))
    return bytes(data)


@HSET
@given(data=chunked_bodies(), size=st.integers(1, 8))
def test_differential_chunked(both, data, size):
    diff_chunked(both, data, None)
    diff_chunked(both, data, size)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=heads(), response=heads(response=True))
def test_prefix_property(h1, data, response):
    """Any prefix of any input: None or the whole input's answer (random heads)."""
    check_prefixes(h1.parse_request, data)
    check_prefixes(h1.parse_response, response)


def test_count_prefix_counts_field_names_case_insensitively(h1):
    head = h1.parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nX-Envoy-Retry-On: 5xx\r\n"
                              b"x-envoy-max-retries: 1\r\nX-En: 1\r\nx-envoy: 2\r\n\r\n")
    assert head.count_prefix(b"x-envoy-") == 2
    assert head.count_prefix(b"host") == 1
    assert head.count_prefix(b"x-nothing") == 0


def test_wire_exports_the_twin_api():
    # wire.py lists the API itself so that workers never import the pure twin; keep it in step
    from meshcore.proto import h1_parse, wire
    assert sorted(wire.__all__) == sorted(h1_parse.__all__)
