"""Sidecar mode's config side (meshcore.config.sidecar): what a captured connection's original
destination selects (Istio's outbound listeners and per-port route tables), ALLOW_ANY vs
REGISTRY_ONLY, port protocols, Kubernetes-Service-shaped ServiceEntries, inbound ports."""
from __future__ import annotations

import os
import pickle

import pytest

from meshcore.config.compile import compile_sources
from meshcore.config.discovery import connection_endpoints
from meshcore.config.dump import snapshot_to_dict
from meshcore.config.load import read_sources
from meshcore.config.policy import DISCOVERY_ORIGINAL_DST
from meshcore.config.services import kube_protocol
from meshcore.config.sidecar import (AUTO, BLACKHOLE_CLUSTER, HTTP, INBOUND_PASSTHROUGH_CLUSTER,
                                     KIND_BLACKHOLE, KIND_HTTP, KIND_PASSTHROUGH, KIND_TCP,
                                     PASSTHROUGH_CLUSTER, TCP, http_route, inbound_target,
                                     outbound_target, sniff_http)
from meshcore.local_reply import LocalReply

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BOOKINFO = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews.bookinfo.svc.cluster.local]
  addresses: [10.96.0.20]
  ports: [{number: 9080, name: http}]
  resolution: STATIC
  workloadSelector: {labels: {app: reviews}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v1, namespace: bookinfo}
spec: {address: 10.213.0.3, labels: {app: reviews, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v2, namespace: bookinfo}
spec: {address: 10.213.0.4, labels: {app: reviews, version: v2}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: bookinfo}
spec:
  hosts: [ratings.bookinfo.svc.cluster.local]
  addresses: [10.96.0.21]
  ports: [{number: 9080, name: http-api, targetPort: 8080}]
  resolution: STATIC
  endpoints: [{address: 10.213.0.6}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mysql, namespace: bookinfo}
spec:
  hosts: [mysql.bookinfo.svc.cluster.local]
  addresses: [10.96.0.30]
  ports: [{number: 3306, name: mysql}]
  resolution: STATIC
  endpoints: [{address: 10.213.0.5}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews, subset: v2}, weight: 20}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def compile_yaml(text: str, **kw):
    kw.setdefault("sidecar", True)
    kw.setdefault("namespace", "bookinfo")
    return compile_sources({"test.yaml": text.encode()}, resolver=lambda n, p: ["10.213.9.9"], **kw)


class Head:
    def __init__(self, headers=None, method=b"GET", path=b"/"):
        self.method = method
        self.path = path
        self._h = {k.lower().encode(): v for k, v in (headers or {}).items()}

    def get(self, name):
        return self._h.get(name)


def clusters_of(route) -> list[str]:
    return [d.cluster for d in route.destinations]


@pytest.fixture(scope="module")
def bookinfo():
    return compile_yaml(BOOKINFO)


def test_a_service_vip_on_an_http_port_selects_the_ports_route_table(bookinfo):
    t = outbound_target(bookinfo, "10.96.0.20", 9080)
    assert t.kind == KIND_HTTP and t.protocol == HTTP and t.port == 9080
    assert t.listener == "0.0.0.0_9080"
    # the Host header picks among the port's services, its port ignored (Istio)
    for host in (b"reviews", b"reviews:9080", b"reviews.bookinfo", b"reviews.bookinfo.svc",
                 b"reviews.bookinfo.svc.cluster.local:9080", b"10.96.0.20", b"10.96.0.20:9080",
                 b"REVIEWS:1234"):
        r = http_route(t, host, Head())
        assert r.name == "reviews" and clusters_of(r) == [
            "outbound|9080|v1|reviews.bookinfo.svc.cluster.local",
            "outbound|9080|v2|reviews.bookinfo.svc.cluster.local"], host
    r = http_route(t, b"reviews", Head({"end-user": b"jason"}))
    assert clusters_of(r) == ["outbound|9080|v2|reviews.bookinfo.svc.cluster.local"]
    r = http_route(t, b"ratings:9080", Head())
    assert clusters_of(r) == ["outbound|9080||ratings.bookinfo.svc.cluster.local"]


