"""The sidecar data path end to end, in network namespaces: two pods each with `meshcore iptables`
and `meshcore run --sidecar` (uid 1337), plus a database pod without one. What a plain
application's connection becomes is decided by its original destination, as Istio's Envoy does:

* HTTP to a service address: routed by the port's table, then captured again by the destination
  pod's sidecar and delivered inbound to its app (`inbound|PORT||`);
* TCP to a TCP service's address: a byte tunnel to the service's endpoint (tcp_proxy), with an
  access-log line in Istio's format;
* anything else: PassthroughCluster to the original destination (TCP, or HTTP on a port some
  service declares as HTTP), then InboundPassthroughCluster on the other side, whose undeclared
  port is sniffed (HTTP -> parsed and routed, anything else -> tunnelled);
* REGISTRY_ONLY: unknown TCP destinations are closed, unknown HTTP hosts get 502.
"""
from __future__ import annotations

import shutil
import time

import pytest

from netns import PYTHON, TOOLS, Lab, shared_tempdir, unavailable

REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
PROXY_UID = 1337
APP_UID = 1000
WEB_VIP = "10.96.0.40"
DB_VIP = "10.96.0.30"
DB_HOST = "db.default.svc.cluster.local"

CONFIG = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web}}
spec:
  hosts: [web.default.svc.cluster.local]
  addresses: [{web_vip}]
  ports: [{{number: 80, name: http, targetPort: 8080}}]
  resolution: STATIC
  workloadSelector: {{labels: {{app: web}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: web-1}}
spec:
  address: {web}
  labels: {{app: web}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db}}
spec:
  hosts: [{db_host}]
  addresses: [{db_vip}]
  ports: [{{number: 5432, name: tcp-postgres, protocol: TCP}}]
  resolution: STATIC
  endpoints: [{{address: {db}}}]
