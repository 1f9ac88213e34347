"""The real proxy (2 workers) in front of real pods on 127.0.0.1: routing, framing, local replies."""
import collections
import hashlib
import re
import time

import pytest

from harness import Client, get

V1 = {"myweb-v1-a", "myweb-v1-b", "myweb-v1-c"}
V2 = {"myweb-v2-a", "myweb-v2-b", "myweb-v2-c"}


def test_subset_v1_only_spreads_over_all_v1_pods(proxy, pods):
    seen = collections.Counter()
    c = Client(proxy.port)
    for _ in range(30):
        r = c.request(host="myweb-service")
        assert r.status == 200
        assert r.body.startswith(b"Version 1: server id ")
        seen[r.header("x-pod")] += 1
    c.close()
    assert set(seen) == V1  # ROUND_ROBIN over the subset: every v1 pod, never a v2 pod


def test_host_with_port_and_absolute_form(proxy):
    assert get(proxy.port, host="myweb-service:80").header("x-pod") in V1
    c = Client(proxy.port)
    c.send(b"GET http://myweb-service/abs HTTP/1.1\r\nHost: ignored-host\r\n\r\n")
    r = c.read_response()
    assert r.status == 200 and r.header("x-pod") in V1
    c.close()


def test_matches_headers_prefix_regex_method_query_without_headers(proxy):
    assert get(proxy.port, headers=[("x-canary", "yes")]).header("x-pod") in V2
    assert get(proxy.port, headers=[("x-canary", "no")]).header("x-pod") in V1
    assert get(proxy.port, path="/v2only/x").header("x-pod") in V2
    c = Client(proxy.port)
    assert c.request("POST", "/reeex?z=1", body=b"").header("x-pod") in V2  # regex ignores query
    assert c.request("GET", "/reeex").header("x-pod") in V1  # method must match too
    assert c.request("POST", "/reex/more", body=b"").header("x-pod") in V1  # full match only
    c.close()
    assert get(proxy.port, path="/?pick=v2").header("x-pod") in V2
    assert get(proxy.port, path="/?pick=v2x").header("x-pod") in V1
    # withoutHeaders: the catch-all rule is skipped when x-block is present -> no route
    r = get(proxy.port, headers=[("x-block", "")])
    assert r.status == 404 and r.body == b"" and r.header("content-length") == "0"


def test_weighted_split_80_20(proxy):
    counts = collections.Counter()
    c = Client(proxy.port)
    for _ in range(400):
        r = c.request(host="split-service")
        counts["v1" if r.header("x-pod") in V1 else "v2"] += 1
    c.close()
    # 400 draws of p=0.8: mean 320, sd 8; 5 sd bounds keep this from flaking
    assert 280 <= counts["v1"] <= 360, counts


def test_default_route_for_host_without_virtualservice(proxy):
    r = get(proxy.port, path="/hello", host="echo-service:8080")
    assert r.status == 200 and r.header("x-pod") == "echo"


def test_local_replies_nr_uh_uf(proxy):
    r = get(proxy.port, host="unknown-service")
    assert (r.status, r.body) == (404, b"")
    r = get(proxy.port, path="/nowhere")  # a destination with no endpoints
    assert (r.status, r.body) == (503, b"no healthy upstream")
    assert r.header("content-type") == "text/plain" and r.header("server") == "envoy"
    r = get(proxy.port, host="dead-service")  # connection refused
    assert r.status == 503
    assert r.body.startswith(b"upstream connect error or disconnect/reset before headers. ")
    assert b"remote connection failure" in r.body


def test_upstream_closes_without_response_is_503_uc(proxy):
    r = get(proxy.port, path="/__close", host="echo-service:8080")
    assert r.status == 503
    assert r.body.endswith(b"reset reason: connection termination")


def test_request_headers_as_envoy_sets_them(proxy, pods):
    pods.log("echo", clear=True)
    r = get(proxy.port, path="/echo", host="echo-service:8080",
            headers=[("Connection", "keep-alive, x-hop"), ("X-Hop", "1"), ("Keep-Alive", "timeout=5"),
                     ("TE", "gzip"), ("X-Keep", "yes")])
    assert r.status == 200
    assert r.header("server") == "envoy"
    assert re.fullmatch(r"\d+", r.header("x-envoy-upstream-service-time"))
    seen = dict(pods.log("echo")[-1]["headers"])
    assert seen["host"] == "echo-service:8080"
    assert seen["x-keep"] == "yes"
    assert seen["x-forwarded-proto"] == "http"
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        seen["x-request-id"])
    for hop in ("connection", "x-hop", "keep-alive", "te"):
        assert hop not in seen
    assert "x-forwarded-for" not in seen  # Istio sidecars: use_remote_address false
    # a client-supplied request id is preserved
    get(proxy.port, path="/echo", host="echo-service:8080", headers=[("x-request-id", "abc")])
    assert dict(pods.log("echo")[-1]["headers"])["x-request-id"] == "abc"


def test_keepalive_reuses_upstream_connection(proxy, pods):
    pods.log("echo", clear=True)
    c = Client(proxy.port)
    for _ in range(5):
        assert c.request(path="/echo", host="echo-service:8080").status == 200
    c.close()
    conns = {entry["conn"] for entry in pods.log("echo")}
    assert len(conns) == 1, conns  # one client connection lands on one worker: one pooled conn


