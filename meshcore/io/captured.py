"""Sidecar mode's per-connection decisions: what a connection the iptables rules redirected to
the proxy (run --sidecar) becomes, from its original destination.

The loop calls `connection(conn)` once per accepted connection on the outbound (15001) or
inbound (15006) listener, and `sniffed(conn, data)` with the first bytes when this asked it to
wait for them (`conn.sniff()`, a port whose protocol is undeclared). The answers, as Istio
programs Envoy (meshcore.config.sidecar):

* HTTP: `conn.target = (target, dest)`; every request on it is then routed by `route()` in the
  target's table (the Host header picks the service among those on the port), and clusters whose
  endpoints are the connection's own (PassthroughCluster, every-port services,
  InboundPassthroughCluster) use `dest`.
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
from meshcore.config.sidecar import (AUTO, BLACKHOLE_CLUSTER, INBOUND_PASSTHROUGH_ROUTE,
                                     KIND_BLACKHOLE, KIND_HTTP, TCP, InboundTarget, http_route,
                                     inbound_target, outbound_target, sniff_http)



class CapturedConnections:
    """The sidecar half of a worker's policy (Dataplane delegates to it)."""

    def __init__(self, dataplane):
        self.dp = dataplane

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
            conn.target = (target, dest)
            if target.protocol == AUTO:
                conn.sniff()
            return
        target = outbound_target(snapshot, ip, port)
        if target.kind == KIND_HTTP:
            conn.target = (target, orig)
            if target.protocol == AUTO:
                conn.sniff()
            return
        self._tcp(conn, target, orig)

    def sniffed(self, conn, data: bytes):
        """AUTO: HTTP/1.x -> True (the loop parses it), anything else -> a tunnel to the port's
        TCP destination; None: not enough bytes to tell yet."""
        verdict = sniff_http(data)
        if verdict is None or verdict:
            return verdict
        target, dest = conn.target
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
        target, _ = connection_target
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