"""


def get(lab, pod, url, *headers, user=APP_UID) -> str:
    return lab.run(pod, [PYTHON, TOOLS, "get", url, *headers], user=user).stdout


def send(lab, pod, host, port, text, user=APP_UID, check=True) -> str:
    return lab.run(pod, [PYTHON, TOOLS, "send", host, port, text], user=user, check=check).stdout


def stats(lab, pod, text) -> str:
    return get(lab, pod, f"http://127.0.0.1:15000/stats?filter={text}", user=PROXY_UID)


def sidecar(lab, pod, config_dir, labels, *extra):
    lab.run(pod, [PYTHON, "-m", "meshcore", "iptables"])
    proxy = lab.spawn(pod, [PYTHON, "-m", "meshcore", "run", "--sidecar", "--config", config_dir,
                            "--workers", "1", "--prometheus", "off", "--labels", labels, *extra],
                      user=PROXY_UID, ready=None)
    lab.wait_http(pod, "http://127.0.0.1:15021/healthz/ready", process=proxy)
    return proxy


@pytest.fixture(scope="module")
def mesh():
    config_dir = shared_tempdir()
    with Lab() as lab:
        client = lab.add_pod("client")
        web = lab.add_pod("web")
        db = lab.add_pod("db")
        lab.spawn(web, [PYTHON, TOOLS, "http-server", 8080, "web"])
        lab.spawn(web, [PYTHON, TOOLS, "http-server", 9090, "web-9090"])
        lab.spawn(web, [PYTHON, TOOLS, "echo", 7000, "web-7000"])
        lab.spawn(db, [PYTHON, TOOLS, "echo", 5432, "db"])
        lab.spawn(db, [PYTHON, TOOLS, "echo", 7777, "db-7777"])
        lab.spawn(db, [PYTHON, TOOLS, "http-server", 80, "db-80"])
        with open(f"{config_dir}/mesh.yaml", "w") as f:
            f.write(CONFIG.format(web_vip=WEB_VIP, web=web.ip, db_vip=DB_VIP, db=db.ip,
                                  db_host=DB_HOST))
        proxies = {
            "client": sidecar(lab, client, config_dir, "app=client"),
            "web": sidecar(lab, web, config_dir, "app=web",
                           "--outbound-traffic-policy", "REGISTRY_ONLY"),
        }
        yield lab, client, web, db, proxies
    shutil.rmtree(config_dir, ignore_errors=True)


def test_http_to_a_service_address_crosses_both_sidecars(mesh):
    lab, client, web, _, _ = mesh
    assert get(lab, client, f"http://{WEB_VIP}/", "Host:web") == "200 web web\n"
    # outbound in the client's sidecar, by the service's route; inbound in web's, to its app
    assert ("cluster.outbound|80||web.default.svc.cluster.local.upstream_rq_2xx: 1"
            in stats(lab, client, "upstream_rq_2xx"))
    assert "cluster.inbound|8080||.upstream_rq_2xx: 1" in stats(lab, web, "upstream_rq_2xx")


def test_tcp_to_a_tcp_service_address_is_tunnelled_to_its_endpoint(mesh):
    lab, client, _, _, proxies = mesh
    # the echo server answers once the client half-closed: the half-close crossed the tunnel
    assert send(lab, client, DB_VIP, 5432, "hello") == "db hello"
    counters = stats(lab, client, f"outbound|5432||{DB_HOST}.upstream_cx")
    assert f"cluster.outbound|5432||{DB_HOST}.upstream_cx_total: 1" in counters
    assert f"cluster.outbound|5432||{DB_HOST}.upstream_cx_rx_bytes_total: 8" in counters
    assert f"cluster.outbound|5432||{DB_HOST}.upstream_cx_tx_bytes_total: 5" in counters
    # Istio's text access log, TCP fields: "- - -", bytes received and sent, the cluster
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [line for line in proxies["client"].lines if f"outbound|5432||{DB_HOST}" in line]
        if lines:
            break
        time.sleep(0.1)
    assert lines, "".join(proxies["client"].lines[-5:])
    fields = lines[0].split()
    assert '"- - -" 0 - - - "-" 5 8' in lines[0], lines[0]
    assert f'"{mesh[3].ip}:5432"' in fields and f"{DB_VIP}:5432" in fields


def test_unknown_destinations_pass_through_and_are_sniffed_inbound(mesh):
    lab, client, web, _, _ = mesh
    # TCP to a port nobody declares: PassthroughCluster out, InboundPassthroughCluster in (the
    # first bytes are not HTTP: tunnelled to the app)
    assert send(lab, client, web.ip, 7000, "ping") == "web-7000 ping"
    # HTTP to an undeclared port: a byte stream on the way out, sniffed as HTTP on the way in
    assert get(lab, client, f"http://{web.ip}:9090/") == f"200 web-9090 {web.ip}:9090\n"
    out = stats(lab, client, "PassthroughCluster.upstream_cx_total")
    assert "cluster.PassthroughCluster.upstream_cx_total: 2" in out
    inbound = stats(lab, web, "InboundPassthroughCluster.upstream")
    assert "cluster.InboundPassthroughCluster.upstream_cx_total: 2" in inbound
    assert "cluster.InboundPassthroughCluster.upstream_rq_2xx: 1" in inbound


def test_an_unknown_host_on_an_http_port_goes_to_its_original_destination(mesh):
    lab, client, _, db, _ = mesh
    # port 80 has an HTTP table (web's); this Host is in none of it: allow_any
    assert get(lab, client, f"http://{db.ip}/", "Host:elsewhere") == "200 db-80 elsewhere\n"
    assert ("cluster.PassthroughCluster.upstream_rq_2xx: 1"
            in stats(lab, client, "PassthroughCluster.upstream_rq_2xx"))


def test_registry_only_closes_unknown_tcp_and_answers_502_to_unknown_http(mesh):
    lab, _, web, db, _ = mesh
    # web's sidecar runs with REGISTRY_ONLY: db's pod address is in no service
    # (closed at once: a reset or an empty answer, as the client's unread bytes decide)
    assert send(lab, web, db.ip, 7777, "ping", check=False) == ""
    assert "cluster.BlackHoleCluster.upstream_cx_none_healthy: 1" in stats(
        lab, web, "BlackHoleCluster.upstream_cx_none_healthy")
    assert get(lab, web, f"http://{db.ip}/", "Host:elsewhere") == "502 "
    # a registered TCP service is still reached
    assert send(lab, web, DB_VIP, 5432, "hi") == "db hi"
