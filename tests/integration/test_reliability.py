"""Issue 9's process-level faults, against the real proxy: breaker units of a SIGKILLed worker
come back, taken ports stop the proxy in one line, the descriptor limit is raised, and
`--max-connections` and EMFILE close (or defer) new connections and recover by themselves."""
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from harness import REPO, Client, Pods, Proxy, free_port, get, write_config

CLUSTER = "outbound|80||slow-service"


def slow_mesh(port: int, dr: str = "") -> str:
    return f"""
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: slow}}
spec:
  hosts: [slow-service]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {port}}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: slow}}
spec:
  hosts: [slow-service]
  http:
  - route: [{{destination: {{host: slow-service}}}}]
    timeout: 60s
    retries: {{attempts: 0}}
{dr}"""


MAX_CONNECTIONS_4 = """---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: slow}
spec:
  host: slow-service
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 4}
"""


@pytest.fixture(scope="module")
def slow_pod():
    pods = Pods([("slow", free_port(), "slow")])
    yield pods
    pods.stop()


def stats(px) -> dict:
    out = {}
    for line in px.admin_get("/stats")[1].decode().splitlines():
        name, _, value = line.rpartition(": ")
        if value.isdigit():
            out[name] = int(value)
    return out


def gauges(px) -> tuple:
    s = stats(px)
    return tuple(s[f"cluster.{CLUSTER}.{g}"] for g in
                 ("upstream_cx_active", "upstream_rq_pending_active", "upstream_rq_active"))


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _worker_pids(px):
    return [w["pid"] for w in px.info()["workers"]]


# --- 1. breaker capacity survives worker death -----------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_units_of_a_sigkilled_worker_come_back(tmp_path, slow_pod, workers):
    """The issue's scenario: maxConnections 4, a slow backend, a worker SIGKILLed while it holds
    requests. After the restart nothing is held and requests are served, not 503 UO for good."""
    px = Proxy([write_config(str(tmp_path), slow_mesh(slow_pod.port("slow"), MAX_CONNECTIONS_4))],
               workers=workers, extra=["--no-access-log"])
    clients = []
    try:
        def hold():  # a request the backend answers only after the worker is dead
            c = Client(px.port, timeout=30)
            clients.append(c)
            c.send(b"GET /delay/20000 HTTP/1.1\r\nHost: slow-service\r\n\r\n")

        for _ in range(6):
            hold()
        # 4 connections upstream, the other requests pending for one of them
        wait_for(lambda: gauges(px)[0] == 4 and gauges(px)[2] >= 4, what="4 connections held")
        before = _worker_pids(px)
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: px.info()["workers"][0]["restarts"] >= 1 and all(
            w["ready"] and w["pid"] not in before for w in px.info()["workers"]),
            what="the workers' restart")
        # nothing is in flight any more (the dead workers' clients were reset)
        assert gauges(px) == (0, 0, 0)
        assert stats(px)[f"listener.127.0.0.1_{px.port}.downstream_cx_active"] == 0
        # and the whole capacity is there: 4 concurrent requests, all served
        results = []

        def call():
            results.append(get(px.port, "/delay/300", host="slow-service").status)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert results == [200] * 4
        # requests done: no request gauge held; the 4 connections stay pooled (idle connections
        # count in upstream_cx_active, as in Envoy) and are reused, not over the limit
        wait_for(lambda: gauges(px)[1:] == (0, 0), what="request gauges back to 0")
        assert gauges(px)[0] <= 4
        err = px.stop()
        assert "held circuit-breaker units; returned: outbound|80||slow-service (" in err, err
    finally:
        for c in clients:
            c.close()
        px.stop()


# --- 2. start-up failures: one line, exit 1 --------------------------------------------------

