"""Sidecar mode: what a captured connection's original destination selects, compiled once.

Istio programs a sidecar's outbound side as listeners chosen by the connection's original
destination (Envoy's virtualOutbound listener on 15001 hands each connection to the listener of
its original IP:port) [S pilot/pkg/networking/core/listener.go, httproute.go]:

* An HTTP port P of any service: the wildcard listener `0.0.0.0_P` with route configuration `P`,
  one virtual host per service declaring P; its domains are the host, its Kubernetes short forms
  and the service addresses (VIPs), matched ignoring the Host header's port
  (IgnorePortInHostMatching). The Host header then picks the service. VirtualService hosts without
  a service join only port 80's table (Istio's "hack to keep consistent with previous behavior").
  A Host matching no virtual host goes to the catch-all: `allow_any` -> PassthroughCluster (the
  original destination, as HTTP) under ALLOW_ANY, `block_all` -> a direct 502 under REGISTRY_ONLY.
* A TCP port (TCP, TLS, HTTPS, MONGO, MYSQL, REDIS) of a service with addresses: a listener per
  address (`10.96.0.5_5432`, CIDRs too), tcp_proxy to `outbound|P||host`. Without addresses: the
  wildcard listener `0.0.0.0_P`, unless an HTTP port P already took it (then the TCP service is
  what non-HTTP bytes on P reach, for a port whose protocol is sniffed).
* Anything else: the virtualOutbound listener's own filter chain, TCP to PassthroughCluster
  (ALLOW_ANY) or BlackHoleCluster (REGISTRY_ONLY, the connection is closed).

Precedence, most specific first: (address, port) > (CIDR, port), longest prefix first > port >
the default. An undeclared port protocol is AUTO (Istio sniffs the first bytes: HTTP/1.x request
line -> the HTTP table, anything else -> `fallback`); `sniff_http` is that test.

Inbound (connections redirected to 15006): a port declared by a service that selects this
workload (ServiceEntry `workloadSelector` matching `--labels`, in this proxy's namespace; the port
is the service port's targetPort, else its number) is `inbound|PORT||` with that port's protocol;
any other port is InboundPassthroughCluster, AUTO. Both forward to 127.0.0.1:PORT (the app).

Pure and immutable once built; `outbound_target`, `inbound_target` and `http_route` are the
per-connection / per-request lookups the data path calls (a dict lookup or two; CIDRs only when a
service declares some).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from meshcore.config.names import DOMAIN_SUFFIX, alt_domains
from meshcore.config.policy import (ANY_PORT, DISCOVERY_ORIGINAL_DST, DISCOVERY_STATIC,
                                    ClusterPolicy, Endpoint, RoutePolicy, VirtualHostPolicy,
                                    WeightedCluster)
from meshcore.policy.retry import RETRY_ON_RESET_BEFORE_REQUEST, RetryPolicy
from meshcore.routing.actions import DirectResponse
from meshcore.routing.matchers import RequestView
from meshcore.routing.table import RouteTable

__all__ = [
    "ALLOW_ANY", "REGISTRY_ONLY", "OUTBOUND_TRAFFIC_POLICIES", "HTTP", "TCP", "AUTO",
    "KIND_HTTP", "KIND_TCP", "KIND_PASSTHROUGH", "KIND_BLACKHOLE",
    "PASSTHROUGH_CLUSTER", "BLACKHOLE_CLUSTER", "INBOUND_PASSTHROUGH_CLUSTER", "INBOUND_ADDRESS",
    "INBOUND_PASSTHROUGH_ROUTE", "sidecar_routes",
    "HttpTarget", "TcpTarget", "InboundTarget", "SidecarTable",
    "compile_sidecar", "outbound_target", "inbound_target", "http_route", "sniff_http",
    "inbound_cluster_name", "describe",
]

ALLOW_ANY = "ALLOW_ANY"
REGISTRY_ONLY = "REGISTRY_ONLY"
OUTBOUND_TRAFFIC_POLICIES = (ALLOW_ANY, REGISTRY_ONLY)

# How the data path treats a connection's bytes
HTTP = "HTTP"  # parse HTTP/1.1
TCP = "TCP"  # proxy the byte stream
AUTO = "AUTO"  # undeclared: Istio sniffs (sniff_http); HTTP/1.x -> HTTP, else TCP

# What an outbound target does
KIND_HTTP = "http"  # HttpTarget: parse HTTP, route by the Host header in the port's table
KIND_TCP = "tcp"  # TcpTarget: byte stream to a service's cluster
KIND_PASSTHROUGH = "passthrough"  # TcpTarget: byte stream to the original destination
KIND_BLACKHOLE = "blackhole"  # TcpTarget: close the connection (REGISTRY_ONLY)

# Istio's cluster, route and virtual host names (pilot/pkg/networking/util/util.go)
PASSTHROUGH_CLUSTER = "PassthroughCluster"
BLACKHOLE_CLUSTER = "BlackHoleCluster"
INBOUND_PASSTHROUGH_CLUSTER = "InboundPassthroughCluster"
ALLOW_ANY_ROUTE = "allow_any"
BLOCK_ALL_ROUTE = "block_all"
VIRTUAL_OUTBOUND = "virtualOutbound"
INBOUND_ADDRESS = "127.0.0.1"  # where inbound connections go: the application in the pod
DEFAULT_CONNECT_TIMEOUT = 10.0
# Istio >= 1.23 inbound routes: retry a request reset before it reached the app, twice, no timeout
INBOUND_RETRY = RetryPolicy(num_retries=2, retry_on=RETRY_ON_RESET_BEFORE_REQUEST,
                            host_selection_retry_max_attempts=1)
# HTTP to an inbound port no service declares: to the app on that port (InboundPassthroughCluster)
INBOUND_PASSTHROUGH_ROUTE = RoutePolicy(
    name="default", destinations=(WeightedCluster(INBOUND_PASSTHROUGH_CLUSTER, 100),),
    total_weight=100, timeout=0.0, retry=INBOUND_RETRY)


@dataclass(frozen=True, slots=True)
class TcpTarget:
    kind: str  # KIND_TCP, KIND_PASSTHROUGH or KIND_BLACKHOLE
    cluster: str  # ClusterPolicy name in Snapshot.clusters (stats, limits, endpoints)
    listener: str  # Istio's listener name: "10.96.0.5_5432", "0.0.0.0_5432", "virtualOutbound"
    service_host: str = ""  # the service's host; "" for passthrough and blackhole


@dataclass(frozen=True, slots=True)
class HttpTarget:
    kind: str  # KIND_HTTP
    port: int  # the original destination port (route configuration name `str(port)`)
    protocol: str  # HTTP, or AUTO (sniff first; not HTTP -> `fallback`)
    route_table: RouteTable  # the port's virtual hosts (find them with `http_route`)
    catch_all: RoutePolicy  # allow_any (PassthroughCluster) or block_all (direct 502)
    fallback: TcpTarget  # where non-HTTP bytes go when protocol is AUTO
    listener: str  # "0.0.0.0_<port>"


@dataclass(frozen=True, slots=True)
class InboundTarget:
    port: int  # the original destination port (the app's port)
    cluster: str  # "inbound|PORT||" or InboundPassthroughCluster
    protocol: str  # HTTP, TCP or AUTO
    address: str  # where to connect: 127.0.0.1
    service_host: str = ""  # the service declaring the port; "" when undeclared
    route: RoutePolicy | None = None  # for HTTP: Istio's inbound route (retry reset-before-request)


@dataclass(frozen=True, slots=True)
class SidecarTable:
    outbound_traffic_policy: str
    by_address: dict  # (ip text, port) -> TcpTarget
    by_cidr: tuple  # (ip_network, port, TcpTarget), longest prefix first
    by_port: dict  # port -> HttpTarget | TcpTarget
    default: TcpTarget  # passthrough or blackhole
    any_port_ips: frozenset  # addresses of services without ports: HTTP on every port
    any_port_http: HttpTarget | None  # the table for those when the port has no table of its own
    inbound: dict  # port -> InboundTarget (declared ports)
    catch_all: RoutePolicy | None = None  # allow_any / block_all (every HttpTarget's catch_all)


# ------------------------------------------------------------------------------------------------
# Per-connection lookups (pure)


def outbound_target(snapshot, orig_ip: str, orig_port: int):
    """What a connection captured to `orig_ip:orig_port` goes to: an HttpTarget (parse HTTP, then
    `http_route`), or a TcpTarget of kind tcp / passthrough / blackhole.

    `orig_ip`: the original destination as text (`socket.inet_ntop` form: `10.96.0.5`,
    `fd00::5`). Raises ValueError when the snapshot was not compiled for sidecar mode."""
    table = snapshot.sidecar
    if table is None:
        raise ValueError("the snapshot was not compiled in sidecar mode "
                         "(compile_sources(..., sidecar=True))")
    hit = table.by_address.get((orig_ip, orig_port))
    if hit is not None:
        return hit
    if table.by_cidr:
        addr = ipaddress.ip_address(orig_ip)
        for net, port, target in table.by_cidr:
            if port == orig_port and addr.version == net.version and addr in net:
                return target
    hit = table.by_port.get(orig_port)
    if orig_ip in table.any_port_ips:
        if hit is not None and hit.kind == KIND_HTTP:
            return hit
        return table.any_port_http
    if hit is not None:
        return hit
    return table.default


def inbound_target(snapshot, port: int) -> InboundTarget:
    """What a connection captured inbound to `port` (its original destination port) goes to."""
    table = snapshot.sidecar
    if table is None:
        raise ValueError("the snapshot was not compiled in sidecar mode "
                         "(compile_sources(..., sidecar=True))")
    hit = table.inbound.get(port)
    if hit is not None:
        return hit
    return InboundTarget(port, INBOUND_PASSTHROUGH_CLUSTER, AUTO, INBOUND_ADDRESS)


def http_route(target: HttpTarget, authority: bytes | None, head) -> RoutePolicy | None:
    """The route for one request on an HttpTarget: the Host header picks the virtual host in the
    port's table (its port ignored), then the first matching route, as meshcore.routing.table.
    find_route; no virtual host -> the catch-all route (allow_any / block_all); a virtual host
    whose routes all miss -> None (404 NR, as Envoy answers)."""
    table = target.route_table
    vh = table.exact.get(authority) if authority is not None else None
    if vh is None:
        vh = table.lookup(authority)
        if vh is None:
            return target.catch_all
    req = None
    for route in vh.routes:
        ms = route.matches
        if not ms:
            return route
        for m in ms:
            if req is None and m.needs_view:
                req = RequestView(head, authority)
            if m.matches(head, req):
                return route
    return None


_METHOD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-_")
_MAX_METHOD = 24  # longer than any registered method (VERSION-CONTROL is 15)


def sniff_http(data: bytes) -> bool | None:
    """Whether a connection's first bytes start an HTTP/1.x request (Envoy's http_inspector on
    HTTP/1): True, False, or None when more bytes are needed to tell. The test: a method token of
    uppercase letters, `-` or `_`, then a space; the request line must end in ` HTTP/1.x`."""
    n = len(data)
    i = 0
    while i < n and i <= _MAX_METHOD and data[i] in _METHOD_CHARS:
        i += 1
    if i == n:
        return None if i <= _MAX_METHOD else False
    if i == 0 or data[i] != 0x20:
        return False
    end = data.find(b"\r\n", i)
    if end < 0:
        end = data.find(b"\n", i)
    if end < 0:
        return None if n < 8192 else False
    line = data[:end]
    return line[-9:-1] == b" HTTP/1." and line[-1:] in (b"0", b"1")


def sidecar_routes(table: SidecarTable) -> list:
    """The routes a sidecar table adds beside the snapshot's virtual hosts (catch-alls, inbound),
    for the data path to compile handles for."""
    routes = [INBOUND_PASSTHROUGH_ROUTE]
    if table.catch_all is not None:
        routes.append(table.catch_all)
    for t in list(table.by_port.values()) + [table.any_port_http]:
        if t is not None and t.kind == KIND_HTTP:
            routes.append(t.catch_all)
    routes += [t.route for t in table.inbound.values() if t.route is not None]
    return routes


def http_fallback(table: SidecarTable, port: int) -> HttpTarget:
    """For an HTTP connection whose port a new config no longer serves as HTTP: no virtual
    host, only the catch-all (allow_any / block_all)."""
    return HttpTarget(KIND_HTTP, port, HTTP, RouteTable.from_vhosts({}), table.catch_all,
                      table.default, _listener("0.0.0.0", port))


def inbound_cluster_name(port: int) -> str:
    return f"inbound|{port}||"


# ------------------------------------------------------------------------------------------------
# Compilation (config time)


def _tcp(kind: str, cluster: str, listener: str, host: str = "") -> TcpTarget:
    return TcpTarget(kind, cluster, listener, host)


def _bracket(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _listener(address: str, port: int) -> str:
    return f"{address}_{port}"


def _special_clusters(clusters: dict) -> None:
    """Istio's PassthroughCluster, BlackHoleCluster and InboundPassthroughCluster (names are
    Envoy stats prefixes too)."""
    clusters.setdefault(PASSTHROUGH_CLUSTER, ClusterPolicy(
        name=PASSTHROUGH_CLUSTER, service_host=PASSTHROUGH_CLUSTER, port=ANY_PORT, subset="",
        endpoints=(), connect_timeout=DEFAULT_CONNECT_TIMEOUT, discovery=DISCOVERY_ORIGINAL_DST,
        per_request_endpoints=True))
    clusters.setdefault(BLACKHOLE_CLUSTER, ClusterPolicy(
        name=BLACKHOLE_CLUSTER, service_host=BLACKHOLE_CLUSTER, port=ANY_PORT, subset="",
        endpoints=(), discovery=DISCOVERY_STATIC))
    # inbound to a port no service declares: the app on 127.0.0.1:<that port>
    # (connection_endpoints(policy, INBOUND_ADDRESS, port))
    clusters.setdefault(INBOUND_PASSTHROUGH_CLUSTER, ClusterPolicy(
        name=INBOUND_PASSTHROUGH_CLUSTER, service_host=INBOUND_PASSTHROUGH_CLUSTER, port=ANY_PORT,
        subset="", endpoints=(), connect_timeout=DEFAULT_CONNECT_TIMEOUT,
        discovery=DISCOVERY_ORIGINAL_DST, per_request_endpoints=True))


def _catch_all(policy: str) -> RoutePolicy:
    if policy == REGISTRY_ONLY:
        return RoutePolicy(name=BLOCK_ALL_ROUTE, direct=DirectResponse(502, b""))
    dest = (WeightedCluster(PASSTHROUGH_CLUSTER, 100),)
    return RoutePolicy(name=ALLOW_ANY_ROUTE, destinations=dest, total_weight=100, timeout=0.0,
                       retry=None)


def _domains(host: str, svc, proxy_namespace: str) -> list[str]:
    """The names a service's virtual host answers to besides its host (Istio's
    generateVirtualHostDomains without ports): Kubernetes short forms, then its addresses."""
    alts = list(alt_domains(host, proxy_namespace))
    if svc is not None and "." not in host and not host.startswith("*"):
        kube = f"{host}.{svc.namespace}.{DOMAIN_SUFFIX}"
        alts = [kube] + [a for a in alt_domains(kube, proxy_namespace) if a != host]
    if svc is not None:
        alts += [_bracket(a) for a in svc.addresses if "/" not in a]
    return alts


def _port_table(entries: list) -> RouteTable:
    """entries: (host, [other names], VirtualHostPolicy), in priority order. A host's own name
    beats another service's alternative name; otherwise the first entry wins."""
    keys: dict[str, VirtualHostPolicy] = {}
    for host, _, vh in entries:
        keys.setdefault(host, vh)
    for _, others, vh in entries:
        for name in others:
            keys.setdefault(name, vh)
    return RouteTable.from_vhosts(keys)