def test_the_same_table_answers_for_any_address_on_that_port(bookinfo):
    """Istio's HTTP listener is 0.0.0.0:PORT: a Host header names the service, whatever the IP."""
    t = outbound_target(bookinfo, "192.0.2.7", 9080)
    assert t is outbound_target(bookinfo, "10.96.0.21", 9080)
    assert clusters_of(http_route(t, b"ratings", Head())) == [
        "outbound|9080||ratings.bookinfo.svc.cluster.local"]


def test_an_unknown_host_goes_to_the_catch_all(bookinfo):
    t = outbound_target(bookinfo, "10.96.0.20", 9080)
    r = http_route(t, b"example.com", Head())
    assert r.name == "allow_any" and clusters_of(r) == [PASSTHROUGH_CLUSTER]
    assert r.retry is None and r.timeout == 0.0
    assert http_route(t, None, Head()).name == "allow_any"
    blocked = compile_yaml(BOOKINFO, outbound_traffic_policy="REGISTRY_ONLY")
    r = http_route(outbound_target(blocked, "10.96.0.20", 9080), b"example.com", Head())
    assert r.name == "block_all" and r.destinations == ()
    reply, extra = r.direct.respond(Head())
    assert isinstance(reply, LocalReply) and reply.status == 502 and reply.body == b""


def test_a_virtual_host_whose_routes_all_miss_is_404_not_the_catch_all():
    snap = compile_yaml("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web}
spec:
  hosts: [web.bookinfo.svc.cluster.local]
  addresses: [10.96.0.40]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.213.0.8}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web]
  http: [{match: [{uri: {prefix: /api}}], route: [{destination: {host: web}}]}]