def test_pipelined_requests_answered_in_order(proxy):
    c = Client(proxy.port)
    c.send(b"GET /delay/50 HTTP/1.1\r\nHost: echo-service:8080\r\n\r\n"
           b"GET /status/201 HTTP/1.1\r\nHost: echo-service:8080\r\n\r\n"
           b"GET /status/404 HTTP/1.1\r\nHost: echo-service:8080\r\n\r\n")
    assert [c.read_response().status for _ in range(3)] == [200, 201, 404]
    c.close()


def test_expect_100_continue(proxy, pods):
    c = Client(proxy.port)
    c.send(b"POST /echo HTTP/1.1\r\nHost: echo-service:8080\r\nExpect: 100-continue\r\n"
           b"Content-Length: 5\r\n\r\n")
    line = c._line()
    assert line == b"HTTP/1.1 100 Continue"
    assert c._line() == b""
    c.send(b"hello")
    r = c.read_response()
    assert r.status == 200
    assert pods.log("echo")[-1]["body_len"] == 5
    assert "expect" not in dict(pods.log("echo")[-1]["headers"])
    c.close()


def test_chunked_upload_is_reframed_and_streamed(proxy, pods):
    c = Client(proxy.port)
    body = [b"x" * 1000, b"hello", b"y" * 70000]
    c.send(b"POST /echo HTTP/1.1\r\nHost: echo-service:8080\r\nTransfer-Encoding: chunked\r\n\r\n")
    for piece in body:
        c.send(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
        time.sleep(0.01)
    c.send(b"0\r\nx-trailer: 1\r\n\r\n")
    r = c.read_response()
    assert r.status == 200
    entry = pods.log("echo")[-1]
    assert entry["body_len"] == sum(map(len, body))
    assert entry["body_sha256"] == hashlib.sha256(b"".join(body)).hexdigest()
    assert dict(entry["headers"]).get("transfer-encoding") == "chunked"
    c.close()


@pytest.mark.parametrize("mode", ["", "?chunked=1", "?close=1"])
def test_large_download_streams(proxy, mode):
    size = 64 * 1024 * 1024 + 7
    digest = hashlib.sha256()
    c = Client(proxy.port, timeout=60)
    c.send(b"GET /bytes/%d%s HTTP/1.1\r\nHost: echo-service:8080\r\n\r\n" % (size, mode.encode()))
    r = c.read_response(sink=digest.update)
    assert r.status == 200 and r.body_size == size
    if mode == "?close=1":  # close-delimited upstream body is re-framed as chunked: client stays
        assert r.header("transfer-encoding") == "chunked"
        assert c.request(path="/status/200", host="echo-service:8080").status == 200
    c.close()


def test_large_upload_streams_in_bounded_memory(proxy, pods):
    size = 256 * 1024 * 1024
    block = b"z" * (1 << 20)
    c = Client(proxy.port, timeout=120)
    c.send(b"PUT /echo HTTP/1.1\r\nHost: echo-service:8080\r\nContent-Length: %d\r\n\r\n" % size)
    for _ in range(size // len(block)):
        c.send(block)
    r = c.read_response()
    assert r.status == 200
    assert pods.log("echo")[-1]["body_len"] == size
    c.close()
    # every worker stayed small while 256 MiB went through it
    for w in proxy.info()["workers"]:
        with open(f"/proc/{w['pid']}/status") as f:
            rss_kb = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
        assert rss_kb < 120 * 1024, (w, rss_kb)


def test_http10_gets_426(proxy, pods):
    c = Client(proxy.port)
    c.send(b"GET / HTTP/1.0\r\nHost: myweb-service\r\n\r\n")
    r = c.read_response()
    assert (r.status, r.body) == (426, b"Upgrade Required")
    c.close()


def test_head_request_keeps_content_length(proxy):
    c = Client(proxy.port)
    r = c.request("HEAD", "/bytes/1234", host="echo-service:8080")
    assert r.status == 200 and r.header("content-length") == "1234"
    assert c.request(path="/status/200", host="echo-service:8080").status == 200  # framing intact
    c.close()


def test_access_log_lines(proxy):
    get(proxy.port, path="/logged?x=1", host="echo-service:8080", headers=[("User-Agent", "pytest-ua")])
    get(proxy.port, host="unknown-service")
    time.sleep(0.6)  # the workers flush every 0.2 s
    with open(proxy.log_path) as f:
        lines = f.read().splitlines()
    ok = [l for l in lines if '"GET /logged?x=1 HTTP/1.1"' in l]
    assert ok, lines[-5:]
    assert re.match(r'^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\] "GET /logged\?x=1 HTTP/1.1" 200 - via_upstream '
                    r'- "-" 0 \d+ \d+ \d+ "-" "pytest-ua" "[0-9a-f-]{36}" "echo-service:8080" '
                    r'"127\.0\.0\.1:\d+" outbound\|8080\|\|echo-service 127\.0\.0\.1:\d+ 127\.0\.0\.1:\d+ '
                    r'127\.0\.0\.1:\d+ - default$', ok[-1]), ok[-1]
    nr = [l for l in lines if '"unknown-service"' in l]
    assert nr and ' 404 NR route_not_found ' in nr[-1]