def compile_sidecar(services: dict, vhosts: dict, clusters: dict, names, workload, rep,
                    outbound_traffic_policy: str = ALLOW_ANY) -> SidecarTable:
    """Build the SidecarTable; adds Istio's special clusters (PassthroughCluster,
    BlackHoleCluster, InboundPassthroughCluster, inbound|PORT||) to `clusters`. Conflicts become
    warnings on `rep`."""
    if outbound_traffic_policy not in OUTBOUND_TRAFFIC_POLICIES:
        raise ValueError(f"outbound traffic policy must be one of "
                         f"{', '.join(OUTBOUND_TRAFFIC_POLICIES)}, got {outbound_traffic_policy!r}")
    _special_clusters(clusters)
    allow_any = outbound_traffic_policy == ALLOW_ANY
    default = (_tcp(KIND_PASSTHROUGH, PASSTHROUGH_CLUSTER, VIRTUAL_OUTBOUND) if allow_any
               else _tcp(KIND_BLACKHOLE, BLACKHOLE_CLUSTER, VIRTUAL_OUTBOUND))
    catch_all = _catch_all(outbound_traffic_policy)
    proxy_ns = workload.namespace

    http_ports: dict[int, list] = {}  # port -> [(host, others, vh)]
    sniffed: set[int] = set()  # ports some service leaves undeclared
    any_port: list = []  # services without ports
    any_port_ips: set[str] = set()
    by_address: dict = {}
    by_cidr: list = []
    wildcard_tcp: dict[int, TcpTarget] = {}
    for host, svc in services.items():
        vips = [a for a in svc.addresses if "/" not in a]
        cidrs = [a for a in svc.addresses if "/" in a]
        if not svc.ports and not svc.tcp_ports:
            vh = vhosts.get(host)
            if vh is not None:
                any_port.append((host, _domains(host, svc, proxy_ns), vh))
            any_port_ips.update(vips)
            if cidrs:
                rep.warn(svc.doc.label, "spec.addresses", "CIDR addresses of a ServiceEntry "
                         "without ports are not captured by address; use its hosts")
        for number, port in svc.ports.items():
            vh = vhosts.get(f"{host}:{number}")
            if vh is None:
                continue
            http_ports.setdefault(number, []).append((host, _domains(host, svc, proxy_ns), vh))
            if not port.declared:
                sniffed.add(number)
        for number in svc.tcp_ports:
            cname = f"outbound|{number}||{host}"
            for vip in vips:
                key = (vip, number)
                if key in by_address:
                    rep.warn(svc.doc.label, "spec.addresses",
                             f"{vip}:{number} is already the address of "
                             f"{by_address[key].service_host}; this service is not reached by it")
                    continue
                by_address[key] = _tcp(KIND_TCP, cname, _listener(vip, number), host)
            for cidr in cidrs:
                net = ipaddress.ip_network(cidr)
                by_cidr.append((net, number, _tcp(KIND_TCP, cname, _listener(cidr, number), host)))
            if not vips and not cidrs:
                if number in wildcard_tcp:
                    rep.warn(svc.doc.label, "spec.ports",
                             f"TCP port {number} without addresses is already taken by "
                             f"{wildcard_tcp[number].service_host} (one service per port without "
                             "addresses, as Istio's 0.0.0.0 listener); this service is not "
                             "reached by it")
                    continue
                wildcard_tcp[number] = _tcp(KIND_TCP, cname, _listener("0.0.0.0", number), host)
    # VirtualService hosts without a service: port 80 only (Istio)
    for key, vh in vhosts.items():
        host, sep, port = key.rpartition(":")
        if sep and port == "80" and host not in services and vh.name == key \
                and not any(host == h for h, _, _ in http_ports.get(80, ())):
            http_ports.setdefault(80, []).append((host, [], vh))

    by_port: dict = {}
    for number, entries in sorted(http_ports.items()):
        fallback = wildcard_tcp.get(number, default)
        if number in wildcard_tcp:
            sniffed.add(number)  # HTTP and a TCP service share the port: tell them apart
        by_port[number] = HttpTarget(KIND_HTTP, number, AUTO if number in sniffed else HTTP,
                                     _port_table(entries + any_port), catch_all, fallback,
                                     _listener("0.0.0.0", number))
    for number, target in wildcard_tcp.items():
        by_port.setdefault(number, target)
    any_port_http = None
    if any_port:
        any_port_http = HttpTarget(KIND_HTTP, ANY_PORT, AUTO, _port_table(any_port), catch_all,
                                   default, VIRTUAL_OUTBOUND)
    by_cidr.sort(key=lambda item: item[0].prefixlen, reverse=True)

    return SidecarTable(outbound_traffic_policy, by_address, tuple(by_cidr), by_port, default,
                        frozenset(any_port_ips), any_port_http,
                        _inbound(services, clusters, workload, rep), catch_all)