""")
    t = outbound_target(snap, "10.96.0.40", 80)
    assert http_route(t, b"web", Head(path=b"/api/x")).name == "web"
    assert http_route(t, b"web", Head(path=b"/other")) is None


def test_a_tcp_port_with_a_vip_is_proxied_to_its_cluster(bookinfo):
    t = outbound_target(bookinfo, "10.96.0.30", 3306)
    assert t.kind == KIND_TCP and t.cluster == "outbound|3306||mysql.bookinfo.svc.cluster.local"
    assert t.listener == "10.96.0.30_3306" and t.service_host == "mysql.bookinfo.svc.cluster.local"
    assert t.cluster in bookinfo.clusters
    assert [e.key for e in bookinfo.clusters[t.cluster].endpoints] == ["10.213.0.5:3306"]
    # the same port at another address is not that service
    other = outbound_target(bookinfo, "10.96.0.99", 3306)
    assert other.kind == KIND_PASSTHROUGH and other.cluster == PASSTHROUGH_CLUSTER


def test_unknown_destinations_pass_through_or_are_blackholed(bookinfo):
    t = outbound_target(bookinfo, "203.0.113.9", 443)
    assert (t.kind, t.cluster, t.listener) == (KIND_PASSTHROUGH, PASSTHROUGH_CLUSTER, "virtualOutbound")
    blocked = compile_yaml(BOOKINFO, outbound_traffic_policy="REGISTRY_ONLY")
    t = outbound_target(blocked, "203.0.113.9", 443)
    assert (t.kind, t.cluster) == (KIND_BLACKHOLE, BLACKHOLE_CLUSTER)
    # a known VIP on a port the service does not declare is unknown too
    assert outbound_target(blocked, "10.96.0.30", 3307).kind == KIND_BLACKHOLE
    # but an HTTP port's table still answers (then its catch-all says 502)
    t = outbound_target(blocked, "203.0.113.9", 9080)
    assert t.kind == KIND_HTTP and t.fallback.kind == KIND_BLACKHOLE


def test_special_clusters_exist_for_stats_and_endpoints(bookinfo):
    passthrough = bookinfo.clusters[PASSTHROUGH_CLUSTER]
    assert passthrough.discovery == DISCOVERY_ORIGINAL_DST and passthrough.per_request_endpoints
    assert passthrough.connect_timeout == 10.0
    assert [e.key for e in connection_endpoints(passthrough, "203.0.113.9", 443)] == ["203.0.113.9:443"]
    assert [e.key for e in connection_endpoints(passthrough, "fd00::9", 443)] == ["[fd00::9]:443"]
    assert bookinfo.clusters[BLACKHOLE_CLUSTER].endpoints == ()
    inbound = bookinfo.clusters[INBOUND_PASSTHROUGH_CLUSTER]
    assert [e.key for e in connection_endpoints(inbound, "127.0.0.1", 7070)] == ["127.0.0.1:7070"]


def test_explicit_mode_is_unchanged():
    snap = compile_yaml(BOOKINFO + "---" + CIDRS, sidecar=False)
    assert snap.sidecar is None
    assert PASSTHROUGH_CLUSTER not in snap.clusters
    # TCP ports are ignored (with a warning) as before; an undeclared protocol stays HTTP
    assert not any("5432" in c for c in snap.clusters)
    assert "outbound|3306||mysql.bookinfo.svc.cluster.local" in snap.clusters
    assert any("protocol TCP is not supported (HTTP/1.1 only); port ignored" in w
               for w in snap.warnings)
    with pytest.raises(ValueError, match="sidecar mode"):
        outbound_target(snap, "10.96.0.20", 9080)
    with pytest.raises(ValueError, match="sidecar mode"):
        inbound_target(snap, 9080)
    assert "sidecar" not in snapshot_to_dict(snap)


def test_explicit_mode_compiles_the_same_vhosts_and_clusters_with_and_without_sidecar():
    """Sidecar mode adds to the explicit snapshot; it changes none of what explicit mode has."""
    for folder in sorted(os.listdir(os.path.join(REPO, "examples", "seed"))):
        sources = read_sources([os.path.join(REPO, "examples", "seed", folder)])
        plain = compile_sources(sources)
        side = compile_sources(sources, sidecar=True)
        assert side.vhosts.keys() == plain.vhosts.keys(), folder
        for name, policy in plain.clusters.items():
            assert side.clusters[name] == policy, (folder, name)
        assert set(side.clusters) - set(plain.clusters) == {PASSTHROUGH_CLUSTER, BLACKHOLE_CLUSTER,
                                                            INBOUND_PASSTHROUGH_CLUSTER}
        assert side.warnings == plain.warnings


def test_the_seed_scenarios_route_by_host_on_port_80():
    snap = compile_sources(read_sources([os.path.join(REPO, "examples", "seed", "1-retry")]),
                           sidecar=True)
    t = outbound_target(snap, "10.0.0.1", 80)
    assert t.kind == KIND_HTTP
    r = http_route(t, b"retry-service", Head())
    assert r.name == "retry-vs" and clusters_of(r) == ["outbound|80||retry-service"]
    assert r.retry.num_retries == 15
    # a short ServiceEntry host answers to its Kubernetes names as well
    for host in (b"retry-service.default.svc.cluster.local", b"retry-service.default"):
        assert http_route(t, host, Head()).name == "retry-vs"
    assert clusters_of(http_route(t, b"myweb-service", Head())) == ["outbound|80||myweb-service"]


def test_per_port_tables_do_not_mix_ports():
    snap = compile_yaml("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: a}
spec:
  hosts: [a.bookinfo.svc.cluster.local]
  addresses: [10.96.1.1]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.213.0.8}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: b}
spec:
  hosts: [b.bookinfo.svc.cluster.local]
  addresses: [10.96.1.2]
  ports: [{number: 8080, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.213.0.9}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: external}
spec:
  hosts: [external.example.com]
  http: [{route: [{destination: {host: a}}]}]
""")
    t80 = outbound_target(snap, "10.96.1.1", 80)
    t8080 = outbound_target(snap, "10.96.1.2", 8080)
    assert http_route(t80, b"a", Head()).name != "allow_any"
    assert http_route(t80, b"b", Head()).name == "allow_any"
    assert http_route(t8080, b"b", Head()).name != "allow_any"
    assert http_route(t8080, b"a", Head()).name == "allow_any"
    # a VirtualService host without a service is bound to port 80 only (Istio)
    assert clusters_of(http_route(t80, b"external.example.com", Head())) == [
        "outbound|80||a.bookinfo.svc.cluster.local"]
    assert http_route(t8080, b"external.example.com", Head()).name == "allow_any"


