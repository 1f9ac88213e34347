"""Access log formats: Envoy command operators compiled once; Istio's text format through the
operators equals the hand-written one; Istio's JSON fields; bad formats named."""
import json

import pytest

from meshcore.accesslog import (ISTIO_JSON, ISTIO_TEXT, AccessLogFormatError, compile_format,
                                format_line)


class Head:
    method, path, host = b"POST", b"/orders?id=7", b"shop:80"

    def get(self, name):
        return {b"user-agent": b"curl/8", b"x-forwarded-for": b"10.0.0.1",
                b"x-custom": b"a\"b"}.get(name)


class Rec:
    head = Head()
    start = 1795675003.139
    status, flags, details = 503, "URX,UF", "upstream_reset_before_response_started{x}"
    bytes_received, bytes_sent, duration_ms, upstream_service_time = 12, 91, 40, None
    request_id = b"rid"
    upstream_host, cluster, upstream_local = "127.0.0.1:9", "outbound|80||shop", None
    downstream_local, downstream_remote, route_name = "127.0.0.1:15001", "[::1]:4444", "r1"


def test_istio_text_via_operators_equals_the_fast_path():
    assert compile_format(ISTIO_TEXT)(Rec()) == format_line(Rec())
    assert compile_format(None) is format_line


def test_custom_text_operators():
    fmt = ("%RESPONSE_CODE% %RESPONSE_FLAGS% %REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% "
           "%REQ(USER-AGENT):4% %REQ(X-NOPE)% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "
           "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% 100%% %PROTOCOL%")
    assert compile_format(fmt)(Rec()) == \
        "503 URX,UF POST /orders?id=7 curl - - ::1 100% HTTP/1.1\n"


@pytest.mark.parametrize("fmt,needle", [("%NOPE%", "%NOPE%"), ("%REQ%", "REQ needs"),
                                        ("%RESPONSE_CODE", "malformed"),
                                        ("%DURATION(x)%", "DURATION")])
def test_bad_formats_are_named(fmt, needle):
    with pytest.raises(AccessLogFormatError) as exc:
        compile_format(fmt)
    assert needle in str(exc.value)


def test_istio_json_fields_and_types():
    line = compile_format(None, "json")(Rec())
    assert line.endswith("\n")
    obj = json.loads(line)
    assert list(obj) == list(ISTIO_JSON)
    assert obj["response_code"] == 503 and obj["bytes_sent"] == 91 and obj["duration"] == 40
    assert obj["response_flags"] == "URX,UF" and obj["upstream_service_time"] is None
    assert obj["method"] == "POST" and obj["authority"] == "shop:80"
    assert obj["x_forwarded_for"] == "10.0.0.1" and obj["upstream_local_address"] is None


def test_custom_json_format():
    fmt = json.dumps({"code": "%RESPONSE_CODE%", "who": "%REQ(X-CUSTOM)% via %UPSTREAM_HOST%"})
    obj = json.loads(compile_format(fmt, "json")(Rec()))
    assert obj == {"code": 503, "who": 'a"b via 127.0.0.1:9'}
    with pytest.raises(AccessLogFormatError):
        compile_format("[1, 2]", "json")
    with pytest.raises(AccessLogFormatError):
        compile_format("{not json", "json")
    with pytest.raises(AccessLogFormatError):
        compile_format(None, "yaml")
