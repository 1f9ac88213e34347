"""Observability of a live proxy (2 workers): Istio metrics on /stats/prometheus and the
Prometheus port, Envoy's admin endpoints, the access log options, `meshcore top`."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import REPO, Client, Pods, Proxy, free_port, get, write_config

MESH = """
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web.shop.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {a}}}, labels: {{app: web, version: v1,
      service.istio.io/workload-name: web-v1}}}}
  - {{address: 127.0.0.1, ports: {{http: {b}}}, labels: {{app: web, version: v2,
      service.istio.io/workload-name: web-v2}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: web, namespace: shop}}
spec:
  host: web.shop.svc.cluster.local
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
    outlierDetection: {{consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 60s,
                       maxEjectionPercent: 50}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web.shop.svc.cluster.local]
  http:
  - match: [{{uri: {{prefix: /retry}}}}]
    route: [{{destination: {{host: web.shop.svc.cluster.local}}}}]
    retries: {{attempts: 2, retryOn: 5xx}}
  - match: [{{uri: {{prefix: /}}}}]
    route: [{{destination: {{host: web.shop.svc.cluster.local}}}}]
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("obs")
    pods = Pods([("web-a", free_port(), "a"), ("web-b", free_port(), "b")])
    cfg = write_config(str(tmp), MESH.format(a=pods.port("web-a"), b=pods.port("web-b")))
    prom = free_port()
    log_file = str(tmp / "access.json")
    px = Proxy([cfg], workers=2, extra=[
        "--prometheus", f"127.0.0.1:{prom}", "--workload-name", "client", "--namespace", "shop",
        "--app", "client-app", "--version", "v9", "--access-log-encoding", "json",
        "--access-log-file", log_file])
    px.prom_port = prom
    px.log_file = log_file
    yield pods, px
    px.stop()
    pods.stop()


def admin(px, path, method="GET"):
    req = urllib.request.Request(f"http://127.0.0.1:{px.admin}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def requests_by(px, *labels, port=None):
    port = port or px.admin
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats/prometheus", timeout=5) as r:
        text = r.read().decode()
    out = {}
    fam = families(text).get("istio_requests")  # absent until the first request
    for s in (fam.samples if fam else ()):
        k = tuple(s.labels[lb] for lb in labels)
        out[k] = out.get(k, 0) + s.value
    return out


def settled(fn, ok, timeout=5.0):
    """fn() once ok(value) holds: a request is recorded just after its response is sent."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_istio_metrics_count_what_was_sent(env):
    pods, px = env
    before = requests_by(px, "response_code")
    host = "web.shop.svc.cluster.local"
    for _ in range(6):
        assert get(px.port, "/", host=host).status == 200
    assert get(px.port, "/status/404", host=host).status == 404
    assert get(px.port, "/", host="nowhere.example").status == 404  # no route: NR
    codes = settled(lambda: requests_by(px, "response_code"),
                    lambda c: c.get(("404",), 0) - before.get(("404",), 0) >= 2)
    # the Prometheus port serves the same exposition as the admin port
    assert requests_by(px, "response_code", port=px.prom_port) == codes
    assert codes[("200",)] - before.get(("200",), 0) == 6
    assert codes[("404",)] - before.get(("404",), 0) == 2
    nr = requests_by(px, "response_code", "response_flags", "destination_service",
                     "destination_workload")
    assert nr[("404", "NR", "unknown", "unknown")] >= 1
    labels = requests_by(px, "reporter", "source_workload", "source_workload_namespace",
                         "source_app", "source_version", "destination_workload",
                         "destination_service_name", "destination_service_namespace",
                         "destination_version")
    assert labels[("source", "client", "shop", "client-app", "v9", "web-v1", "web", "shop",
                   "v1")] >= 3
    assert labels[("source", "client", "shop", "client-app", "v9", "web-v2", "web", "shop",
                   "v2")] >= 3


def test_exposition_is_valid_and_has_envoy_stats(env):
    pods, px = env
    get(px.port, "/", host="web.shop.svc.cluster.local")
    status, headers, body = admin(px, "/stats/prometheus")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    fam = families(body.decode())
    assert fam["istio_request_duration_milliseconds"].type == "histogram"
    assert fam["istio_request_bytes"].type == "histogram"
    assert fam["istio_response_bytes"].type == "histogram"
    rq = {s.labels["cluster_name"]: s.value for s in fam["envoy_cluster_upstream_rq"].samples}
    assert rq["outbound|80||web.shop.svc.cluster.local"] >= 1
    assert fam["envoy_cluster_upstream_rq_time"].type == "histogram"
    assert fam["envoy_server_live"].samples[0].value == 1
    assert fam["envoy_listener_downstream_cx"].samples[0].value >= 1  # _total stripped
    # filters apply to Envoy's stats; a bad regex is a 400, as in Envoy
    status, _, body = admin(px, "/stats/prometheus?filter=upstream_rq_total")
    envoy_lines = [l for l in body.decode().splitlines() if l.startswith("envoy_")]
    assert envoy_lines and all(l.startswith("envoy_cluster_upstream_rq_total") for l in envoy_lines)
    assert admin(px, "/stats/prometheus?filter=(((")[0] == 400


def test_stats_filter_usedonly_json(env):
    pods, px = env
    get(px.port, "/", host="web.shop.svc.cluster.local")
    status, _, body = admin(px, "/stats?filter=upstream_rq_total$")
    lines = body.decode().splitlines()
    assert status == 200 and lines == sorted(lines) and lines
    assert all(l.split(":")[0].endswith("upstream_rq_total") for l in lines)
    status, headers, body = admin(px, "/stats?format=json&usedonly&filter=^cluster%5C.")
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    names = [s["name"] for s in doc["stats"] if "name" in s]
    assert names and all(s["value"] for s in doc["stats"] if "name" in s)
    hist = [s for s in doc["stats"] if "histograms" in s][0]["histograms"]
    assert 50 in hist["supported_quantiles"]
    status, _, body = admin(px, "/stats?filter=(((")
    assert status == 400 and b"Invalid regex" in body


def test_mutating_endpoints_are_post_only(env):
    pods, px = env
    for path in ("/healthcheck/fail", "/healthcheck/ok", "/quitquitquit", "/reset_counters",
                 "/logging"):
        status, _, body = admin(px, path)
        assert status == 405 and body == b"Method GET not allowed, POST required.\n", path


def test_healthcheck_fail_flips_ready(env):
    pods, px = env
    assert admin(px, "/ready")[:1] == (200,)
    assert admin(px, "/healthcheck/fail", "POST")[0] == 200
    status, _, body = admin(px, "/ready")
    assert (status, body) == (503, b"DRAINING\n")
    assert json.loads(admin(px, "/server_info")[2])["state"] == "DRAINING"
    assert get(px.port, "/", host="web.shop.svc.cluster.local").status == 200  # still serving
    assert admin(px, "/healthcheck/ok", "POST")[0] == 200
    assert admin(px, "/ready")[:1] == (200,)


def test_server_info_memory_listeners_help_logging(env):
    pods, px = env
    info = json.loads(admin(px, "/server_info")[2])
    assert info["version"].startswith("meshcore/")
    assert info["state"] == "LIVE" and info["uptime_current_epoch"].endswith("s")
    opts = info["command_line_options"]
    assert opts["concurrency"] == 2 and "--workload-name" in opts["argv"]
    assert opts["prometheus"] == f"127.0.0.1:{px.prom_port}"
    mem = json.loads(admin(px, "/memory")[2])
    assert len(mem["workers"]) == 2 and all(w["rss_bytes"] > 1 << 20 for w in mem["workers"])
    assert mem["total_physical_bytes"] >= sum(w["rss_bytes"] for w in mem["workers"])
    assert admin(px, "/listeners")[2] == f"outbound::127.0.0.1:{px.port}\n".encode()
    lj = json.loads(admin(px, "/listeners?format=json")[2])
    assert lj["listener_statuses"][0]["local_address"]["socket_address"]["port_value"] == px.port
    from meshcore.admin import ENDPOINTS
    text = admin(px, "/help")[2].decode()
    for path, (post, _, _) in ENDPOINTS.items():
        assert f"  {path}{' (POST)' if post else ''}: " in text
    status, _, body = admin(px, "/logging?config=warning", "POST")
    assert status == 200 and b"  config: warning\n" in body
    status, _, body = admin(px, "/logging?level=bogus", "POST")
    assert status == 400 and b"unknown logger level" in body
    assert admin(px, "/logging?level=info", "POST")[0] == 200
    assert admin(px, "/nope")[0] == 404


def test_reset_counters(env):
    pods, px = env
    before = sum(requests_by(px, "response_code").values())
    get(px.port, "/", host="web.shop.svc.cluster.local")
    settled(lambda: sum(requests_by(px, "response_code").values()), lambda n: n == before + 1)
    assert admin(px, "/reset_counters", "POST")[0] == 200
    line = [l for l in admin(px, "/stats?filter=web.*upstream_rq_total$")[2].decode().splitlines()]
    assert line == ["cluster.outbound|80||web.shop.svc.cluster.local.upstream_rq_total: 0"]
    assert requests_by(px, "response_code") == {} or all(
        v == 0 for v in requests_by(px, "response_code").values())
    get(px.port, "/", host="web.shop.svc.cluster.local")
    line = admin(px, "/stats?filter=web.*upstream_rq_total$")[2].decode()
    assert line.endswith(": 1\n")
    codes = settled(lambda: requests_by(px, "response_code"), lambda c: c.get(("200",)) == 1)
    assert codes[("200",)] == 1


def test_clusters_show_ejection_with_time_left(env):
    pods, px = env
    host = "web.shop.svc.cluster.local"
    # round robin over 2 hosts: 4 requests put 2 consecutive 5xx on each; maxEjectionPercent 50
    # lets exactly one of them be ejected
    for _ in range(4):
        get(px.port, "/status/500", host=host)
    text = admin(px, "/clusters")[2].decode()
    name = f"outbound|80||{host}"
    flags = [l for l in text.splitlines() if l.startswith(name) and "::health_flags::" in l]
    assert sorted(l.rsplit("::", 1)[1] for l in flags) == ["/failed_outlier_check", "healthy"]
    left = [int(l.rsplit("::", 1)[1]) for l in text.splitlines()
            if l.startswith(name) and "::ejection_time_left_ms::" in l]
    assert sorted(left)[0] == 0 and 50_000 < sorted(left)[1] <= 60_000
    assert f"{name}::default_priority::max_retries::4294967295" in text
    doc = json.loads(admin(px, "/clusters?format=json")[2])
    cl = [c for c in doc["cluster_statuses"] if c["name"] == name][0]
    ejected = [h for h in cl["host_statuses"] if h["health_status"].get("failed_outlier_check")]
    assert len(ejected) == 1 and ejected[0]["ejection_time_left_ms"] > 50_000
    totals = {s["name"]: int(s.get("value", 0)) for h in cl["host_statuses"] for s in h["stats"]
              if s["name"] in ("rq_total", "rq_error")}
    assert totals  # per-host request counters are present
    errors = sum(int(s.get("value", 0)) for h in cl["host_statuses"] for s in h["stats"]
                 if s["name"] == "rq_error")
    assert errors >= 4


def test_access_log_json_file(env):
    pods, px = env
    get(px.port, "/status/404", host="web.shop.svc.cluster.local",
        headers=[("user-agent", "obs-test")])
    deadline = time.monotonic() + 5
    entries = []
    while time.monotonic() < deadline:
        if os.path.exists(px.log_file):
            with open(px.log_file) as f:
                entries = [json.loads(l) for l in f if l.strip()]
            if any(e["user_agent"] == "obs-test" for e in entries):
                break
        time.sleep(0.1)
    e = [e for e in entries if e["user_agent"] == "obs-test"][0]
    assert e["response_code"] == 404 and e["method"] == "GET" and e["path"] == "/status/404"
    assert e["upstream_cluster"] == "outbound|80||web.shop.svc.cluster.local"
    assert e["response_flags"] is None and isinstance(e["duration"], int)
    assert list(e)[:3] == ["start_time", "route_name", "method"]


def test_custom_text_format_and_bad_format(tmp_path):
    pods = Pods([("p", free_port(), "x")])
    cfg = write_config(str(tmp_path), MESH.format(a=pods.port("p"), b=pods.port("p")))
    log_path = str(tmp_path / "out.log")
    px = Proxy([cfg], workers=1, log_path=log_path,
               extra=["--access-log-format", "%RESPONSE_CODE% %REQ(:METHOD)% %REQ(X-MISSING)%"
                      " %REQ(USER-AGENT):3%\n"])
    try:
        get(px.port, "/", host="web.shop.svc.cluster.local", headers=[("user-agent", "abcdef")])
    finally:
        px.stop()
        pods.stop()
    with open(log_path) as f:
        assert f.read() == "200 GET - abc\n"
    bad = subprocess.run([sys.executable, "-m", "meshcore", "run", "--config", cfg,
                          "--access-log-format", "%NOPE%"], cwd=REPO, capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "unsupported command operator %NOPE%" in bad.stderr


def test_quitquitquit_exits(tmp_path):
    pods = Pods([("p", free_port(), "x")])
    cfg = write_config(str(tmp_path), MESH.format(a=pods.port("p"), b=pods.port("p")))
    px = Proxy([cfg], workers=1, extra=["--no-access-log"])
    try:
        assert admin(px, "/quitquitquit", "POST")[:1] == (200,)
        assert px.proc.wait(15) == 0
    finally:
        px.stop()
        pods.stop()