CIDRS = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wide}
spec:
  hosts: [wide.db.internal]
  addresses: [10.1.0.0/16]
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: narrow}
spec:
  hosts: [narrow.db.internal]
  addresses: [10.1.2.0/24, "fd00:1::/64"]
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: v6}
spec:
  hosts: [cache.bookinfo.svc.cluster.local]
  addresses: ["fd00::20"]
  ports: [{number: 6379, name: redis}]
  resolution: STATIC
  endpoints: [{address: "fd00::99"}]
"""


def test_cidr_addresses_longest_prefix_first_and_original_destination():
    snap = compile_yaml(CIDRS)
    narrow = outbound_target(snap, "10.1.2.3", 5432)
    assert narrow.cluster == "outbound|5432||narrow.db.internal" and narrow.listener == "10.1.2.0/24_5432"
    wide = outbound_target(snap, "10.1.3.3", 5432)
    assert wide.cluster == "outbound|5432||wide.db.internal"
    assert outbound_target(snap, "10.2.0.1", 5432).kind == KIND_PASSTHROUGH
    assert outbound_target(snap, "10.1.2.3", 5433).kind == KIND_PASSTHROUGH
    assert outbound_target(snap, "fd00:1::7", 5432).cluster == "outbound|5432||narrow.db.internal"
    # resolution NONE: the connection's own destination, with the service's policies
    policy = snap.clusters[narrow.cluster]
    assert policy.discovery == DISCOVERY_ORIGINAL_DST
    assert [e.key for e in connection_endpoints(policy, "10.1.2.3", 5432)] == ["10.1.2.3:5432"]


def test_ipv6_vips():
    snap = compile_yaml(CIDRS)
    t = outbound_target(snap, "fd00::20", 6379)
    assert t.kind == KIND_TCP and t.cluster == "outbound|6379||cache.bookinfo.svc.cluster.local"
    assert t.listener == "fd00::20_6379"


def test_tcp_services_without_addresses_share_a_port_first_wins():
    snap = compile_yaml("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: one}
spec:
  hosts: [one.example.com]
  ports: [{number: 9000, name: tcp, protocol: TCP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: two}
spec:
  hosts: [two.example.com]
  ports: [{number: 9000, name: tcp, protocol: TCP}]
  resolution: DNS
""")
    t = outbound_target(snap, "198.51.100.1", 9000)
    assert t.kind == KIND_TCP and t.cluster == "outbound|9000||one.example.com"
    assert t.listener == "0.0.0.0_9000"
    assert any("TCP port 9000 without addresses is already taken by one.example.com" in w
               for w in snap.warnings)


