"""`meshcore run --sidecar` as a process on 127.0.0.1: the readiness port (Istio's 15021), the
sidecar options reaching the admin views, and the compiled sidecar table in /config_dump."""
from __future__ import annotations

import json
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest

from harness import Proxy, free_port, write_config

MESH = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews.bookinfo.svc.cluster.local]
  addresses: [10.96.0.20]
  ports: [{number: 9080, name: http}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {http: 1}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mysql, namespace: bookinfo}
spec:
  hosts: [mysql.bookinfo.svc.cluster.local]
  addresses: [10.96.0.30]
  ports: [{number: 3306, name: mysql}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {mysql: 2}}]
"""


def health(port: int, path: str = "/healthz/ready", method: str = "GET"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


@pytest.fixture
def sidecar(tmp_path):
    write_config(str(tmp_path), MESH)
    health_port = free_port()
    inbound = free_port()
    proxy = Proxy([str(tmp_path)], workers=2,
                  extra=["--sidecar", "--namespace", "bookinfo", "--inbound-listen",
                         f"127.0.0.1:{inbound}", "--health", f"127.0.0.1:{health_port}",
                         "--outbound-traffic-policy", "REGISTRY_ONLY", "--drain-grace", "5"])
    proxy.health_port = health_port
    proxy.inbound = inbound
    yield proxy
    proxy.stop()


def test_readiness_port_follows_the_supervisor_state(sidecar):
    assert health(sidecar.health_port) == (200, b"")
    assert health(sidecar.health_port, method="HEAD")[0] == 200
    assert health(sidecar.health_port, "/ready")[0] == 404  # only the probe path here
    assert health(sidecar.health_port, method="POST")[0] == 405
    req = urllib.request.Request(f"http://127.0.0.1:{sidecar.admin}/healthcheck/fail", method="POST")
    urllib.request.urlopen(req, timeout=5).close()
    assert health(sidecar.health_port) == (503, b"not ready: DRAINING\n")
    req = urllib.request.Request(f"http://127.0.0.1:{sidecar.admin}/healthcheck/ok", method="POST")
    urllib.request.urlopen(req, timeout=5).close()
    assert health(sidecar.health_port)[0] == 200


def test_readiness_is_503_while_draining(sidecar):
    # a request still arriving keeps a worker draining (up to --drain-grace)
    busy = socket.create_connection(("127.0.0.1", sidecar.port), timeout=5)
    try:
        busy.sendall(b"GET / HTTP/1.1\r\nHost: reviews\r\n")
        time.sleep(0.2)
        sidecar.signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        seen = None
        while time.monotonic() < deadline:
            try:
                seen = health(sidecar.health_port)
            except OSError:
                break  # the supervisor finished draining
            if seen[0] == 503:
                break
            time.sleep(0.02)
        assert seen == (503, b"not ready: DRAINING\n")
    finally:
        busy.close()


def test_sidecar_options_reach_the_admin_views(sidecar):
    info = sidecar.info()["command_line_options"]
    assert info["sidecar"] is True
    assert info["inbound"] == f"127.0.0.1:{sidecar.inbound}"
    assert info["health"] == f"127.0.0.1:{sidecar.health_port}"
    assert info["outbound_traffic_policy"] == "REGISTRY_ONLY"
    dump = json.loads(sidecar.admin_get("/config_dump")[1])
    table = dump["sidecar"]
    assert table["outbound_traffic_policy"] == "REGISTRY_ONLY"
    assert [(o["match"], o["kind"]) for o in table["outbound"]] == [
        ("10.96.0.30:3306", "tcp"), ("*:9080", "http"), ("*:*", "blackhole")]
    names = {c["name"] for c in dump["clusters"]}
    assert {"PassthroughCluster", "BlackHoleCluster",
            "outbound|3306||mysql.bookinfo.svc.cluster.local"} <= names
    # Istio's special clusters have stats rows like any other
    stats = sidecar.admin_get("/stats")[1].decode()
    assert "cluster.BlackHoleCluster.upstream_rq_total" in stats


def test_explicit_mode_has_no_health_port_by_default(tmp_path):
    write_config(str(tmp_path), MESH)
    proxy = Proxy([str(tmp_path)], workers=1)
    try:
        info = proxy.info()["command_line_options"]
        assert info["sidecar"] is False and info["health"] is None and info["inbound"] is None
        assert "sidecar" not in json.loads(proxy.admin_get("/config_dump")[1])
    finally:
        proxy.stop()
