"""meshcore as a pod's sidecar in network namespaces: `meshcore iptables` in a client pod,
`meshcore run --sidecar` as uid 1337 in it, backends in server pods. A plain client's request to a
Service VIP is captured, routed by its VirtualService and sent on to a pod; the proxy's own
upstream connection is not captured again (no loop)."""
from __future__ import annotations

import shutil

import pytest

from netns import PYTHON, TOOLS, Lab, shared_tempdir, unavailable

REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
PROXY_UID = 1337
APP_UID = 1000
VIP = "10.96.0.20"

CONFIG = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews}}
spec:
  hosts: [reviews.default.svc.cluster.local]
  addresses: [{vip}]
  ports: [{{number: 80, name: http, targetPort: 8080}}]
  resolution: STATIC
  endpoints:
  - {{address: {v1}, labels: {{version: v1}}}}
  - {{address: {v2}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  http:
  - route: [{{destination: {{host: reviews, subset: v2}}}}]
"""


def get(lab, pod, url, *headers, user=APP_UID) -> str:
    return lab.run(pod, [PYTHON, TOOLS, "get", url, *headers], user=user).stdout


@pytest.fixture
def pod():
    config_dir = shared_tempdir()
    with Lab() as lab:
        client = lab.add_pod("client")
        v1 = lab.add_pod("reviews-v1")
        v2 = lab.add_pod("reviews-v2")
        for server in (v1, v2):
            lab.spawn(server, [PYTHON, TOOLS, "http-server", 8080, server.name])
        with open(f"{config_dir}/mesh.yaml", "w") as f:
            f.write(CONFIG.format(vip=VIP, v1=v1.ip, v2=v2.ip))
        lab.run(client, [PYTHON, "-m", "meshcore", "iptables"])
        proxy = lab.spawn(client, [PYTHON, "-m", "meshcore", "run", "--sidecar", "--config",
                                   config_dir, "--workers", "1", "--prometheus", "off"],
                          user=PROXY_UID, ready=None)
        lab.wait_http(client, "http://127.0.0.1:15021/healthz/ready", process=proxy)
        yield lab, client, v1, v2
    shutil.rmtree(config_dir, ignore_errors=True)


def test_a_captured_request_to_a_service_vip_follows_its_virtual_service(pod):
    lab, client, _, v2 = pod
    # the application knows nothing of the proxy: it calls the Service's address
    for _ in range(3):
        assert get(lab, client, f"http://{VIP}/", "Host:reviews") == "200 reviews-v2 reviews\n"
    # the route and the subset did it: counted on the v2 cluster in the proxy's stats
    stats = get(lab, client, "http://127.0.0.1:15000/stats?filter=upstream_rq_2xx", user=PROXY_UID)
    assert "cluster.outbound|80|v2|reviews.default.svc.cluster.local.upstream_rq_2xx: 3" in stats
    assert "cluster.outbound|80|v1|reviews.default.svc.cluster.local.upstream_rq_2xx: 0" in stats


def test_the_readiness_port_and_the_proxy_ports_stay_uncaptured(pod):
    lab, client, _, _ = pod
    # the app reaching the sidecar's own ports over loopback is not redirected to itself
    assert get(lab, client, "http://127.0.0.1:15021/healthz/ready").startswith("200 ")
    assert get(lab, client, "http://127.0.0.1:15000/ready").startswith("200 LIVE")
