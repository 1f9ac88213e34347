"""Real Prometheus (Debian's package, installed by scripts/bootstrap.sh) scrapes meshcore with 2
workers while a known mix of requests is sent; its HTTP API must then count exactly that.

Prometheus runs with a temporary config and storage on a port the test picks; it scrapes only
127.0.0.1. Without a prometheus binary the test is skipped locally and fails in CI (CI=true),
where bootstrap.sh must have installed it.
"""
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from harness import Pods, Proxy, free_port, get, wait_port, write_config

PROMETHEUS = shutil.which("prometheus")

MESH = """
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: shop}}
spec:
  hosts: [shop.default.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {a}}}, labels: {{app: shop, version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: {b}}}, labels: {{app: shop, version: v2}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: shop}}
spec:
  hosts: [shop.default.svc.cluster.local]
  http:
  - route: [{{destination: {{host: shop.default.svc.cluster.local}}}}]
    retries: {{attempts: 2, retryOn: 5xx}}
"""

SENT = {"200": 20, "503": 5, "404": 3}
DELAY_MS = 30


def query(port, promql):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:
        doc = json.loads(r.read())
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


@pytest.fixture
def prometheus_binary():
    if PROMETHEUS is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed: scripts/bootstrap.sh installs Debian's "
                        "package as root")
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    return PROMETHEUS


def test_prometheus_counts_what_was_sent(tmp_path, prometheus_binary):
    pods = Pods([("shop-a", free_port(), "a"), ("shop-b", free_port(), "b")])
    cfg = write_config(str(tmp_path), MESH.format(a=pods.port("shop-a"), b=pods.port("shop-b")))
    metrics_port, prom_port = free_port(), free_port()
    px = Proxy([cfg], workers=2, extra=["--no-access-log", "--prometheus",
                                        f"127.0.0.1:{metrics_port}", "--workload-name", "client"])
    (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
- job_name: meshcore
  metrics_path: /stats/prometheus
  static_configs: [{{targets: ["127.0.0.1:{metrics_port}"]}}]
""")
    prom = subprocess.Popen([prometheus_binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(prom_port, timeout=30)
        host = "shop.default.svc.cluster.local"
        for _ in range(SENT["200"]):
            assert get(px.port, f"/delay/{DELAY_MS}", host=host).status == 200
        for _ in range(SENT["503"]):  # retried twice on the other pod, then 503 URX
            assert get(px.port, "/status/503", host=host).status == 503
        for _ in range(SENT["404"]):
            assert get(px.port, "/status/404", host=host).status == 404

        deadline = time.monotonic() + 30
        got = {}
        while time.monotonic() < deadline:
            result = query(prom_port, "sum by (response_code) (istio_requests_total)")
            got = {r["metric"]["response_code"]: int(float(r["value"][1])) for r in result}
            if got == SENT:
                break
            time.sleep(0.5)
        assert got == SENT

        urx = query(prom_port, 'sum(istio_requests_total{response_flags="URX"})')
        assert int(float(urx[0]["value"][1])) == SENT["503"]
        by_source = query(prom_port, 'sum by (reporter, source_workload, destination_service) '
                                     '(istio_requests_total)')
        assert [(r["metric"]["reporter"], r["metric"]["source_workload"],
                 r["metric"]["destination_service"]) for r in by_source] == [
            ("source", "client", host)]
        # 2 retries per 503: the Envoy cluster stats are exported too
        retries = query(prom_port, "sum(envoy_cluster_upstream_rq_retry)")
        assert int(float(retries[0]["value"][1])) == 2 * SENT["503"]

        p50 = query(prom_port, "histogram_quantile(0.5, sum by (le) "
                               "(istio_request_duration_milliseconds_bucket))")
        value = float(p50[0]["value"][1])
        # 20 of the 28 requests waited DELAY_MS at the pod: the median cannot be below the
        # bucket bound under it (25 ms), and it is a finite duration
        assert 25 <= value < 3600000
        count = query(prom_port, "sum(istio_request_duration_milliseconds_count)")
        assert int(float(count[0]["value"][1])) == sum(SENT.values())
    finally:
        prom.terminate()
        prom.wait(10)
        px.stop()
        pods.stop()
