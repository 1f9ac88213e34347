"""`meshcore top` without a terminal: frames rendered from a live proxy's admin JSON (with an
ejected endpoint), and one run of the command with a fixed number of refreshes."""
import subprocess
import sys
import time

import pytest

from harness import REPO, Pods, Proxy, free_port, get, write_config
from meshcore import top

MESH = """
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: retry-service}}
spec:
  hosts: [retry-service]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {a}}}}}
  - {{address: 127.0.0.1, ports: {{http: {b}}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: retry-service}}
spec:
  host: retry-service
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
    outlierDetection: {{consecutive5xxErrors: 1, interval: 30s, baseEjectionTime: 60s,
                       maxEjectionPercent: 50}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: retry-service}}
spec:
  hosts: [retry-service]
  http:
  - route: [{{destination: {{host: retry-service}}}}]
    retries: {{attempts: 3, retryOn: 5xx}}
"""


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("top")
    pods = Pods([("a", free_port(), "{}"), ("b", free_port(), "{}")])
    px = Proxy([write_config(str(tmp), MESH.format(a=pods.port("a"), b=pods.port("b")))],
               workers=2, extra=["--no-access-log"])
    yield pods, px
    px.stop()
    pods.stop()


def test_frame_shows_ejection_rates_latency_and_retries(live):
    pods, px = live
    admin = f"127.0.0.1:{px.admin}"
    before = top.snapshot(admin)
    assert before.error is None and before.state == "LIVE" and before.workers == 2
    # one 500 ejects the pod that answered it (maxEjectionPercent 50: only one); the retry
    # goes to the other pod, which answers 500 too but may not be ejected: 503 after retries
    statuses = [get(px.port, "/status/500", host="retry-service").status for _ in range(2)]
    for _ in range(6):
        assert get(px.port, "/", host="retry-service").status == 200
    time.sleep(0.2)
    after = top.snapshot(admin)
    frame = top.render(after, before)
    lines = frame.splitlines()
    assert lines[0].startswith(f"meshcore top - {admin} - LIVE - uptime ")
    assert lines[1] == top.HEADER
    cluster = next(l for l in lines if l.startswith("outbound|80||retry-service"))
    cols = cluster.split()
    assert cols[1] == "1/2"  # one of the two endpoints is ejected
    total = int(cols[4])
    assert total == after.clusters["outbound|80||retry-service"].counters["upstream_rq_total"]
    assert total >= 8 and float(cols[5]) > 0  # requests per second since the first snapshot
    assert cols[6] != "-" and cols[7] != "-"  # p50, p99 from upstream_rq_time
    retries = int(cols[9])
    assert retries >= 1
    eps = [l for l in lines if l.startswith("  127.0.0.1:")]
    assert len(eps) == 2
    ejected = [l for l in eps if " ejected " in l]
    assert len(ejected) == 1
    left = float(ejected[0].split("ejected ")[1].split("s")[0])
    assert 50 < left <= 60
    assert sum(int(l.split()[-1]) for l in eps) >= 2  # the 500s show as endpoint errors
    assert statuses.count(500) + statuses.count(200) + statuses.count(503) == 2


def test_filter_and_unreachable_admin():
    snap = top.snapshot(f"127.0.0.1:{free_port()}", timeout=0.5)
    assert snap.error and snap.state == "UNREACHABLE"
    frame = top.render(snap)
    assert "admin not reachable" in frame


def test_command_runs_a_fixed_number_of_refreshes(live):
    pods, px = live
    out = subprocess.run([sys.executable, "-m", "meshcore", "top", "--admin",
                          f"127.0.0.1:{px.admin}", "--iterations", "2", "--interval", "0.2",
                          "--filter", "retry"], cwd=REPO, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    frames = out.stdout.split("meshcore top - ")
    assert len(frames) == 3 and all("outbound|80||retry-service" in f for f in frames[1:])
    bad = subprocess.run([sys.executable, "-m", "meshcore", "top", "--filter", "((("],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--filter" in bad.stderr
