"""Supervisor behaviour: reload (good and bad), worker restart, drain on SIGTERM."""
import os
import signal
import threading
import time

import pytest

from harness import Client, Proxy, get, write_config


def one_service(port_a, port_b, route_to="a"):
    return f"""
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: svc}}
spec:
  hosts: [svc]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {port_a}}}, labels: {{pod: a}}}}
  - {{address: 127.0.0.1, ports: {{http: {port_b}}}, labels: {{pod: b}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: svc}}
spec:
  host: svc
  subsets:
  - {{name: a, labels: {{pod: a}}}}
  - {{name: b, labels: {{pod: b}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: svc}}
spec:
  hosts: [svc]
  http:
  - route:
    - destination: {{host: svc, subset: {route_to}}}
"""


@pytest.fixture
def small_proxy(tmp_path, pods):
    a, b = pods.port("myweb-v1-a"), pods.port("myweb-v2-a")
    path = write_config(str(tmp_path), one_service(a, b, "a"))
    px = Proxy([path], workers=2, extra=["--no-access-log"])
    px.config_path = path
    px.ports = (a, b)
    yield px
    px.stop()


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _all_workers_at(px, generation):
    info = px.info()
    return all(w["generation"] == generation and w["ready"] for w in info["workers"])


def test_reload_good_config_on_file_change_keeps_connections(small_proxy, pods):
    c = Client(small_proxy.port)
    assert c.request(host="svc").header("x-pod") == "myweb-v1-a"
    gen = small_proxy.info()["generation"]
    a, b = small_proxy.ports
    write_config(os.path.dirname(small_proxy.config_path), one_service(a, b, "b"))
    assert _wait_for(lambda: small_proxy.info()["generation"] == gen + 1)
    assert _wait_for(lambda: _all_workers_at(small_proxy, gen + 1))
    # the same client connection, never dropped, now routed by the new config
    assert c.request(host="svc").header("x-pod") == "myweb-v2-a"
    c.close()


def test_reload_bad_config_is_rejected_and_old_keeps_serving(small_proxy):
    gen = small_proxy.info()["generation"]
    with open(small_proxy.config_path, "a") as f:
        f.write("---\napiVersion: networking.istio.io/v1beta1\nkind: VirtualService\n"
                "metadata: {name: broken}\nspec:\n  hosts: [svc]\n  http:\n  - timeout: soon\n")
    assert _wait_for(lambda: small_proxy.info()["reloads_rejected"] >= 1)
    assert small_proxy.info()["generation"] == gen
    assert get(small_proxy.port, host="svc").header("x-pod") == "myweb-v1-a"
    small_proxy.signal(signal.SIGHUP)  # an explicit reload of the same bad file: rejected again
    assert _wait_for(lambda: small_proxy.info()["reloads_rejected"] >= 2)
    assert get(small_proxy.port, host="svc").status == 200
    err = small_proxy.stop()
    assert "config rejected" in err and "timeout" in err


def test_worker_restarted_after_kill(small_proxy):
    info = small_proxy.info()
    victim = info["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    assert _wait_for(lambda: small_proxy.info()["workers"][0]["pid"] != victim
                     and small_proxy.info()["workers"][0]["ready"])
    assert small_proxy.info()["workers"][0]["restarts"] == 1
    for _ in range(20):  # both workers serve again (new connections spread over both sockets)
        assert get(small_proxy.port, host="svc").status == 200


def test_sigterm_drains_in_flight_requests(small_proxy):
    results = []

    def slow():
        results.append(get(small_proxy.port, path="/delay/800", host="svc").status)

    threads = [threading.Thread(target=slow) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # all four are in flight
    small_proxy.signal(signal.SIGTERM)
    for t in threads:
        t.join(10)
    assert results == [200, 200, 200, 200]
    small_proxy.proc.wait(10)
    assert small_proxy.proc.returncode == 0


def test_slow_header_gets_408_and_trickling_does_not_extend_it(tmp_path, pods):
    a, b = pods.port("myweb-v1-a"), pods.port("myweb-v2-a")
    path = write_config(str(tmp_path), one_service(a, b, "a"))
    px = Proxy([path], workers=1, extra=["--no-access-log", "--request-headers-timeout", "1"])
    try:
        c = Client(px.port)
        c.send(b"GET / HTTP/1.1\r\n")
        t0 = time.monotonic()
        status = None
        while time.monotonic() - t0 < 5:
            try:
                c.send(b"X-Trickle: 1\r\n")  # a new header line every 0.3 s
            except OSError:
                break
            c.sock.settimeout(0.3)
            try:
                data = c.sock.recv(4096)
            except TimeoutError:
                continue
            status = data.split(b" ")[1] if data else None
            break
        c.close()
        # trickling went on for 5 s; the 1 s header timeout answered while it did
        assert status == b"408"
    finally:
        px.stop()
