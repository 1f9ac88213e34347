"""Nothing half-forwarded (issue 9 item 6): chunked body bytes that arrive with a head are checked
before the head goes anywhere.

Request side: every malformed chunked body of hardening.md §2.2 (its table and the variants it
names), sent in one write with its head, gets 400 and not one byte reaches the upstream, not even
on a pooled connection that a valid request left open. Envoy 1.40, running the same mesh, is
compared: it refuses the same cases with 400, except its leniencies (`5 `, `5;`,
`3\\r\\nxxx__1a`, hardening.md §2.3, and 17-digit sizes and malformed trailers, which it accepts).
Measured with this module's upstream: Envoy itself sends the head (161 bytes) upstream for every
case it refuses when a pooled connection is ready, and nothing only when it has to connect first;
meshcore sends nothing either way.

Response side: an upstream response whose first chunk line is buffered with its head and malformed
is a 502 (upstream protocol error, flag UPE), never a relayed 200 with a cut body. Envoy 1.40 here
relays the 200 head and closes with no body (the overrun it accepts as `xxx`): meshcore is
stricter, as issue 9 asks.
"""
import os
import sys
import time
from contextlib import closing

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ext"))
from h1parse_corpus import CORPUS, EXTRA  # noqa: E402 (tests/ext holds the corpus)
from harness import Client, Proxy, envoy_on, one_service_mesh, write_config
from meshcore.errors import ProtocolError
from meshcore.proto.h1_parse import parse_request
from recording_upstream import Upstream

HEAD = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


def _body_cases():
    """Corpus cases whose head is a valid chunked POST and whose body is malformed (400)."""
    out = []
    for name, data, expected in CORPUS + EXTRA:
        if expected != 400 or not data.startswith(HEAD):
            continue
        try:
            head = parse_request(data, 0)
        except ProtocolError:
            continue
        if head is not None and head.chunked and head.end == len(HEAD):
            out.append((name, data[len(HEAD):]))
    return out


BODY_CASES = _body_cases()



@pytest.fixture(scope="module")
def upstream():
    up = Upstream()
    yield up
    up.close()


@pytest.fixture(scope="module")
def mesh_path(tmp_path_factory, upstream):
    d = tmp_path_factory.mktemp("validate")
    return write_config(str(d), one_service_mesh(upstream.port))


@pytest.fixture(scope="module")
def meshcore_proxy(mesh_path):
    px = Proxy([mesh_path], workers=1, extra=["--no-access-log"])
    yield px
    px.stop()


@pytest.fixture(scope="module")
def envoy(mesh_path, tmp_path_factory):
    with envoy_on(mesh_path, str(tmp_path_factory.mktemp("envoy-validate"))) as port:
        yield port


def _exchange(port: int, raw: bytes):
    """One request on a fresh connection: (status, the whole reply, closed after it)."""
    c = Client(port)
    try:
        c.send(raw)
        r = c.read_response()
        return r, c.is_closed(wait=3.0)
    finally:
        c.close()


def _settled(upstream, before, wait=0.3):
    """What reached the upstream since `before`, once a late byte would have arrived."""
    time.sleep(wait)
    return upstream.bytes_received - before


def _warm(port: int, upstream):
    """A valid request on a keep-alive connection: the proxy now pools an upstream connection."""
    with closing(Client(port)) as c:
        assert c.request("GET", "/warm", host="up").status == 200
    assert upstream.connections >= 1


@pytest.mark.parametrize("name,body", BODY_CASES, ids=[c[0] for c in BODY_CASES])
def test_malformed_chunked_body_is_refused_before_the_head_goes_upstream(meshcore_proxy, upstream,
                                                                          name, body):
    _warm(meshcore_proxy.port, upstream)
    before = upstream.bytes_received
    raw = b"POST /p HTTP/1.1\r\nHost: up\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    r, closed = _exchange(meshcore_proxy.port, raw)
    assert (r.status, r.header("connection"), closed) == (400, "close", True)
    assert _settled(upstream, before) == 0


def test_there_are_cases_and_they_are_all_the_body_section():
    # hardening.md §2.2's malformed chunked bodies: the 10 table rows and the named variants
    names = {n for n, _ in BODY_CASES}
    assert {"chunk-0x-prefix", "chunk-leading-space", "chunk-trailing-space", "chunk-ext-empty",
            "chunk-ext-bare-cr", "chunk-bare-lf", "chunk-data-overrun", "chunk-invalid-size",
            "chunk-size-overflow", "chunk-bad-trailer"} <= names
    assert len(BODY_CASES) >= 17


ENVOY_LENIENT = {"chunk-trailing-space", "chunk-ext-empty", "chunk-data-overrun",
                 "chunk-17-digits", "chunk-trailer-obsfold", "chunk-trailer-bare-lf"}


def test_envoy_refuses_the_same_cases_but_its_leniencies(envoy):
    """The same status as Envoy (400, `connection: close`) wherever Envoy is strict; the cases it
    accepts are exactly its known leniencies, where meshcore is the stricter one."""
    lenient = set()
    for name, body in BODY_CASES:
        raw = b"POST /p HTTP/1.1\r\nHost: up\r\nTransfer-Encoding: chunked\r\n\r\n" + body
        with closing(Client(envoy)) as c:
            c.send(raw)
            r = c.read_response()
        if r.status == 400:
            assert r.header("connection") == "close", name
        else:
            assert r.status == 200, (name, r.status)
            lenient.add(name)
    assert lenient == ENVOY_LENIENT & {n for n, _ in BODY_CASES}


BAD_RESPONSES = [
    ("zz", b"zz\r\nhello\r\n0\r\n\r\n"),
    ("plus", b"+5\r\nhello\r\n0\r\n\r\n"),
    ("40-hex-digits", b"f" * 40 + b"\r\nxxx"),
    ("0x", b"0x5\r\nhello\r\n0\r\n\r\n"),
    ("bare-lf", b"5\nhello\n0\n\n"),
    ("overrun", b"3\r\nxxx__1a\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize("name,body", BAD_RESPONSES, ids=[c[0] for c in BAD_RESPONSES])
def test_malformed_response_body_buffered_with_its_head_is_a_502(meshcore_proxy, upstream,
                                                                  name, body):
    upstream.raw_response = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + body
    try:
        with closing(Client(meshcore_proxy.port)) as c:
            r = c.request("GET", "/r", host="up")
    finally:
        upstream.raw_response = None
    assert r.status == 502
    assert r.body == b"upstream connect error or disconnect/reset before headers. " \
                     b"reset reason: protocol error"
    assert upstream.last()[0] == "GET /r HTTP/1.1"