def _run(tmp_path, slow_pod, listen, admin, prometheus="off", timeout=30, code=None):
    path = write_config(str(tmp_path), slow_mesh(slow_pod.port("slow")))
    args = ["--config", path, "--listen", listen, "--admin", admin, "--prometheus", prometheus,
            "--workers", "2", "--no-access-log"]
    if code is None:
        cmd = [sys.executable, "-m", "meshcore", "run"] + args
    else:
        cmd = [sys.executable, "-c", code, "run"] + args
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def held_port():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


@pytest.mark.parametrize("which", ["listen", "admin", "prometheus"])
def test_a_taken_port_is_one_line_and_exit_1(tmp_path, slow_pod, held_port, which):
    addr = {w: f"127.0.0.1:{free_port()}" for w in ("listen", "admin", "prometheus")}
    addr[which] = f"127.0.0.1:{held_port}"
    proc = _run(tmp_path, slow_pod, addr["listen"], addr["admin"], addr["prometheus"])
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"meshcore: cannot listen on 127.0.0.1:{held_port}: address already in use\n"
    assert proc.stdout == ""


def test_a_port_held_with_so_reuseport_is_taken_too(tmp_path, slow_pod):
    """Another process's SO_REUSEPORT listener would silently share the port with the workers'."""
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = _run(tmp_path, slow_pod, f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 1
    assert proc.stderr == f"meshcore: cannot listen on 127.0.0.1:{port}: address already in use\n"


# The probe before start passed, yet the worker's own bind fails (the port was taken in between):
# the worker says so over its pipe, the supervisor stops: one line, exit 1, no restart loop.
_NO_PROBE = ("import sys, meshcore.supervisor as s; s.probe = lambda address: None; "
             "from meshcore.cli import main; sys.exit(main(sys.argv[1:]))")


def test_a_worker_that_cannot_bind_stops_the_proxy_in_one_line(tmp_path, slow_pod, held_port):
    started = time.monotonic()
    proc = _run(tmp_path, slow_pod, f"127.0.0.1:{held_port}", f"127.0.0.1:{free_port()}",
                code=_NO_PROBE)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"meshcore: cannot listen on 127.0.0.1:{held_port}: address already in use\n"
    assert time.monotonic() - started < 25  # it stopped; a restart loop would run into the timeout


def test_admin_taken_after_the_probe_is_one_line_too(tmp_path, slow_pod, held_port):
    proc = _run(tmp_path, slow_pod, f"127.0.0.1:{free_port()}", f"127.0.0.1:{held_port}",
                code=_NO_PROBE)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"meshcore: cannot listen on 127.0.0.1:{held_port}: address already in use\n"


def _limits(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no Max open files line")


def test_soft_descriptor_limit_is_raised_to_the_hard_limit(tmp_path, slow_pod, monkeypatch):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 512 and hard != resource.RLIM_INFINITY:
        pytest.skip(f"hard RLIMIT_NOFILE {hard} leaves no room to test")
    target = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    # the proxy inherits soft 256 / hard `target`: a low `ulimit -n` with room above it
    real_popen = subprocess.Popen

    def popen(*a, **kw):
        kw["preexec_fn"] = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, target))
        return real_popen(*a, **kw)

    monkeypatch.setattr(subprocess, "Popen", popen)
    px = Proxy([write_config(str(tmp_path), slow_mesh(slow_pod.port("slow")))], workers=1,
               extra=["--no-access-log"])
    monkeypatch.undo()
    try:
        assert _limits(px.proc.pid) == (target, target)
        assert _limits(_worker_pids(px)[0]) == (target, target)
    finally:
        px.stop()


# --- --max-connections and EMFILE ---------------------------------------------------------------

def overflow_stat(px) -> int:
    return stats(px)[f"listener.127.0.0.1_{px.port}.downstream_global_cx_overflow"]


