"""Malformed requests get the strict answer, the connection closes, and no pod ever sees them."""
import pytest

from harness import Client

H = b"Host: echo-service:8080\r\n"

CASES = [
    ("cl_and_te", b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("duplicate_cl", b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\nab", 400),
    ("cl_plus", b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello", 400),
    ("cl_hex", b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 0x5\r\n\r\nhello", 400),
    ("te_gzip", b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n", 501),
    ("te_chunked_twice", b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, chunked\r\n\r\n", 400),
    ("space_before_colon", b"GET /echo HTTP/1.1\r\n" + H + b"X-A : b\r\n\r\n", 400),
    ("obs_fold", b"GET /echo HTTP/1.1\r\n" + H + b"X-A: b\r\n c\r\n\r\n", 400),
    ("bare_lf", b"GET /echo HTTP/1.1\n" + H + b"\r\n", 400),
    ("bare_cr_in_value", b"GET /echo HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n", 400),
    ("nul_in_value", b"GET /echo HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    ("ctl_in_value", b"GET /echo HTTP/1.1\r\n" + H + b"X-A: a\x01b\r\n\r\n", 400),
    ("bad_name_token", b"GET /echo HTTP/1.1\r\n" + H + b"X[A]: b\r\n\r\n", 400),
    ("missing_host", b"GET /echo HTTP/1.1\r\nX-A: b\r\n\r\n", 400),
    ("duplicate_host", b"GET /echo HTTP/1.1\r\n" + H + H + b"\r\n", 400),
    ("double_space_request_line", b"GET  /echo HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("http2_version", b"GET /echo HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("lowercase_version", b"GET /echo http/1.1\r\n" + H + b"\r\n", 400),
    ("http09", b"GET /echo\r\n\r\n", 400),
    ("too_many_headers", b"GET /echo HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n", 431),
    ("head_too_large", b"GET /echo HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * (61 * 1024) + b"\r\n\r\n", 431),
    ("bad_chunk_size", b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk_data_overrun", b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nxxx__1a\r\n0\r\n\r\n", 400),
    ("bare_lf_chunk", b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n", 400),
]


@pytest.mark.parametrize("name,raw,status", CASES, ids=[c[0] for c in CASES])
def test_malformed_request_rejected_and_never_forwarded(proxy, pods, name, raw, status):
    pods.clear()
    c = Client(proxy.port)
    # a valid request pipelined after the bad one must not be processed either
    c.send(raw + b"GET /echo HTTP/1.1\r\n" + H + b"\r\n")
    r = c.read_response()
    assert r.status == status
    assert r.header("connection") == "close"
    assert c.is_closed()
    c.close()
    # Pods log a request only once it is complete: a bad chunked body may have started upstream
    # (the head was valid), but no pod ever receives a complete request from any of these cases.
    assert pods.total_requests() == 0


def test_header_split_across_many_writes_still_parses(proxy):
    c = Client(proxy.port)
    raw = b"GET /status/200 HTTP/1.1\r\n" + H + b"X-A: b\r\n\r\n"
    for i in range(len(raw)):
        c.send(raw[i:i + 1])
    assert c.read_response().status == 200
    c.close()
