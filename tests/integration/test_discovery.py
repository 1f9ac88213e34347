"""Clusters whose endpoints come from the request, forwarded by the real proxy (explicit mode).

resolution NONE (and unset), DestinationRule PASSTHROUGH and ServiceEntries without ports: the
request's authority names where to connect. Only 127.0.0.1 and `localhost` are ever used; no
external name is resolved.
"""
import pytest

from harness import Client, Proxy, free_port, write_config
from recording_upstream import Upstream

MESH = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: passthrough}}
spec:
  hosts: [localhost]           # resolution unset = NONE: the original destination
  ports: [{{number: 80, name: http, protocol: HTTP}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: every-port}}
spec:
  hosts: [anyport.test]        # no ports: the host on every port, endpoints on the request's port
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1}}]
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    up = Upstream()
    d = tmp_path_factory.mktemp("discovery")
    write_config(str(d), MESH.format())
    px = Proxy([str(d)], workers=1, extra=["--no-access-log"])
    yield px, up
    px.stop()
    up.close()


def _get(px, host, path="/"):
    c = Client(px.port)
    try:
        return c.request("GET", path, host)
    finally:
        c.close()


def test_resolution_none_forwards_to_the_authority_of_the_request(setup):
    px, up = setup
    r = _get(px, f"localhost:{up.port}", "/pass?x=1")
    assert (r.status, r.body) == (200, b"ok")
    line, headers = up.last()
    assert line == "GET /pass?x=1 HTTP/1.1"
    assert ("host", f"localhost:{up.port}") in headers


def test_service_entry_without_ports_uses_the_port_of_the_request(setup):
    px, up = setup
    r = _get(px, f"anyport.test:{up.port}", "/any")
    assert (r.status, r.body) == (200, b"ok")
    assert up.last()[0] == "GET /any HTTP/1.1"
    # nothing listens on port 80 of 127.0.0.1 for a bare host: the same cluster, another port
    r = _get(px, "anyport.test:1", "/closed")
    assert r.status == 503


def test_passthrough_load_balancer_ignores_the_listed_endpoints(tmp_path):
    up = Upstream()
    write_config(str(tmp_path), f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: listed}}
spec:
  hosts: [localhost]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {free_port()}}}}}]   # nothing listens there
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: passthrough}}
spec:
  host: localhost
  trafficPolicy: {{loadBalancer: {{simple: PASSTHROUGH}}}}
""")
    px = Proxy([str(tmp_path)], workers=1, extra=["--no-access-log"])
    try:
        r = _get(px, f"localhost:{up.port}", "/pt")
        assert (r.status, r.body) == (200, b"ok")
        assert up.last()[0] == "GET /pt HTTP/1.1"
    finally:
        px.stop()
        up.close()
