"""msgspec Structs for the Istio resources meshcore reads: ServiceEntry, WorkloadEntry,
VirtualService and DestinationRule (networking.istio.io v1alpha3 / v1beta1 / v1).

Rules of this module:
- Decode-time only. Nothing here is used on the request path; `meshcore.config.compile` turns these
  Structs into the frozen policy of `meshcore.config.policy`.
- Field sets follow istio/api `networking/v1alpha3/*.proto` at HEAD plus the fields Istio 1.4 still
  accepted (`mirror_percent`, `websocketUpgrade`, `appendHeaders` ..., `consecutiveErrors`, the abort
  `percent`), so any real Istio YAML decodes and every field meshcore does not implement can be
  reported by name instead of being rejected or silently dropped.
- YAML names are the protobuf JSON names (lowerCamelCase): `rename="camel"`, with explicit names where
  msgspec's camel conversion differs from protobuf's (`consecutive5xxErrors`) and for the old
  snake_case `mirror_percent`. Unknown fields are errors (`forbid_unknown_fields`).
- proto3 "unset" is modelled as `None` (messages and scalars) or an empty tuple/dict (repeated/map),
  so the compiler can tell set from unset.
- Durations are `Duration` objects, decoded from Go/Kubernetes duration strings (`15s`, `1.5s`,
  `100ms`, `1m`, `1h30m`); a bare number such as `15` is rejected.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, field

__all__ = [
    "API_VERSIONS",
    "KINDS",
    "Duration",
    "parse_duration",
    "dec_hook",
    "ObjectMeta",
    # VirtualService
    "StringMatch",
    "PortSelector",
    "Destination",
    "HeaderOperations",
    "Headers",
    "Delegate",
    "HTTPMatchRequest",
    "HTTPRouteDestination",
    "RouteDestination",
    "HTTPRedirect",
    "HTTPBody",
    "HTTPDirectResponse",
    "RegexRewrite",
    "HTTPRewrite",
    "HTTPRetry",
    "CorsPolicy",
    "Percent",
    "FaultDelay",
    "FaultAbort",
    "HTTPFaultInjection",
    "HTTPMirrorPolicy",
    "HTTPRoute",
    "L4MatchAttributes",
    "TLSMatchAttributes",
    "TCPRoute",
    "TLSRoute",
    "VirtualService",
    # DestinationRule
    "RingHash",
    "MagLev",
    "CookieAttribute",
    "HTTPCookie",
    "ConsistentHashLB",
    "LocalityDistribute",
    "LocalityFailover",
    "LocalityLoadBalancerSetting",
    "ZoneAwareLoadBalancerSetting",
    "WarmupConfiguration",
    "LoadBalancerSettings",
    "TcpKeepalive",
    "TCPSettings",
    "ConnectionKeepalive",
    "HTTPSettings",
    "ConnectionPoolSettings",
    "OutlierDetection",
    "ClientTLSSettings",
    "PortTrafficPolicy",
    "TunnelSettings",
    "ProxyProtocol",
    "RetryBudget",
    "TrafficPolicy",
    "Subset",
    "WorkloadSelectorMatch",
    "DestinationRule",
    # ServiceEntry / WorkloadEntry
    "ServicePort",
    "WorkloadSelector",
    "WorkloadEntry",
    "ServiceEntry",
    # whole documents
    "ServiceEntryResource",
    "WorkloadEntryResource",
    "VirtualServiceResource",
    "DestinationRuleResource",
    "RESOURCE_TYPES",
]

from meshcore.durations import parse_duration  # noqa: E402  (re-exported)

API_VERSIONS = (
    "networking.istio.io/v1alpha3",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1",
)
KINDS = ("ServiceEntry", "WorkloadEntry", "VirtualService", "DestinationRule")

# ------------------------------------------------------------------------------------------------
# Scalar types

UInt32 = Annotated[int, Meta(ge=0, le=4294967295)]
Int32 = Annotated[int, Meta(ge=-2147483648, le=2147483647)]
NonNegInt32 = Annotated[int, Meta(ge=0, le=2147483647)]
UInt64 = Annotated[int, Meta(ge=0, le=9223372036854775807)]  # msgspec bounds must fit int64
PortNumber = Annotated[int, Meta(ge=1, le=65535)]
PercentValue = Annotated[float, Meta(ge=0.0, le=100.0)]

class Duration:
    """A decoded duration: the original text and its value in seconds."""

    __slots__ = ("text", "seconds")

    def __init__(self, text: str):
        self.seconds = parse_duration(text)
        self.text = text

    def __eq__(self, other):
        return isinstance(other, Duration) and other.seconds == self.seconds

    def __hash__(self):
        return hash(self.seconds)

    def __repr__(self):
        return f"Duration({self.text!r})"

    def __reduce__(self):
        return (Duration, (self.text,))


def dec_hook(type_, obj):
    """msgspec `dec_hook` for the custom types of this module."""
    if type_ is Duration:
        if isinstance(obj, Duration):
            return obj
        if not isinstance(obj, str):
            raise TypeError(f"expected duration string, got {type(obj).__name__}")
        return Duration(obj)
    raise NotImplementedError(f"unsupported type {type_!r}")


class _Spec(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    rename="camel",
    forbid_unknown_fields=True,
    omit_defaults=True,
):
    """Base of every Istio message."""


# ------------------------------------------------------------------------------------------------
# Kubernetes object metadata (every ObjectMeta field, so `kubectl get -o yaml` output decodes)


class ObjectMeta(_Spec, kw_only=True):
    name: str | None = None
    generate_name: str | None = None
    namespace: str | None = None
    self_link: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: Any = None
    deletion_timestamp: Any = None
    deletion_grace_period_seconds: int | None = None
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    owner_references: tuple[Any, ...] = ()
    finalizers: tuple[str, ...] = ()
    managed_fields: tuple[Any, ...] = ()
    cluster_name: str | None = None


# ------------------------------------------------------------------------------------------------
# VirtualService (networking/v1alpha3/virtual_service.proto)


class StringMatch(_Spec, kw_only=True):
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None


class PortSelector(_Spec, kw_only=True):
    number: UInt32 | None = None


class Destination(_Spec, kw_only=True):
    host: str
    subset: str | None = None
    port: PortSelector | None = None


class HeaderOperations(_Spec, kw_only=True):
    set: dict[str, str] = {}
    add: dict[str, str] = {}
    remove: tuple[str, ...] = ()


class Headers(_Spec, kw_only=True):
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


class Delegate(_Spec, kw_only=True):
    name: str | None = None
    namespace: str | None = None


class HTTPMatchRequest(_Spec, kw_only=True):
    name: str | None = None
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: dict[str, StringMatch] = {}
    port: UInt32 | None = None
    source_labels: dict[str, str] = {}
    gateways: tuple[str, ...] = ()
    query_params: dict[str, StringMatch] = {}
    ignore_uri_case: bool | None = None
    without_headers: dict[str, StringMatch] = {}
    source_namespace: str | None = None
    stat_prefix: str | None = None


class HTTPRouteDestination(_Spec, kw_only=True):
    destination: Destination
    weight: NonNegInt32 | None = None
    headers: Headers | None = None
    # Istio <= 1.4 (deprecated, removed later)
    remove_response_headers: tuple[str, ...] = ()
    append_response_headers: dict[str, str] = {}
    remove_request_headers: tuple[str, ...] = ()
    append_request_headers: dict[str, str] = {}


class RouteDestination(_Spec, kw_only=True):
    destination: Destination
    weight: NonNegInt32 | None = None


class HTTPRedirect(_Spec, kw_only=True):
    uri: str | None = None
    authority: str | None = None
    port: UInt32 | None = None
    derive_port: Literal["FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"] | None = None
    scheme: str | None = None
    redirect_code: UInt32 | None = None
    prefix_rewrite: str | None = None


class HTTPBody(_Spec, kw_only=True):
    string: str | None = None
    bytes_: str | None = field(default=None, name="bytes")  # base64 in YAML


class HTTPDirectResponse(_Spec, kw_only=True):
    status: UInt32
    body: HTTPBody | None = None


class RegexRewrite(_Spec, kw_only=True):
    match: str | None = None
    rewrite: str | None = None


class HTTPRewrite(_Spec, kw_only=True):
    uri: str | None = None
    authority: str | None = None
    uri_regex_rewrite: RegexRewrite | None = None


class HTTPRetry(_Spec, kw_only=True):
    attempts: Int32 | None = None
    per_try_timeout: Duration | None = None
    retry_on: str | None = None
    retry_remote_localities: bool | None = None
    retry_ignore_previous_hosts: bool | None = None
    backoff: Duration | None = None


class CorsPolicy(_Spec, kw_only=True):
    allow_origin: tuple[str, ...] = ()  # deprecated
    allow_origins: tuple[StringMatch, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: Duration | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: Literal["UNSPECIFIED", "FORWARD", "IGNORE"] | None = None


class Percent(_Spec, kw_only=True):
    value: PercentValue = 0.0


class FaultDelay(_Spec, kw_only=True):
    percent: Int32 | None = None  # deprecated int percentage
    fixed_delay: Duration | None = None
    exponential_delay: Duration | None = None
    percentage: Percent | None = None


class FaultAbort(_Spec, kw_only=True):
    percent: Int32 | None = None  # Istio <= 1.4
    http_status: Int32 | None = None
    grpc_status: str | None = None
    http2_error: str | None = None
    percentage: Percent | None = None


class HTTPFaultInjection(_Spec, kw_only=True):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


class HTTPMirrorPolicy(_Spec, kw_only=True):
    destination: Destination
    percentage: Percent | None = None


class HTTPRoute(_Spec, kw_only=True):
    name: str | None = None
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[HTTPRouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    delegate: Delegate | None = None
    rewrite: HTTPRewrite | None = None
    timeout: Duration | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirrors: tuple[HTTPMirrorPolicy, ...] = ()
    # The Istio 1.4 field; its YAML name stayed snake_case (CRD altName `mirror_percent`).
    mirror_percent: UInt32 | None = field(default=None, name="mirror_percent")
    mirror_percentage: Percent | None = None
    cors_policy: CorsPolicy | None = None
    headers: Headers | None = None
    # Istio <= 1.4 (deprecated, removed later)
    websocket_upgrade: bool | None = None
    append_headers: dict[str, str] = {}
    remove_response_headers: tuple[str, ...] = ()
    append_response_headers: dict[str, str] = {}
    remove_request_headers: tuple[str, ...] = ()
    append_request_headers: dict[str, str] = {}


class L4MatchAttributes(_Spec, kw_only=True):
    destination_subnets: tuple[str, ...] = ()
    port: UInt32 | None = None
    source_subnet: str | None = None  # Istio <= 1.4
    source_labels: dict[str, str] = {}
    gateways: tuple[str, ...] = ()
    source_namespace: str | None = None


class TLSMatchAttributes(_Spec, kw_only=True):
    sni_hosts: tuple[str, ...]
    destination_subnets: tuple[str, ...] = ()
    port: UInt32 | None = None
    source_subnet: str | None = None  # Istio <= 1.4
    source_labels: dict[str, str] = {}
    gateways: tuple[str, ...] = ()
    source_namespace: str | None = None


class TCPRoute(_Spec, kw_only=True):
    match: tuple[L4MatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()


class TLSRoute(_Spec, kw_only=True):
    match: tuple[TLSMatchAttributes, ...]
    route: tuple[RouteDestination, ...] = ()


class VirtualService(_Spec, kw_only=True):
    hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    http: tuple[HTTPRoute, ...] = ()
    tls: tuple[TLSRoute, ...] = ()
    tcp: tuple[TCPRoute, ...] = ()
    export_to: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------------
# DestinationRule (networking/v1alpha3/destination_rule.proto)


class RingHash(_Spec, kw_only=True):
    minimum_ring_size: UInt64 | None = None


class MagLev(_Spec, kw_only=True):
    table_size: UInt64 | None = None


class CookieAttribute(_Spec, kw_only=True):
    name: str
    value: str | None = None


class HTTPCookie(_Spec, kw_only=True):
    name: str
    path: str | None = None
    ttl: Duration | None = None
    attributes: tuple[CookieAttribute, ...] = ()


class ConsistentHashLB(_Spec, kw_only=True):
    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHash | None = None
    maglev: MagLev | None = None
    minimum_ring_size: UInt64 | None = None  # deprecated


class LocalityDistribute(_Spec, kw_only=True):
    from_: str | None = field(default=None, name="from")
    to: dict[str, UInt32] = {}


class LocalityFailover(_Spec, kw_only=True):
    from_: str | None = field(default=None, name="from")
    to: str | None = None


class LocalityLoadBalancerSetting(_Spec, kw_only=True):
    distribute: tuple[LocalityDistribute, ...] = ()
    failover: tuple[LocalityFailover, ...] = ()
    failover_priority: tuple[str, ...] = ()
    enabled: bool | None = None


class ZoneAwareLoadBalancerSetting(_Spec, kw_only=True):
    enabled: bool | None = None
    failover: tuple[LocalityFailover, ...] = ()
    failover_priority: tuple[str, ...] = ()
    min_cluster_size: UInt64 | None = None


class WarmupConfiguration(_Spec, kw_only=True):
    duration: Duration
    minimum_percent: float | None = None
    aggression: float | None = None


SimpleLB = Literal["UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST"]


class LoadBalancerSettings(_Spec, kw_only=True):
    simple: SimpleLB | None = None
    consistent_hash: ConsistentHashLB | None = None
    locality_lb_setting: LocalityLoadBalancerSetting | None = None
    zone_aware_lb_setting: ZoneAwareLoadBalancerSetting | None = None
    warmup_duration_secs: Duration | None = None
    warmup: WarmupConfiguration | None = None


class TcpKeepalive(_Spec, kw_only=True):
    probes: UInt32 | None = None
    time: Duration | None = None
    interval: Duration | None = None


class TCPSettings(_Spec, kw_only=True):
    max_connections: Int32 | None = None
    connect_timeout: Duration | None = None
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: Duration | None = None
    idle_timeout: Duration | None = None


class ConnectionKeepalive(_Spec, kw_only=True):
    interval: Duration | None = None
    timeout: Duration | None = None


class HTTPSettings(_Spec, kw_only=True):
    http1_max_pending_requests: Int32 | None = None
    http2_max_requests: Int32 | None = None
    max_requests_per_connection: Int32 | None = None
    max_retries: Int32 | None = None
    idle_timeout: Duration | None = None
    h2_upgrade_policy: Literal["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"] | None = None
    use_client_protocol: bool | None = None
    max_concurrent_streams: Int32 | None = None
    http2_keep_alive: ConnectionKeepalive | None = None


class ConnectionPoolSettings(_Spec, kw_only=True):
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


class OutlierDetection(_Spec, kw_only=True):
    consecutive_errors: Int32 | None = None  # deprecated; ignored by Istio >= 1.7
    split_external_local_origin_errors: bool | None = None
    consecutive_local_origin_failures: UInt32 | None = None
    consecutive_gateway_errors: UInt32 | None = None
    consecutive_5xx_errors: UInt32 | None = field(default=None, name="consecutive5xxErrors")
    interval: Duration | None = None
    base_ejection_time: Duration | None = None
    max_ejection_percent: Int32 | None = None
    min_health_percent: Int32 | None = None
    outlier_detection_http_error_codes: tuple[UInt32, ...] = ()


class ClientTLSSettings(_Spec, kw_only=True):
    mode: Literal["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"] | None = None
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    credential_name: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    sni: str | None = None
    insecure_skip_verify: bool | None = None
    ca_crl: str | None = None


class PortTrafficPolicy(_Spec, kw_only=True):
    port: PortSelector | None = None
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


class TunnelSettings(_Spec, kw_only=True):
    protocol: str | None = None
    target_host: str
    target_port: UInt32


class ProxyProtocol(_Spec, kw_only=True):
    version: Literal["V1", "V2"] | None = None


class RetryBudget(_Spec, kw_only=True):
    percent: float | None = None
    min_retry_concurrency: UInt32 | None = None
    budget_interval: Duration | None = None


class TrafficPolicy(_Spec, kw_only=True):
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: tuple[PortTrafficPolicy, ...] = ()
    tunnel: TunnelSettings | None = None
    proxy_protocol: ProxyProtocol | None = None
    retry_budget: RetryBudget | None = None


class Subset(_Spec, kw_only=True):
    name: str
    labels: dict[str, str] = {}
    traffic_policy: TrafficPolicy | None = None


class WorkloadSelectorMatch(_Spec, kw_only=True):
    """istio.type.v1beta1.WorkloadSelector (used by DestinationRule)."""

    match_labels: dict[str, str] = {}


class DestinationRule(_Spec, kw_only=True):
    host: str
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    export_to: tuple[str, ...] = ()
    workload_selector: WorkloadSelectorMatch | None = None


# ------------------------------------------------------------------------------------------------
# ServiceEntry / WorkloadEntry (service_entry.proto, workload_entry.proto)


class ServicePort(_Spec, kw_only=True):
    number: PortNumber
    protocol: str | None = None
    name: str | None = None
    target_port: UInt32 | None = None


class WorkloadSelector(_Spec, kw_only=True):
    """networking.v1alpha3.WorkloadSelector (used by ServiceEntry)."""

    labels: dict[str, str] = {}


class WorkloadEntry(_Spec, kw_only=True):
    address: str | None = None
    ports: dict[str, UInt32] = {}
    labels: dict[str, str] = {}
    network: str | None = None
    locality: str | None = None
    weight: UInt32 | None = None
    service_account: str | None = None


class ServiceEntry(_Spec, kw_only=True):
    hosts: tuple[str, ...]
    addresses: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    location: Literal["MESH_EXTERNAL", "MESH_INTERNAL"] | None = None
    resolution: Literal["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS"] | None = None
    endpoints: tuple[WorkloadEntry, ...] = ()
    workload_selector: WorkloadSelector | None = None
    export_to: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------------
# Whole documents


class _Resource(_Spec, kw_only=True):
    api_version: str
    kind: str
    metadata: ObjectMeta = ObjectMeta()
    status: Any = None


class ServiceEntryResource(_Resource, kw_only=True):
    spec: ServiceEntry


class WorkloadEntryResource(_Resource, kw_only=True):
    spec: WorkloadEntry


class VirtualServiceResource(_Resource, kw_only=True):
    spec: VirtualService


class DestinationRuleResource(_Resource, kw_only=True):
    spec: DestinationRule


RESOURCE_TYPES: dict[str, type] = {
    "ServiceEntry": ServiceEntryResource,
    "WorkloadEntry": WorkloadEntryResource,
    "VirtualService": VirtualServiceResource,
    "DestinationRule": DestinationRuleResource,
}