def _selects(selector: dict, workload) -> bool:
    """A workloadSelector selects this proxy when every label matches (empty: every workload)."""
    return workload.has_labels(selector)


def _inbound(services: dict, clusters: dict, workload, rep) -> dict:
    inbound: dict[int, InboundTarget] = {}
    for host, svc in services.items():
        if svc.namespace != workload.namespace:
            continue
        if not any(_selects(sel, workload) for sel in svc.selectors):
            continue
        declared = [(p, HTTP if p.declared else AUTO) for p in svc.ports.values()]
        declared += [(p, TCP) for p in svc.tcp_ports.values()]
        for port, protocol in declared:
            number = port.target_port or port.number
            if number in inbound:
                continue  # the first service declaring the port names it, as Istio
            cname = inbound_cluster_name(number)
            clusters.setdefault(cname, ClusterPolicy(
                name=cname, service_host=host, port=number, subset="",
                endpoints=(Endpoint(INBOUND_ADDRESS, number, 1, (), f"{INBOUND_ADDRESS}:{number}"),),
                connect_timeout=DEFAULT_CONNECT_TIMEOUT))
            route = None
            if protocol != TCP:
                route = RoutePolicy(name="default", destinations=(WeightedCluster(cname, 100),),
                                    total_weight=100, timeout=0.0, retry=INBOUND_RETRY)
            inbound[number] = InboundTarget(number, cname, protocol, INBOUND_ADDRESS, host, route)
    return inbound


