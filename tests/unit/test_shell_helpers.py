"""Sans-IO helpers of the shell: local replies, access-log format, request ids, addresses."""
import re

import pytest

from meshcore import local_reply as lr
from meshcore.accesslog import format_line, start_time
from meshcore.io.sockets import parse_hostport


def test_local_reply_rendering_matches_envoy():
    raw = lr.render(lr.NO_HEALTHY_UPSTREAM)
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable"
    assert b"content-length: 19" in lines and b"content-type: text/plain" in lines
    assert b"server: envoy" in lines
    assert any(re.fullmatch(rb"date: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", l) for l in lines)
    assert body == b"no healthy upstream"


def test_no_route_is_empty_404_without_content_type():
    raw = lr.render(lr.NO_ROUTE, close=True)
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"content-length: 0" in head and b"content-type" not in head
    assert b"connection: close" in head and body == b""


def test_reset_bodies_and_flags():
    prefix = b"upstream connect error or disconnect/reset before headers. "
    assert lr.CONNECT_FAILURE.body == prefix + b"reset reason: remote connection failure"
    assert lr.CONNECTION_TERMINATION.body == prefix + b"reset reason: connection termination"
    assert (lr.CONNECT_FAILURE.flag, lr.CONNECTION_TERMINATION.flag, lr.ROUTE_TIMEOUT.flag) == ("UF", "UC", "UT")
    assert lr.downstream_protocol_error(431).body == b"Request Header Fields Too Large"


def test_a_fragment_gets_envoys_path_normalization_reply():
    # Envoy 1.40 (its connection manager, not its codec): 400, empty body, no flag
    assert lr.downstream_protocol_error(400, "fragment in request target") == (
        400, b"", "-", "path_normalization_failed")
    assert lr.downstream_protocol_error(400, "invalid request target") == (
        400, b"Bad Request", "DPE", "codec_error")


def test_start_time_format():
    assert start_time(1795675003.139) == "2026-11-26T06:36:43.139Z"


class _Head:
    method, path, host = b"GET", b"/a?b=1", b"svc"

    def get(self, name):
        return {b"user-agent": b"curl/8", b"host": b"svc"}.get(name)


class _Rec:
    head = _Head()
    start = 1795675003.139
    status, flags, details = 200, "-", "via_upstream"
    bytes_received, bytes_sent, duration_ms, upstream_service_time = 0, 12, 3, 2
    request_id = b"id-1"
    upstream_host, cluster, upstream_local = "127.0.0.1:8080", "outbound|80||svc", "127.0.0.1:5555"
    downstream_local, downstream_remote, route_name = "127.0.0.1:15001", "127.0.0.1:4444", "default"


def test_access_log_istio_format():
    line = format_line(_Rec())
    assert line == ('[2026-11-26T06:36:43.139Z] "GET /a?b=1 HTTP/1.1" 200 - via_upstream - "-" 0 12 3 2 '
                    '"-" "curl/8" "id-1" "svc" "127.0.0.1:8080" outbound|80||svc 127.0.0.1:5555 '
                    '127.0.0.1:15001 127.0.0.1:4444 - default\n')


@pytest.mark.parametrize("text,expected", [("127.0.0.1:15001", ("127.0.0.1", 15001)),
                                           (":80", ("127.0.0.1", 80)), ("[::1]:9", ("::1", 9))])
def test_parse_hostport(text, expected):
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1", "h:x", "h:99999", "h:+1", "h:١"])
def test_parse_hostport_rejects(text):
    with pytest.raises(ValueError):
        parse_hostport(text)


def test_request_id_is_uuid4():
    from meshcore._ext.loop import Loop
    loop = Loop(None)
    ids = {loop.make_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    for rid in list(ids)[:50]:
        assert re.fullmatch(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", rid)
