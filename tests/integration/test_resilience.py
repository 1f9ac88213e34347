"""The seed article's resilience demos against real pods: retries, timeouts, fault injection.

Retry pods answer `?failRate=N&mode=busy` with 503 at N %, and `mode=crash` hang ~2 s then die;
each retry pod runs in its own process so a crash takes down only that pod (the test restarts it).
"""
import collections
import time

import pytest

from harness import Client, Pods, Proxy, free_port, get, write_config

RETRY_PODS = ("retry-a", "retry-b", "retry-c")


def retry_mesh(ports, retries: str, timeout: str = "15s", extra_dr: str = "") -> str:
    eps = "\n".join(f"  - {{address: 127.0.0.1, ports: {{http: {p}}}}}" for p in ports)
    return f"""
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: retry-service}}
spec:
  hosts: [retry-service]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{eps}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: retry-vs}}
spec:
  hosts: [retry-service]
  http:
  - match: [{{uri: {{prefix: /fault-abort}}}}]
    fault: {{abort: {{httpStatus: 418, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: retry-service}}}}]
  - match: [{{uri: {{prefix: /fault-delay}}}}]
    fault: {{delay: {{fixedDelay: 300ms, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: retry-service}}}}]
  - match: [{{headers: {{x-slow: {{exact: "1"}}}}}}]
    timeout: 500ms
    retries: {{attempts: 0}}
    route: [{{destination: {{host: retry-service}}}}]
  - route:
    - destination: {{host: retry-service}}
    timeout: {timeout}
    retries: {retries}
{extra_dr}"""


@pytest.fixture(scope="module")
def retry_pods():
    pods = Pods([(name, free_port(), "{}") for name in RETRY_PODS], process_per_pod=True)
    yield pods
    pods.stop()


def _proxy(tmp_path, pods, retries, workers=2, timeout="15s", extra_dr=""):
    ports = [pods.port(n) for n in RETRY_PODS]
    path = write_config(str(tmp_path), retry_mesh(ports, retries, timeout, extra_dr))
    return Proxy([path], workers=workers, extra=["--no-access-log"])


def test_fail_rate_100_means_exactly_4_tries_on_different_pods(tmp_path, retry_pods):
    px = _proxy(tmp_path, retry_pods, '{attempts: 3, retryOn: "gateway-error,reset,5xx"}')
    try:
        seen = set()
        for _ in range(3):
            retry_pods.clear()
            r = get(px.port, "/?failRate=100&mode=busy", host="retry-service")
            assert r.status == 503 and r.body == b"busy\n"  # the last upstream 503 itself
            tries = [(n, e) for n in RETRY_PODS for e in retry_pods.log(n)]
            assert len(tries) == 4
            counts = sorted(int(dict(e["headers"])["x-envoy-attempt-count"]) for _, e in tries)
            assert counts == [1, 2, 3, 4]
            # previous_hosts steers retries to pods not tried yet (Envoy re-picks up to 5 times,
            # then keeps a tried host, so a request's 4 tries span 2 or 3 of the 3 pods)
            assert len({n for n, _ in tries}) >= 2
            seen |= {n for n, _ in tries}
        assert seen == set(RETRY_PODS)
    finally:
        px.stop()


def test_fail_rate_50_with_15_attempts_always_succeeds(tmp_path, retry_pods):
    px = _proxy(tmp_path, retry_pods, '{attempts: 15, perTryTimeout: 1s, retryOn: "gateway-error,reset,5xx"}')
    try:
        retry_pods.clear()
        c = Client(px.port)
        statuses = collections.Counter(
            c.request(path="/?failRate=50&mode=busy", host="retry-service").status for _ in range(40))
        c.close()
        assert statuses == {200: 40}
        assert retry_pods.total_requests() > 40  # the retries were real, visible only at the pods
    finally:
        px.stop()


def test_crash_mode_with_per_try_timeout_always_succeeds(tmp_path, retry_pods):
    px = _proxy(tmp_path, retry_pods, '{attempts: 15, perTryTimeout: 1s, retryOn: "gateway-error,reset,5xx"}')
    try:
        with retry_pods.kubelet():
            restarts = retry_pods.restarts
            for _ in range(6):
                r = get(px.port, "/?failRate=50&mode=crash", host="retry-service")
                assert r.status == 200 and r.body == b"{}"
            time.sleep(2.5)  # a pod hit by the last try may still be hanging before it dies
        assert retry_pods.restarts > restarts  # pods really crashed (the article's restart count)
    finally:
        px.stop()
        retry_pods.restart_dead()


def test_attempts_zero_disables_retries_and_route_timeout_is_504(tmp_path, retry_pods):
    px = _proxy(tmp_path, retry_pods, '{attempts: 0}', timeout="15s")
    try:
        retry_pods.clear()
        r = get(px.port, "/?failRate=100&mode=busy", host="retry-service")
        assert r.status == 503 and retry_pods.total_requests() == 1
        r = get(px.port, "/delay/3000", host="retry-service", headers=[("x-slow", "1")])
        assert (r.status, r.body) == (504, b"upstream request timeout")  # the 500 ms route timeout
    finally:
        px.stop()


