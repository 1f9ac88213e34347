"""Immutable policy compiled once from Istio config; the hot path only reads it.

A `Snapshot` is built off the hot path by `meshcore.config.compile`, validated whole, and swapped
in by one reference assignment in each worker. Nothing here is mutated after construction.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Load-balancer kinds (Envoy names). Istio's LEAST_CONN maps to LEAST_REQUEST.
LB_ROUND_ROBIN = "ROUND_ROBIN"
LB_RANDOM = "RANDOM"
LB_LEAST_REQUEST = "LEAST_REQUEST"

# Istio writes 2^32-1 for every circuit-breaker threshold it does not set: breaking disabled.
UNLIMITED = 4294967295

# How a cluster finds its endpoints (ServiceEntry `resolution`, DestinationRule PASSTHROUGH), named
# after the Envoy cluster type Istio generates (semantics.md §12.2):
DISCOVERY_STATIC = "STATIC"  # resolution STATIC: the listed IP endpoints
DISCOVERY_DNS = "STRICT_DNS"  # resolution DNS: every address of every name, re-resolved periodically
DISCOVERY_LOGICAL_DNS = "LOGICAL_DNS"  # resolution DNS_ROUND_ROBIN: the first address of one name
# resolution NONE (or unset), loadBalancer PASSTHROUGH: the original destination. In explicit
# (non-sidecar) mode that is the request's authority: host and port of its Host header.
DISCOVERY_ORIGINAL_DST = "ORIGINAL_DST"
DISCOVERY_DYNAMIC_DNS = "DYNAMIC_DNS"  # resolution DYNAMIC_DNS: the request's host, resolved per request
# Discovery kinds whose endpoints depend on the request (see meshcore.config.discovery).
PER_REQUEST_DISCOVERY = (DISCOVERY_ORIGINAL_DST, DISCOVERY_DYNAMIC_DNS)
ANY_PORT = 0  # ClusterPolicy.port of a ServiceEntry without ports: it binds its hosts on every port


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str  # IP address (or resolved name) to connect to
    port: int  # target port after Istio's precedence: endpoint ports map > targetPort > number
    weight: int  # load_balancing_weight; 0/unset becomes 1
    labels: tuple[tuple[str, str], ...]  # sorted (key, value) pairs
    key: str  # "ip:port" ("[v6]:port"): Envoy's host key for hashing and the access log
    locality: str = ""  # "region/zone/subzone" (WorkloadEntry locality), "" when unknown


@dataclass(frozen=True, slots=True)
class ClusterPolicy:
    name: str  # Envoy cluster name: outbound|<port>|<subset>|<host>
    service_host: str
    port: int  # service port number
    subset: str  # "" when none
    endpoints: tuple[Endpoint, ...]
    lb: str = LB_LEAST_REQUEST
    connect_timeout: float = 10.0  # seconds; Istio MeshConfig default
    idle_timeout: float = 3600.0  # upstream connection idle timeout, seconds (Envoy default 1 h)
    max_requests_per_connection: int = 0  # 0 = unlimited, 1 = no keep-alive
    outlier: object = None  # meshcore.upstream.outlier.OutlierPolicy; None = no detector
    limits: object = None  # meshcore.upstream.breaker.BreakerLimits; None = Istio's unlimited
    # consistentHash: the route-side key (meshcore.upstream.hashkey.HashPolicy, None = no key,
    # random hash) and the table (RingConfig); ring_config None = not a consistent-hash cluster
    hash_policy: object = None
    ring_config: object = None
    discovery: str = DISCOVERY_STATIC  # one of the DISCOVERY_* kinds above
    # True when the endpoints come from each request (original destination, dynamic DNS, a
    # ServiceEntry without ports): meshcore.config.discovery.request_endpoints derives them
    per_request_endpoints: bool = False
    # upstream TLS origination (meshcore.config.tls.ClientTlsPolicy); None = plaintext (or DISABLE)
    tls: object = None
    # loadBalancer.warmup (meshcore.upstream.balancer.SlowStart); None = no slow start
    slow_start: object = None
    # localityLbSetting / endpoint localities (meshcore.upstream.balancer.LocalityLb); None = flat
    locality_lb: object = None


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    cluster: str  # ClusterPolicy.name
    weight: int
    # What the route does to a request sent to this destination, route and destination level
    # combined in Envoy's order (meshcore.routing.actions): Rewrite (path, authority) or None;
    # HeaderEdits for the upstream request and for the response, or None.
    rewrite: object = None
    request_headers: object = None
    response_headers: object = None


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    name: str  # Envoy route name (VirtualService name, plus ".<match name>" when the match is named)
    # Compiled request matchers, OR-ed; each is AND-ed inside. Empty tuple: matches every request.
    matches: tuple = ()
    destinations: tuple[WeightedCluster, ...] = ()
    total_weight: int = 0
    timeout: float = 0.0  # route timeout in seconds; 0 = none (Istio's default)
    retry: object = None  # meshcore.policy.retry.RetryPolicy; None = no retries (attempts: 0)
    fault: object = None  # meshcore.policy.fault.FaultPolicy or None
    # (meshcore.policy.mirror.MirrorPolicy, mirror cluster name or "" for the capture sink), ...
    mirrors: tuple = ()
    # Envoy hashes with every destination's policy, folded (semantics §2.7); () = no hashing
    hash_policies: tuple = ()
    # A route answered locally (meshcore.routing.actions.Redirect / DirectResponse): no
    # destinations; `direct.respond(head)` gives the reply. None = a forwarding route.
    direct: object = None
    cors: object = None  # meshcore.routing.actions.Cors or None


@dataclass(frozen=True, slots=True)
class VirtualHostPolicy:
    name: str  # "<host>:<port>"
    routes: tuple[RoutePolicy, ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    generation: int
    config_hash: str
    # lowercase authority ("host" and "host:port") -> virtual host
    vhosts: dict[str, VirtualHostPolicy]
    clusters: dict[str, ClusterPolicy]
    warnings: tuple[str, ...] = field(default=())
    # meshcore.routing.table.RouteTable over `vhosts` (bytes keys, wildcard list), built by
    # config.compile; find_route builds and caches it when a hand-made Snapshot lacks it.
    route_table: object = None
    # (name, port) of every name resolved for resolution DNS/DNS_ROUND_ROBIN: what the supervisor
    # re-resolves every --dns-refresh-rate seconds
    dns_names: tuple = ()
    # sidecar mode (compile_sources(sidecar=True)): meshcore.config.sidecar.SidecarTable, what
    # a captured connection's original destination selects; None in explicit mode
    sidecar: object = None
