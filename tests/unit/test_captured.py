"""The sidecar data path's per-connection decisions (meshcore.io.captured), without sockets: a
fake connection records what the policy told it (HTTP with a target, sniff, tunnel, reject)."""
from __future__ import annotations

from meshcore.config.compile import compile_sources
from meshcore.config.sidecar import (INBOUND_PASSTHROUGH_CLUSTER, KIND_HTTP, PASSTHROUGH_CLUSTER,
                                     InboundTarget)
from meshcore.io.captured import CapturedConnections, tcp_log_line

MESH = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web}
spec:
  hosts: [web.default.svc.cluster.local]
  addresses: [10.96.0.40]
  ports: [{number: 80, name: http}, {number: 81, name: other}]
  resolution: STATIC
  workloadSelector: {labels: {app: web}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web-1}
spec: {address: 10.0.0.5, labels: {app: web}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db}
spec:
  hosts: [db.default.svc.cluster.local]
  addresses: [10.96.0.30]
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.6}]
"""


class FakeConn:
    def __init__(self, orig, inbound=False):
        self.original_destination = orig
        self.inbound = inbound
        self.target = None
        self.fast = "unset"
        self.sniffing = False
        self.rejected = False

    def sniff(self):
        self.sniffing = True

    def set_fast_routes(self, routes):
        self.fast = routes

    def reject(self):
        self.rejected = True


class Recorder(CapturedConnections):
    """Tunnels are recorded instead of opened (their mechanics are the loop's)."""

    def __init__(self, dp):
        super().__init__(dp)
        self.tunnels = []

    def _tunnel(self, conn, cluster, dest):
        self.tunnels.append((cluster, dest))


class FakeDataplane:
    def __init__(self, yaml=MESH, policy="ALLOW_ANY"):
        self.snapshot = compile_sources({"mesh.yaml": yaml.encode()}, sidecar=True,
                                        labels={"app": "web"}, outbound_traffic_policy=policy)
        self.clusters = {}


def test_http_port_of_a_service_address_parses_http_with_the_ports_table():
    cc = Recorder(FakeDataplane())
    cc.port_fast = {id(cc.dp.snapshot.sidecar.by_port[80]): {b"web": "fast"}}
    conn = FakeConn(("10.96.0.40", 80))
    cc.connection(conn)
    target, dest, snapshot, inbound = conn.target
    assert (target.kind, target.port, dest, inbound) == (KIND_HTTP, 80, ("10.96.0.40", 80), False)
    assert conn.fast == {b"web": "fast"} and not conn.sniffing and not cc.tunnels


def test_an_undeclared_port_is_sniffed_then_tunnelled_when_not_http():
    cc = Recorder(FakeDataplane())
    conn = FakeConn(("10.96.0.40", 81))
    cc.connection(conn)
    assert conn.sniffing
    assert cc.sniffed(conn, b"GET / HT") is None  # not enough to tell
    assert cc.sniffed(conn, b"\x16\x03\x01\x02\x00") is False  # a TLS hello: TCP
    assert conn.target is None
    assert cc.tunnels == [(PASSTHROUGH_CLUSTER, ("10.96.0.40", 81))]


def test_an_undeclared_port_speaking_http_stays_http():
    cc = Recorder(FakeDataplane())
    conn = FakeConn(("10.96.0.40", 81))
    cc.connection(conn)
    assert cc.sniffed(conn, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n") is True
    assert conn.target[0].kind == KIND_HTTP and not cc.tunnels


def test_tcp_services_and_unknown_destinations():
    cc = Recorder(FakeDataplane())
    cc.connection(FakeConn(("10.96.0.30", 5432)))
    cc.connection(FakeConn(("192.0.2.9", 7000)))
    assert cc.tunnels == [("outbound|5432||db.default.svc.cluster.local", ("10.96.0.30", 5432)),
                          (PASSTHROUGH_CLUSTER, ("192.0.2.9", 7000))]


def test_registry_only_closes_unknown_destinations():
    cc = Recorder(FakeDataplane(policy="REGISTRY_ONLY"))
    conn = FakeConn(("192.0.2.9", 7000))
    cc.connection(conn)
    assert conn.rejected and not cc.tunnels


def test_inbound_ports():
    cc = Recorder(FakeDataplane())
    declared = FakeConn(("10.0.0.5", 80), inbound=True)
    cc.connection(declared)
    target = declared.target[0]
    assert isinstance(target, InboundTarget) and target.cluster == "inbound|80||"
    assert declared.target[1] == ("127.0.0.1", 80) and target.route is not None
    other = FakeConn(("10.0.0.5", 9999), inbound=True)
    cc.connection(other)
    assert other.sniffing and other.target[0].cluster == INBOUND_PASSTHROUGH_CLUSTER


def test_a_connection_older_than_the_config_is_routed_by_the_new_one():
    dp = FakeDataplane()
    cc = Recorder(dp)
    conn = FakeConn(("10.96.0.40", 80))
    cc.connection(conn)
    old = conn.target
    dp.snapshot = compile_sources({"mesh.yaml": MESH.encode()}, sidecar=True)
    fresh = cc.refresh(conn)
    assert fresh is conn.target and fresh[2] is dp.snapshot and fresh[0] is not old[0]
    assert fresh[0] is dp.snapshot.sidecar.by_port[80]
    # the port is no longer HTTP in the next config: the connection keeps HTTP, catch-all only
    dp.snapshot = compile_sources({"mesh.yaml": MESH.split("---")[2].encode()}, sidecar=True)
    fallback = cc.refresh(conn)[0]
    assert fallback.kind == KIND_HTTP and fallback.catch_all is dp.snapshot.sidecar.catch_all
    assert fallback.route_table.lookup(b"web") is None


class FakeTunnel:
    start_time = 1_780_000_000.25
    flags = None
    bytes_received = 5
    bytes_sent = 8
    duration_ms = 12
    upstream_host = b"10.0.0.6:5432"
    cluster_name = b"outbound|5432||db.default.svc.cluster.local"
    upstream_local = "10.0.0.2:41234"
    downstream_local = "10.96.0.30:5432"
    downstream_remote = "10.0.0.2:41230"


def test_tcp_access_log_line_in_istios_text_format():
    line = tcp_log_line(FakeTunnel()).decode()
    assert line.endswith("\n") and line.startswith("[2026-05-28T")
    assert '.250Z] "- - -" 0 - - - "-" 5 8 12 - "-" "-" "-" "-" "10.0.0.6:5432" ' \
           "outbound|5432||db.default.svc.cluster.local 10.0.0.2:41234 10.96.0.30:5432 " \
           "10.0.0.2:41230 - -\n" in line
