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
RATINGS_VIP = "10.96.0.21"

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
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ratings}}
spec:
  hosts: [ratings.default.svc.cluster.local]
  addresses: [{ratings_vip}]
  ports: [{{number: 80, name: http, targetPort: 8080}}]
  resolution: STATIC
  endpoints:
  - {{address: {v1}, labels: {{version: v1}}}}
  - {{address: {v2}, labels: {{version: v2}}}}
  - {{address: {dead}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: ratings}}
spec:
  host: ratings
  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings}}
spec:
  hosts: [ratings]
  http:
  - route:
    - {{destination: {{host: ratings, subset: v1}}, weight: 50}}
    - {{destination: {{host: ratings, subset: v2}}, weight: 50}}
    retries: {{attempts: 3, retryOn: connect-failure}}
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
        dead = lab.add_pod("dead")  # an address where nothing listens: connections refused
        for server in (v1, v2):
            lab.spawn(server, [PYTHON, TOOLS, "http-server", 8080, server.name])
        with open(f"{config_dir}/mesh.yaml", "w") as f:
            f.write(CONFIG.format(vip=VIP, v1=v1.ip, v2=v2.ip, ratings_vip=RATINGS_VIP,
                                  dead=dead.ip))
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


def test_a_weighted_split_with_retries_on_a_failing_pod_behind_a_vip(pod):
    lab, client, _, _ = pod
    answers = [get(lab, client, f"http://{RATINGS_VIP}/", "Host:ratings") for _ in range(16)]
    # every request answered, by both subsets (50/50), though v2's second pod refuses connections
    assert all(a.startswith("200 reviews-v") for a in answers), answers
    assert {a.split()[1] for a in answers} == {"reviews-v1", "reviews-v2"}
    stats = get(lab, client, "http://127.0.0.1:15000/stats?filter=ratings", user=PROXY_UID)
    retried = [line for line in stats.splitlines()
               if line.startswith("cluster.outbound|80|v2|ratings.default.svc.cluster.local"
                                  ".upstream_rq_retry:")]
    assert retried and int(retried[0].split(": ")[1]) >= 1, stats
