"""Sidecar mode's per-connection decisions: what a connection the iptables rules redirected to
the proxy (run --sidecar) becomes, from its original destination.

The loop calls `connection(conn)` once per accepted connection on the outbound (15001) or
inbound (15006) listener, and `sniffed(conn, data)` with the first bytes when this asked it to
wait for them (`conn.sniff()`, a port whose protocol is undeclared). The answers, as Istio
programs Envoy (meshcore.config.sidecar):

* HTTP: `conn.target = (target, dest, snapshot, inbound)`; every request on it is then routed by
  `route()` in the target's table (the Host header picks the service among those on the port;
  the loop decides in C from the port's FastRoute table where it can), and clusters whose
  endpoints are the connection's own (PassthroughCluster, every-port services,
  InboundPassthroughCluster) use `dest`. After a config change the next request re-resolves the
  connection's target in the new snapshot (`refresh`), as Envoy applies new routes to open
  connections.
* TCP: `conn.tunnel_to(cluster handle, endpoint)`: bytes both ways (Envoy's tcp_proxy), with the
  cluster's connection limit, connect timeout and byte counters, closed after an hour idle
  (Dataplane.sweep); a TCP line in the access log.
* BlackHoleCluster (REGISTRY_ONLY, unknown destination): the connection is closed.

A connection addressed to the proxy itself (no original destination) is routed by its Host header
as in explicit mode.
"""
from __future__ import annotations

import time

from meshcore.config.discovery import connection_endpoints
from meshcore.config.sidecar import (AUTO, BLACKHOLE_CLUSTER, INBOUND_ADDRESS,
                                     INBOUND_PASSTHROUGH_CLUSTER, INBOUND_PASSTHROUGH_ROUTE,
                                     KIND_BLACKHOLE, KIND_HTTP, TCP, InboundTarget, http_fallback,
                                     http_route, inbound_target, outbound_target, sniff_http)



class CapturedConnections:
    """The sidecar half of a worker's policy (Dataplane delegates to it)."""

    def __init__(self, dataplane):
        self.dp = dataplane
        self.port_fast: dict = {}  # id(HttpTarget) -> its port's FastRoute table

    def install(self, snapshot, states: dict, routes: dict) -> None:
        """A new snapshot: the FastRoute table of every HTTP port."""
        from meshcore.io.dataplane import fast_routes_of
        table = snapshot.sidecar
        self.port_fast = {id(t): fast_routes_of(t.route_table, states, routes, t.port)
                          for t in table.by_port.values() if t.kind == KIND_HTTP} if table else {}

    # -- per connection ---------------------------------------------------------------------

    def connection(self, conn) -> None:
        orig = conn.original_destination
        if orig is None:
            return  # addressed to the proxy itself: route by the Host header (explicit mode)
        ip, port = orig
        snapshot = self.dp.snapshot
        if conn.inbound:
            target = inbound_target(snapshot, port)
            dest = (target.address, port)
            if target.protocol == TCP:
                self._tunnel(conn, target.cluster, dest)
                return
            conn.target = (target, dest, snapshot, True)
            if target.protocol == AUTO:
                conn.sniff()
            return
        target = outbound_target(snapshot, ip, port)
        if target.kind == KIND_HTTP:
            conn.target = (target, orig, snapshot, False)
            conn.set_fast_routes(self.port_fast.get(id(target)))
            if target.protocol == AUTO:
                conn.sniff()
            return
        self._tcp(conn, target, orig)

    def refresh(self, conn):
        """An HTTP connection accepted under an older snapshot: its target in the current one
        (a port no longer HTTP keeps being parsed as HTTP, routed by the catch-all / inbound
        passthrough, as the connection already speaks HTTP)."""
        target, dest, _, inbound = conn.target
        snapshot = self.dp.snapshot
        port = conn.original_destination[1]
        if inbound:
            target = inbound_target(snapshot, port)
            if target.route is None and target.cluster != INBOUND_PASSTHROUGH_CLUSTER:
                target = InboundTarget(port, INBOUND_PASSTHROUGH_CLUSTER, AUTO, INBOUND_ADDRESS)
            conn.target = (target, dest, snapshot, True)
            return conn.target
        target = outbound_target(snapshot, *conn.original_destination)
        if target.kind != KIND_HTTP:  # the connection already speaks HTTP: the catch-all
            target = http_fallback(snapshot.sidecar, port)
        conn.target = (target, dest, snapshot, False)
        conn.set_fast_routes(self.port_fast.get(id(target)))
        return conn.target

    def sniffed(self, conn, data: bytes):
        """AUTO: HTTP/1.x -> True (the loop parses it), anything else -> a tunnel to the port's
        TCP destination; None: not enough bytes to tell yet."""
        verdict = sniff_http(data)
        if verdict is None or verdict:
            return verdict
        target, dest = conn.target[:2]
        conn.target = None
        if isinstance(target, InboundTarget):
            self._tunnel(conn, target.cluster, dest)
        else:
            self._tcp(conn, target.fallback, dest)
        return False

    def _tcp(self, conn, target, dest) -> None:
        if target.kind == KIND_BLACKHOLE:
            state = self.dp.clusters.get(BLACKHOLE_CLUSTER)
            if state is not None:
                state.handle.add_stat("upstream_cx_none_healthy")
            conn.reject()
            return
        self._tunnel(conn, target.cluster, dest)

    def _tunnel(self, conn, cluster: str, dest) -> None:
        dp = self.dp
        state = dp.clusters.get(cluster)
        if state is None:
            conn.reject()
            return
        if state.policy.per_request_endpoints:
            endpoints = connection_endpoints(state.policy, *dest)
            if not endpoints:  # a DNS-per-request cluster: TCP has no Host to resolve
                state.handle.add_stat("upstream_cx_none_healthy")
                conn.reject()
                return
            state = dp._request_cluster(state, endpoints)
        ep = state.pick(None) if state.n else -1
        if ep < 0:
            state.handle.add_stat("upstream_cx_none_healthy")
            conn.reject()
            return
        conn.tunnel_to(state.handle, ep, self._log_tunnel if dp.logs_tcp else None)

    # -- per request on an HTTP connection --------------------------------------------------

    @staticmethod
    def route(connection_target, head):
        """The route for a request on a captured HTTP connection (None: 404 NR)."""
        target = connection_target[0]
        if isinstance(target, InboundTarget):
            return target.route or INBOUND_PASSTHROUGH_ROUTE
        return http_route(target, head.host, head)

    @staticmethod
    def endpoints(policy, connection_target):
        """A per-request-endpoint cluster's endpoints on a captured connection."""
        return connection_endpoints(policy, *connection_target[1])

    # -- access log -------------------------------------------------------------------------

    def _log_tunnel(self, tunnel) -> None:
        self.dp.loop.log_line(tcp_log_line(tunnel))


def tcp_log_line(tunnel) -> bytes:
    """Istio's default text format for a TCP connection (HTTP fields "-")."""
    start = tunnel.start_time
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start)) + \
        ".%03dZ" % int((start % 1) * 1000)
    host = tunnel.upstream_host
    return ('[%s] "- - -" 0 %s - - "-" %d %d %d - "-" "-" "-" "-" "%s" %s %s %s %s - -\n' % (
        stamp, tunnel.flags or "-", tunnel.bytes_received, tunnel.bytes_sent, tunnel.duration_ms,
        host.decode() if host else "-", tunnel.cluster_name.decode() if tunnel.cluster_name else "-",
        tunnel.upstream_local or "-", tunnel.downstream_local or "-",
        tunnel.downstream_remote or "-")).encode()