def test_http_and_tcp_on_one_port_are_told_apart_by_sniffing():
    snap = compile_yaml("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web}
spec:
  hosts: [web.example.com]
  ports: [{number: 8000, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: raw}
spec:
  hosts: [raw.example.com]
  ports: [{number: 8000, name: tcp, protocol: TCP}]
  resolution: DNS
""")
    t = outbound_target(snap, "198.51.100.1", 8000)
    assert t.kind == KIND_HTTP and t.protocol == AUTO
    assert t.fallback.cluster == "outbound|8000||raw.example.com"


def test_port_protocols():
    snap = compile_yaml("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: plain}
spec:
  hosts: [plain.example.com]
  addresses: [10.96.2.1]
  ports:
  - {number: 81, name: web}
  - {number: 82, name: http-web}
  - {number: 83, name: tls, protocol: TLS}
  - {number: 84, name: h, protocol: HTTP}
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: kube}
spec:
  hosts: [kube.bookinfo.svc.cluster.local]
  addresses: [10.96.2.2]
  ports:
  - {number: 91, name: web}
  - {number: 92, name: http-web}
  - {number: 93, name: tcp-raw}
  - {number: 3306, name: db}
  - {number: 95, name: grpc-web-x}
  - {number: 96, name: udp-dns}
  resolution: STATIC
  endpoints: [{address: 10.213.0.7}]
""")
    # a ServiceEntry takes its protocol as written: undeclared is sniffed
    assert outbound_target(snap, "10.96.2.1", 81).protocol == AUTO
    assert outbound_target(snap, "10.96.2.1", 82).protocol == AUTO
    assert outbound_target(snap, "10.96.2.1", 83).kind == KIND_TCP
    assert outbound_target(snap, "10.96.2.1", 84).protocol == HTTP
    # a Kubernetes-Service-shaped one reads the port name, as Istio's Kubernetes registry
    assert outbound_target(snap, "10.96.2.2", 91).protocol == AUTO
    assert outbound_target(snap, "10.96.2.2", 92).protocol == HTTP
    assert outbound_target(snap, "10.96.2.2", 93).kind == KIND_TCP
    assert outbound_target(snap, "10.96.2.2", 3306).kind == KIND_TCP
    assert outbound_target(snap, "10.96.2.2", 95).protocol == HTTP
    assert outbound_target(snap, "10.96.2.2", 96).kind == KIND_PASSTHROUGH
    assert any("UDP is not captured" in w for w in snap.warnings)


@pytest.mark.parametrize("number, name, expected", [
    (80, "http", "HTTP"), (80, "http-web", "HTTP"), (80, "HTTP2-x", "HTTP2"), (80, "grpc", "GRPC"),
    (80, "grpc-web", "GRPC-WEB"), (80, "grpc-web-ui", "GRPC-WEB"), (80, "tcp-x", "TCP"),
    (80, "tls", "TLS"), (80, "https-admin", "HTTPS"), (80, "mongo", "MONGO"), (80, "redis", "REDIS"),
    (80, "mysql-main", "MYSQL"), (80, "udp", "UDP"), (80, "web", ""), (80, "", ""),
    (3306, "", "TCP"), (27017, "db", "TCP"), (25, "", "TCP"), (53, "", "TCP"),
    (3306, "http", "HTTP"),
])
def test_kube_protocol(number, name, expected):
    assert kube_protocol(number, name) == expected


def test_a_service_without_ports_answers_http_on_every_port_at_its_vip():
    snap = compile_yaml("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: anyport}
spec:
  hosts: [any.example.com]
  addresses: [10.96.3.1]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web}
spec:
  hosts: [web.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
""")
    t = outbound_target(snap, "10.96.3.1", 7777)
    assert t.kind == KIND_HTTP and t.protocol == AUTO
    assert http_route(t, b"any.example.com:7777", Head()).name != "allow_any"
    # on a port with its own table, that table (which includes the every-port service)
    t80 = outbound_target(snap, "10.96.3.1", 80)
    assert t80.port == 80
    assert http_route(t80, b"web.example.com", Head()).name != "allow_any"
    assert http_route(t80, b"any.example.com", Head()).name != "allow_any"
    assert outbound_target(snap, "10.96.3.2", 7777).kind == KIND_PASSTHROUGH


def test_inbound_ports_of_services_selecting_this_workload(bookinfo):
    snap = compile_yaml(BOOKINFO, labels={"app": "reviews", "version": "v1"})
    t = inbound_target(snap, 9080)
    assert (t.cluster, t.protocol, t.address, t.service_host) == (
        "inbound|9080||", HTTP, "127.0.0.1", "reviews.bookinfo.svc.cluster.local")
    policy = snap.clusters["inbound|9080||"]
    assert [e.key for e in policy.endpoints] == ["127.0.0.1:9080"]
    # Istio's inbound route: no timeout, 2 retries of a request reset before it reached the app
    assert t.route.timeout == 0.0 and t.route.retry.num_retries == 2
    assert t.route.retry.retry_on_string == "reset-before-request"
    assert clusters_of(t.route) == ["inbound|9080||"]
    # a port no service declares: InboundPassthroughCluster, sniffed
    other = inbound_target(snap, 7070)
    assert (other.cluster, other.protocol, other.address) == (INBOUND_PASSTHROUGH_CLUSTER, AUTO,
                                                               "127.0.0.1")
    # a proxy the service does not select has no declared inbound port
    assert inbound_target(bookinfo, 9080).cluster == INBOUND_PASSTHROUGH_CLUSTER
    assert "inbound|9080||" not in bookinfo.clusters


def test_inbound_uses_the_target_port_and_tcp_protocols():
    snap = compile_yaml("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: app}
spec:
  hosts: [app.bookinfo.svc.cluster.local]
  addresses: [10.96.4.1]
  ports:
  - {number: 80, name: http, targetPort: 8080}
  - {number: 5432, name: tcp-pg}
  - {number: 81, name: web}
  resolution: STATIC
  workloadSelector: {labels: {app: app}}
""", labels={"app": "app"})
    assert inbound_target(snap, 8080).cluster == "inbound|8080||"
    assert inbound_target(snap, 8080).protocol == HTTP
    assert inbound_target(snap, 80).cluster == INBOUND_PASSTHROUGH_CLUSTER
    pg = inbound_target(snap, 5432)
    assert (pg.cluster, pg.protocol, pg.route) == ("inbound|5432||", TCP, None)
    assert inbound_target(snap, 81).protocol == AUTO


def test_snapshot_with_sidecar_table_pickles_for_the_workers(bookinfo):
    copy = pickle.loads(pickle.dumps(bookinfo))
    t = outbound_target(copy, "10.96.0.20", 9080)
    assert http_route(t, b"reviews", Head()).name == "reviews"
    assert outbound_target(copy, "10.96.0.30", 3306).cluster == "outbound|3306||mysql.bookinfo.svc.cluster.local"


def test_bad_policy_is_rejected():
    with pytest.raises(ValueError, match="ALLOW_ANY, REGISTRY_ONLY"):
        compile_yaml(BOOKINFO, outbound_traffic_policy="DENY")


def test_config_dump_shows_the_listeners(bookinfo):
    dump = snapshot_to_dict(bookinfo)["sidecar"]
    matches = [(o["match"], o["kind"]) for o in dump["outbound"]]
    assert matches == [("10.96.0.30:3306", "tcp"), ("*:9080", "http"), ("*:*", "passthrough")]
    http = dump["outbound"][1]
    assert "reviews.bookinfo.svc.cluster.local" in http["domains"] and "10.96.0.21" in http["domains"]


@pytest.mark.parametrize("data, expected", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),
    (b"POST /a?b HTTP/1.0\r\n", True),
    (b"M-SEARCH * HTTP/1.1\r\n", True),
    (b"GET / HTTP/1.1\n", True),
    (b"GET / HTTP/2.0\r\n", False),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", False),
    (b"\x16\x03\x01\x02\x00\x01", False),  # TLS ClientHello
    (b"get / HTTP/1.1\r\n", False),
    (b"GET", None),
    (b"", None),
    (b"GET /long/path/without/end", None),
    (b"GET / HTTP/1.1", None),
    (b"A" * 30, False),
    (b" GET / HTTP/1.1\r\n", False),
    (b"\x00\x00\x00\x08\x04\xd2\x16/", False),  # a PostgreSQL SSLRequest
])
def test_sniff_http(data, expected):
    assert sniff_http(data) is expected