def test_max_connections_closes_new_connections_at_once_and_counts_them(tmp_path, slow_pod):
    px = Proxy([write_config(str(tmp_path), slow_mesh(slow_pod.port("slow")))], workers=1,
               extra=["--no-access-log", "--max-connections", "3"])
    open_ = []
    try:
        for _ in range(3):
            c = Client(px.port)
            assert c.request(host="slow-service").status == 200
            open_.append(c)
        assert overflow_stat(px) == 0
        extra = [Client(px.port) for _ in range(2)]
        for c in extra:  # closed at once, before any request
            assert c.is_closed(wait=5)
            c.close()
        wait_for(lambda: overflow_stat(px) == 2, what="the overflow stat")
        prom = px.admin_get("/stats/prometheus")[1].decode()
        assert re.search(r'^envoy_listener_downstream_global_cx_overflow\{envoy_listener_address='
                         rf'"127\.0\.0\.1_{px.port}"\}} 2$', prom, re.M), prom
        # the connections already open are served as before
        for c in open_:
            assert c.request(host="slow-service").status == 200
        # one goes away: a new connection is served again
        open_.pop().close()
        c = wait_for(lambda: _served(px), what="a new connection served")
        c.close()
    finally:
        for c in open_:
            c.close()
        px.stop()


def _served(px):
    try:
        c = Client(px.port, timeout=2)
        if c.request(host="slow-service").status == 200:
            return c
        c.close()
    except OSError:
        pass
    except EOFError:
        pass
    return None


def test_out_of_descriptors_backs_off_and_recovers_by_itself(tmp_path, slow_pod, monkeypatch):
    """With RLIMIT_NOFILE 96 (soft = hard, so it cannot be raised) a worker runs out of descriptors
    at about 50 connections: it stops accepting for a moment, keeps serving the connections it
    has, counts the refusals, and accepts again once descriptors are free."""
    limit = 96
    real_popen = subprocess.Popen

    def popen(*a, **kw):
        kw["preexec_fn"] = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        return real_popen(*a, **kw)

    monkeypatch.setattr(subprocess, "Popen", popen)
    px = Proxy([write_config(str(tmp_path), slow_mesh(slow_pod.port("slow")))], workers=1,
               extra=["--no-access-log"])
    monkeypatch.undo()
    flood = []
    try:
        first = Client(px.port)
        assert first.request(host="slow-service").status == 200  # its upstream connection pools
        for _ in range(limit + 20):  # more than the worker can have descriptors for
            flood.append(socket.create_connection(("127.0.0.1", px.port), timeout=5))
        wait_for(lambda: overflow_stat(px) > 0, what="the worker to run out of descriptors")
        # the connection it already has is still served (on its pooled upstream connection)
        assert first.request(host="slow-service").status == 200
        for s in flood:
            s.close()
        flood.clear()
        # by itself, without any signal or restart: new connections are accepted and served
        c = wait_for(lambda: _served(px), timeout=20, what="recovery after EMFILE")
        c.close()
        assert px.info()["workers"][0]["restarts"] == 0
        first.close()
    finally:
        for s in flood:
            s.close()
        px.stop()


# --- item 12: a fault delay is flagged DI in the access log --------------------------------------

def test_fault_delay_is_flagged_di_in_the_access_log(tmp_path, slow_pod):
    mesh = slow_mesh(slow_pod.port("slow")).replace(
        "  - route: [{destination: {host: slow-service}}]\n",
        "  - route: [{destination: {host: slow-service}}]\n"
        "    fault: {delay: {fixedDelay: 50ms, percentage: {value: 100}}}\n")
    log = str(tmp_path / "access.log")
    px = Proxy([write_config(str(tmp_path), mesh)], workers=1, log_path=log)
    try:
        assert get(px.port, "/status/200", host="slow-service").status == 200
        assert get(px.port, "/status/503", host="slow-service").status == 503
    finally:
        px.stop()
    with open(log) as f:
        lines = [l for l in f.read().splitlines() if '"GET /status/' in l]
    assert len(lines) == 2, lines
    for line in lines:
        status, flags = line.split('" ', 1)[1].split()[:2]
        assert flags == "DI", line