def describe(table: SidecarTable) -> dict:
    """A readable view for the admin /config_dump: the outbound listeners by original destination
    (most specific first) and the inbound ports."""
    def target(t) -> dict:
        if t.kind == KIND_HTTP:
            names = sorted({k.decode() for k in t.route_table.exact}
                           | {"*" + s.decode() for s, _, _ in t.route_table.wildcards})
            return {"listener": t.listener, "kind": t.kind, "protocol": t.protocol,
                    "route_config": str(t.port), "domains": names,
                    "catch_all": t.catch_all.name, "non_http": t.fallback.cluster}
        return {"listener": t.listener, "kind": t.kind, "cluster": t.cluster}
    outbound = [dict(target(t), match=f"{_bracket(ip)}:{port}")
                for (ip, port), t in sorted(table.by_address.items())]
    outbound += [dict(target(t), match=f"{net}:{port}") for net, port, t in table.by_cidr]
    if table.any_port_http is not None:
        outbound += [dict(target(table.any_port_http), match=f"{_bracket(ip)}:*")
                     for ip in sorted(table.any_port_ips)]
    outbound += [dict(target(t), match=f"*:{port}") for port, t in sorted(table.by_port.items())]
    outbound.append(dict(target(table.default), match="*:*"))
    inbound = [{"port": t.port, "cluster": t.cluster, "protocol": t.protocol,
                "service": t.service_host, "forward_to": f"{t.address}:{t.port}"}
               for _, t in sorted(table.inbound.items())]
    inbound.append({"port": "*", "cluster": INBOUND_PASSTHROUGH_CLUSTER, "protocol": AUTO,
                    "forward_to": f"{INBOUND_ADDRESS}:<port>"})
    return {"outbound_traffic_policy": table.outbound_traffic_policy, "outbound": outbound,
            "inbound": inbound}
