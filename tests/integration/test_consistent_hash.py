"""Sticky sessions over the seed's v1 pods (2 workers): header and cookie consistent hashing."""
import collections
import re

import pytest

from harness import Client, Proxy, get, write_config

V1 = ("myweb-v1-a", "myweb-v1-b", "myweb-v1-c")


def mesh(pods, consistent_hash: str) -> str:
    eps = "\n".join(f"  - {{address: 127.0.0.1, ports: {{http: {pods.port(n)}}}, labels: {{version: v1}}}}"
                    for n in V1)
    return f"""
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: myweb}}
spec:
  hosts: [myweb-service]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{eps}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: istio-lb}}
spec:
  hosts: [myweb-service]
  http:
  - route:
    - destination: {{host: myweb-service, subset: v1}}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {{name: istio-lb}}
spec:
  host: myweb-service
  trafficPolicy:
    loadBalancer:
      consistentHash: {consistent_hash}
  subsets:
  - name: v1
    labels: {{version: v1}}
"""


@pytest.fixture
def header_proxy(tmp_path, pods):
    px = Proxy([write_config(str(tmp_path), mesh(pods, "{httpHeaderName: User}"))], workers=2,
               extra=["--no-access-log"])
    yield px
    px.stop()


def test_one_user_always_lands_on_one_pod(header_proxy):
    for user in ("tomas", "jana", "petr"):
        # new connections each time, so both workers answer: the choice is shared, not per worker
        seen = {get(header_proxy.port, headers=[("User", user)]).header("x-pod") for _ in range(12)}
        assert len(seen) == 1, (user, seen)


def test_thirty_users_spread_over_all_pods_and_no_header_spreads(header_proxy):
    by_user = {get(header_proxy.port, headers=[("User", f"user-{i}")]).header("x-pod") for i in range(30)}
    assert by_user == set(V1)
    c = Client(header_proxy.port)
    no_header = collections.Counter(c.request().header("x-pod") for _ in range(60))
    c.close()
    assert set(no_header) == set(V1)  # without the key Envoy hashes a random value


def test_cookie_with_ttl_is_set_then_sticks(tmp_path, pods):
    px = Proxy([write_config(str(tmp_path), mesh(pods, "{httpCookie: {name: session, path: /, ttl: 60s}}"))],
               workers=2, extra=["--no-access-log"])
    try:
        first = get(px.port)
        cookie = first.header("set-cookie")
        m = re.fullmatch(r'session="([0-9a-f]{16})"; Max-Age=60; Path=/; HttpOnly', cookie or "")
        assert m, cookie
        value = m.group(1)
        seen = {get(px.port, headers=[("Cookie", f"session={value}")]).header("x-pod") for _ in range(12)}
        assert len(seen) == 1
        again = get(px.port, headers=[("Cookie", f"session={value}")])
        assert again.header("set-cookie") is None  # the client has it: nothing new is set
    finally:
        px.stop()