def test_per_try_timeout_retries_a_hung_pod(tmp_path, retry_pods):
    px = _proxy(tmp_path, retry_pods, '{attempts: 2, perTryTimeout: 300ms, retryOn: "5xx"}', timeout="5s")
    try:
        retry_pods.clear()
        r = get(px.port, "/delay/2000", host="retry-service")
        # every try hangs: 3 tries of 300 ms each, then Envoy's 504 with URX,UT
        assert (r.status, r.body) == (504, b"upstream request timeout")
        tries = [e for n in RETRY_PODS for e in retry_pods.log(n)]
        assert sorted(int(dict(e["headers"])["x-envoy-attempt-count"]) for e in tries) == [1, 2, 3]
        assert all(dict(e["headers"])["x-envoy-expected-rq-timeout-ms"] == "300" for e in tries)
    finally:
        px.stop()


def test_fault_abort_and_delay(tmp_path, retry_pods):
    px = _proxy(tmp_path, retry_pods, '{attempts: 2}')
    try:
        retry_pods.clear()
        r = get(px.port, "/fault-abort", host="retry-service")
        assert (r.status, r.body) == (418, b"fault filter abort")
        assert retry_pods.total_requests() == 0
        t0 = time.monotonic()
        r = get(px.port, "/fault-delay", host="retry-service")
        assert r.status == 200 and time.monotonic() - t0 >= 0.3
    finally:
        px.stop()


CIRCUIT_BREAKER_DR = """---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: retry-service}
spec:
  host: retry-service
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
    outlierDetection:
      consecutiveErrors: 2
      interval: 200ms
      baseEjectionTime: 2s
      maxEjectionPercent: 100
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_article_circuit_breaker_ejects_then_fast_503_then_recovers(tmp_path, retry_pods, workers):
    """The article's circuit-breaker YAML with shorter times: once every pod failed twice in a
    row, calls get 503 straight from the proxy and the pods hear nothing; after
    baseEjectionTime traffic returns. With 2 workers, ejections made through one worker hold in
    the other (each client connection lands on either worker)."""
    px = _proxy(tmp_path, retry_pods, '{attempts: 30, perTryTimeout: 1s, retryOn: "gateway-error,reset,5xx"}',
                workers=workers, timeout="30s", extra_dr=CIRCUIT_BREAKER_DR)
    try:
        retry_pods.clear()
        statuses = [get(px.port, "/?failRate=100&mode=busy", host="retry-service").status
                    for _ in range(3)]
        assert statuses[-1] == 503
        ejected = [l for l in px.admin_get("/stats")[1].decode().splitlines()
                   if "outlier_detection.ejections_active" in l]
        assert ejected == ["cluster.outbound|80||retry-service.outlier_detection.ejections_active: 3"]
        heard = retry_pods.total_requests()
        assert heard == 6  # each pod failed exactly twice in a row, then was ejected
        for _ in range(10):  # new client connections: spread over both workers when there are 2
            r = get(px.port, "/?failRate=0&mode=busy", host="retry-service")
            assert (r.status, r.body) == (503, b"no healthy upstream")
        assert retry_pods.total_requests() == heard  # the pods' logs stay silent
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:  # ejection (2 s) ends at the next 200 ms sweep
            time.sleep(0.2)
            if get(px.port, "/?failRate=0&mode=busy", host="retry-service").status == 200:
                break
        else:
            pytest.fail("traffic never came back after baseEjectionTime")
    finally:
        px.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_max_connections_1_pending_1_rejects_the_rest_at_once(tmp_path, workers):
    import threading
    pods = Pods([("slow", free_port(), "{}")])
    try:
        mesh = retry_mesh([pods.port("slow")], "{attempts: 0}") + """---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: retry-service}
spec:
  host: retry-service
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}
"""
        px = Proxy([write_config(str(tmp_path), mesh)], workers=workers, extra=["--no-access-log"])
        results = []
        lock = threading.Lock()

        def call():
            r = get(px.port, "/delay/1500", host="retry-service")
            with lock:
                results.append((r.status, r.header("x-envoy-overloaded"), r.body))

        threads = [threading.Thread(target=call) for _ in range(10)]
        for t in threads:
            t.start()
            time.sleep(0.02)
        for t in threads:
            t.join(15)
        ok = [r for r in results if r[0] == 200]
        rejected = [r for r in results if r[0] == 503]
        assert len(ok) == 2 and len(rejected) == 8, results
        assert all(r[1] == "true" and r[2].endswith(b"reset reason: overflow") for r in rejected)
        assert len(pods.log("slow")) == 2  # the backend saw only what was served
        stats = px.admin_get("/stats")[1].decode()
        assert "cluster.outbound|80||retry-service.upstream_rq_pending_overflow: 8" in stats
        px.stop()
    finally:
        pods.stop()
