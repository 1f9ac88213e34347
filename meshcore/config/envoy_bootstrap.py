"""Envoy 1.40 static bootstrap from a compiled `Snapshot`: what istiod programs for an outbound
sidecar HTTP listener, so real Envoy can run on exactly the Istio YAML meshcore runs on.

`envoy_bootstrap(snapshot, listen=..., admin=..., access_log=...)` is a pure function returning a
JSON-serialisable dict (Envoy reads JSON as YAML). It translates the compiled policy, not the raw
YAML, so Envoy gets meshcore's interpretation of every field (semantics.md §1, §2, §12):

- One listener on `listen` with an HTTP connection manager as Istio builds it for a sidecar's
  outbound HTTP port (istio listener_builder.go `buildHTTPConnectionManager`): stat prefix
  `outbound_<addr>_<port>`, codec HTTP1 (meshcore is HTTP/1.1 only; Istio says AUTO),
  `use_remote_address: false` (§8.1), `normalize_path: true` with escaped slashes kept (mesh
  `pathNormalization` BASE), websocket upgrades allowed, `stream_idle_timeout: 0s` (§13.1),
  `proxy_100_continue: true` (ENABLE_100_CONTINUE_HEADERS), Istio's UUID request-id extension, no
  server name (outbound sidecars answer `server: envoy`, §8.6). HTTP filters: grpc_stats, fault,
  cors, router (Istio's upstream-Envoy filters; its own mx/alpn/stats filters do not exist in
  upstream Envoy and have no effect on routing).
- One route configuration for every service port (meshcore serves them all on one listener):
  a virtual host per meshcore virtual host, named `host:port`, with domains `host:port` and the
  bare `host` where meshcore maps it there, `include_request_attempt_count: true` (§3.5).
- Routes in order, one Envoy route per OR-ed match entry (§1.2), route timeout (`0s` = none) and
  `max_grpc_timeout` as Istio writes it, retry policy, fault (per-route
  `typed_per_filter_config`), mirrors, hash policies.
- One STATIC cluster per meshcore cluster: endpoints with weights, LB policy, connect timeout,
  circuit breakers (Istio always writes them, 2^32-1 when unset, §2.2), HTTP protocol options
  (idle timeout, max requests per connection), outlier detection and panic threshold (§2.19),
  ring hash / Maglev sizes. `resolution: DNS` addresses were resolved at compile time.
- With `access_log`, a file access log in Istio's default text format (§10.2).

Known differences in behaviour (Istio's defaults kept, since the Envoy side stands for a real
Istio sidecar): meshcore does not normalise paths, answers
`Expect: 100-continue` itself and ignores `grpc-timeout` on gRPC(-web) requests; Envoy here does
all three as Istio configures it. One listener serves every service port (Istio has one per
port), so a request for `host:<port without a virtual host>` gets 404 from Envoy, where meshcore
falls back to the bare host's virtual host.

What cannot be expressed, or what meshcore does not implement (so that Envoy would behave
differently from meshcore on the same YAML), raises ValueError naming the config field: compile
warnings about unimplemented fields, the capture-sink mirror, routes without destinations,
non-IP endpoint addresses, an outlier policy with the pre-1.28 maxEjectionPercent rule.
"""
from __future__ import annotations

import ipaddress

import orjson
import yaml

from meshcore.config.policy import (
    LB_LEAST_REQUEST,
    LB_RANDOM,
    LB_ROUND_ROBIN,
    ClusterPolicy,
    RoutePolicy,
    Snapshot,
)
from meshcore.policy.fault import HUNDRED, MILLION
from meshcore.policy.retry import format_retry_on
from meshcore.routing.matchers import Exact, Prefix, Present, Regex
from meshcore.upstream.breaker import UNLIMITED
from meshcore.upstream.ring import DEFAULT_MAX_RING_SIZE

__all__ = ["envoy_bootstrap", "to_yaml", "to_json", "ISTIO_ACCESS_LOG_FORMAT", "DEFAULT_LISTEN",
           "DEFAULT_ADMIN"]

DEFAULT_LISTEN = ("127.0.0.1", 15001)  # `meshcore run` defaults
DEFAULT_ADMIN = ("127.0.0.1", 15000)

# Istio (1.9+) default text access log format, pilot/pkg/model/telemetry_logging.go; the same
# fields meshcore.accesslog writes.
ISTIO_ACCESS_LOG_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% "
    '"%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW% '
    "%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% "
    "%REQUESTED_SERVER_NAME% %ROUTE_NAME%\n"
)

_T = "type.googleapis.com/"
_HCM = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_FAULT = "envoy.filters.http.fault"
_FAULT_TYPE = _T + "envoy.extensions.filters.http.fault.v3.HTTPFault"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_PREVIOUS_HOSTS = {
    "name": "envoy.retry_host_predicates.previous_hosts",
    "typed_config": {"@type": _T + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
}

_LB_POLICIES = {LB_ROUND_ROBIN: "ROUND_ROBIN", LB_RANDOM: "RANDOM", LB_LEAST_REQUEST: "LEAST_REQUEST"}
_DENOMINATORS = {HUNDRED: "HUNDRED", MILLION: "MILLION"}
_DEFAULT_IDLE_TIMEOUT = 3600.0  # Envoy's upstream idle timeout default (§2.12)
_DEFAULT_BACKOFF_MS = (25, 250)  # Envoy's retry back-off defaults (§3.3)
_DEFAULT_MAX_EJECTION_TIME_MS = 300_000

# Compile warnings that mean meshcore ignores (or proxies differently) something istiod would
# program: an Envoy generated from the same Snapshot could not stand for that Istio sidecar.
_UNIMPLEMENTED_MARKERS = (
    "not implemented",
    "is not supported (HTTP/1.1 only)",
    "is proxied as HTTP/1.1",
    "gRPC aborts are not supported",
)


# ------------------------------------------------------------------------------------------------
# small pieces


def _duration(seconds: float, what: str) -> str:
    """Seconds -> protobuf JSON Duration (`1.5s`), exact to the nanosecond."""
    ns = round(seconds * 1e9)
    if ns < 0:
        raise ValueError(f"{what}: negative duration {seconds!r}")
    whole, frac = divmod(ns, 10**9)
    if not frac:
        return f"{whole}s"
    return f"{whole}.{frac:09d}".rstrip("0") + "s"


def _ms(ms: int, what: str) -> str:
    return _duration(ms / 1000.0, what)


def _address(host: str, port: int, what: str) -> dict:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"{what}: invalid port {port!r}")
    return {"socket_address": {"address": host, "port_value": port}}


def _fraction(numerator: int, denominator: int, what: str) -> dict:
    name = _DENOMINATORS.get(denominator)
    if name is None:
        raise ValueError(f"{what}: denominator {denominator} is neither 100 nor 1000000")
    return {"numerator": numerator, "denominator": name}


def _text(value, what: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{what}: value {value!r} is not UTF-8") from None
    return value


# ------------------------------------------------------------------------------------------------
# route matching (§1.2-1.9)


def _string_matcher(matcher, what: str) -> dict:
    if isinstance(matcher, Exact):
        return {"exact": _text(matcher.value, what)}
    if isinstance(matcher, Prefix):
        return {"prefix": _text(matcher.value, what)}
    if isinstance(matcher, Regex):
        return {"safe_regex": {"regex": matcher.source}}
    raise ValueError(f"{what}: matcher {type(matcher).__name__} has no Envoy StringMatcher form")


def _header_matcher(name: str, matcher, invert: bool, what: str) -> dict:
    out: dict = {"name": name}
    if isinstance(matcher, Present):
        out["present_match"] = True
    else:
        out["string_match"] = _string_matcher(matcher, what)
    if invert:
        out["invert_match"] = True
        if not isinstance(matcher, Present):
            # withoutHeaders: a missing header counts as "" (Istio sets this, and so does meshcore)
            out["treat_missing_header_as_empty"] = True
    return out


def _route_match(m, what: str) -> dict:
    if m is None:  # a route without match entries matches every request
        return {"prefix": "/"}
    out: dict = {}
    p = m.path
    if p is None:
        out["prefix"] = "/"
    elif p.kind == "regex":
        out["safe_regex"] = {"regex": p.value}
    elif p.kind == "exact":
        out["path"] = _text(p.value, f"{what}.uri.exact")
    elif p.kind == "prefix":
        out["prefix"] = _text(p.value, f"{what}.uri.prefix")
    else:
        raise ValueError(f"{what}.uri: unknown path match kind {p.kind!r}")
    if p is not None and p.ignore_case:
        out["case_sensitive"] = False
    headers = []
    if m.method is not None:
        headers.append(_header_matcher(":method", m.method, False, f"{what}.method"))
    if m.authority is not None:
        headers.append(_header_matcher(":authority", m.authority, False, f"{what}.authority"))
    for h in m.headers:
        name = _text(h.name, f"{what}.headers")
        headers.append(_header_matcher(name, h.matcher, h.invert, f"{what}.headers[{name}]"))
    if headers:
        out["headers"] = headers
    if m.query:
        params = []
        for q in m.query:
            name = _text(q.name, f"{what}.queryParams")
            if isinstance(q.matcher, Present):
                params.append({"name": name, "present_match": True})
            else:
                params.append({"name": name,
                               "string_match": _string_matcher(q.matcher, f"{what}.queryParams[{name}]")})
        out["query_parameters"] = params
    return out


# ------------------------------------------------------------------------------------------------
# route action (§1.12-1.28, §2.4)


def _retry_policy(p, what: str) -> dict:
    out: dict = {"retry_on": format_retry_on(p.retry_on), "num_retries": p.num_retries}
    if p.per_try_timeout:
        out["per_try_timeout"] = _duration(p.per_try_timeout, f"{what}.perTryTimeout")
    if p.retriable_status_codes:
        out["retriable_status_codes"] = list(p.retriable_status_codes)
    if p.retriable_header_names:
        out["retriable_headers"] = [{"name": _text(n, what), "present_match": True}
                                    for n in p.retriable_header_names]
    if p.previous_hosts:
        out["retry_host_predicate"] = [_PREVIOUS_HOSTS]
    out["host_selection_retry_max_attempts"] = p.host_selection_retry_max_attempts
    if p.retry_remote_localities:
        out["retry_priority"] = {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {
                "@type": _T + "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                "update_frequency": 2,
            },
        }
    if (p.base_interval_ms, p.max_interval_ms) != _DEFAULT_BACKOFF_MS:
        back_off = {"base_interval": _ms(p.base_interval_ms, f"{what}.backoff")}
        if p.max_interval_ms != 10 * p.base_interval_ms:  # Envoy's default max is 10 x base
            back_off["max_interval"] = _ms(p.max_interval_ms, f"{what}.backoff")
        out["retry_back_off"] = back_off
    return out


def _fault_config(f, what: str) -> dict:
    out: dict = {"@type": _FAULT_TYPE}
    if f.delay > 0:
        out["delay"] = {"fixed_delay": _duration(f.delay, f"{what}.delay.fixedDelay"),
                        "percentage": _fraction(f.delay_numerator, f.delay_denominator,
                                                f"{what}.delay.percentage")}
    if f.abort_status:
        out["abort"] = {"http_status": f.abort_status,
                        "percentage": _fraction(f.abort_numerator, f.abort_denominator,
                                                f"{what}.abort.percentage")}
    return out


def _mirror_policy(m, cluster: str, clusters: dict, what: str) -> dict:
    if m.is_capture or not cluster:
        raise ValueError(f"{what}: mirror to {m.host} is meshcore's capture sink, which Envoy "
                         "does not have")
    if cluster not in clusters:
        raise ValueError(f"{what}: mirror cluster {cluster} is not in the snapshot")
    out = {"cluster": cluster,
           "runtime_fraction": {"default_value": _fraction(m.numerator, m.denominator,
                                                           f"{what}.percentage")},
           "trace_sampled": False}
    if not m.shadow_suffix:
        out["disable_shadow_host_suffix_append"] = True
    return out


def _hash_policy(h, what: str) -> dict:
    if h.kind == "header":
        out = {"header": {"header_name": h.name}}
    elif h.kind == "cookie":
        cookie: dict = {"name": h.name}
        if h.cookie_ttl is not None:
            cookie["ttl"] = f"{h.cookie_ttl}s"
        if h.cookie_path:
            cookie["path"] = h.cookie_path
        if h.cookie_attributes:
            cookie["attributes"] = [{"name": n, "value": v} if v else {"name": n}
                                    for n, v in h.cookie_attributes]
        out = {"cookie": cookie}
    elif h.kind == "source_ip":
        out = {"connection_properties": {"source_ip": True}}
    elif h.kind == "query":
        out = {"query_parameter": {"name": h.name}}
    else:
        raise ValueError(f"{what}: hash policy kind {h.kind!r} has no Envoy form")
    if h.terminal:
        out["terminal"] = True
    return out


def _route_action(r: RoutePolicy, clusters: dict, what: str) -> dict:
    if not r.destinations:
        raise ValueError(f"{what}: a route without destinations (redirect, direct response) is "
                         "not implemented by meshcore")
    for d in r.destinations:
        if d.cluster not in clusters:
            raise ValueError(f"{what}: destination cluster {d.cluster} is not in the snapshot")
    out: dict = {}
    if len(r.destinations) == 1:
        out["cluster"] = r.destinations[0].cluster
    else:
        out["weighted_clusters"] = {"clusters": [{"name": d.cluster, "weight": d.weight}
                                                 for d in r.destinations]}
    out["timeout"] = _duration(r.timeout, f"{what}.timeout")  # 0s: no timeout (§1.16)
    # Istio copies the timeout here (the deprecated field, still what it writes, §1.17): a gRPC
    # request's grpc-timeout header then applies, capped by it (0s: uncapped)
    out["max_grpc_timeout"] = out["timeout"]
    if r.retry is not None:
        out["retry_policy"] = _retry_policy(r.retry, f"{what}.retries")
    if r.mirrors:
        out["request_mirror_policies"] = [_mirror_policy(m, c, clusters, f"{what}.mirror")
                                          for m, c in r.mirrors]
    if r.hash_policies:
        out["hash_policy"] = [_hash_policy(h, f"{what}.consistentHash") for h in r.hash_policies]
    return out


def _routes(r: RoutePolicy, clusters: dict, vhost: str) -> list[dict]:
    """One Envoy route per OR-ed match entry, each with the same action (fresh dicts each)."""
    what = f"virtual host {vhost}: route {r.name}"
    out = []
    for i, m in enumerate(r.matches or (None,)):
        route: dict = {"name": r.name, "match": _route_match(m, f"{what}: match[{i}]"),
                       "route": _route_action(r, clusters, what)}
        if r.fault is not None:
            route["typed_per_filter_config"] = {_FAULT: _fault_config(r.fault, f"{what}: fault")}
        out.append(route)
    return out


def _virtual_hosts(snapshot: Snapshot) -> list[dict]:
    keys: dict[int, list[str]] = {}
    order = []
    for key, vh in snapshot.vhosts.items():
        lst = keys.get(id(vh))
        if lst is None:
            lst = keys[id(vh)] = []
            order.append(vh)
        lst.append(key.lower())
    return [{"name": vh.name,
             "domains": sorted(keys[id(vh)]),
             "routes": [route for r in vh.routes for route in _routes(r, snapshot.clusters, vh.name)],
             "include_request_attempt_count": True}
            for vh in order]


# ------------------------------------------------------------------------------------------------
# clusters (§2, §12)


def _endpoint(e, what: str) -> dict:
    try:
        ipaddress.ip_address(e.address)
    except ValueError:
        raise ValueError(f"{what}: endpoint address {e.address!r} is not an IP address "
                         "(a STATIC cluster needs one)") from None
    return {"endpoint": {"address": _address(e.address, e.port, what)},
            "load_balancing_weight": e.weight}


def _outlier_detection(o, what: str) -> dict:
    if not o.check_mep_on_first_eject:
        raise ValueError(f"{what}: outlier detection with the Envoy < 1.28 maxEjectionPercent rule "
                         "(check_mep_on_first_eject off) cannot be expressed in Envoy 1.40")
    out = {
        "consecutive_5xx": o.consecutive_5xx,
        "enforcing_consecutive_5xx": o.enforcing_consecutive_5xx,
        "consecutive_gateway_failure": o.consecutive_gateway_failure,
        "enforcing_consecutive_gateway_failure": o.enforcing_consecutive_gateway_failure,
        "interval": _ms(o.interval_ms, f"{what}.interval"),
        "base_ejection_time": _ms(o.base_ejection_time_ms, f"{what}.baseEjectionTime"),
        "max_ejection_percent": o.max_ejection_percent,
        "enforcing_success_rate": 0,  # Istio >= 1.7 (§2.16); meshcore has no success-rate ejection
    }
    if o.max_ejection_time_ms != _DEFAULT_MAX_EJECTION_TIME_MS:
        out["max_ejection_time"] = _ms(o.max_ejection_time_ms, f"{what}.maxEjectionTime")
    if o.split_external_local_origin_errors:
        out.update(split_external_local_origin_errors=True,
                   consecutive_local_origin_failure=o.consecutive_local_origin_failure,
                   enforcing_consecutive_local_origin_failure=o.enforcing_consecutive_local_origin_failure,
                   enforcing_local_origin_success_rate=0)
    if o.always_eject_one_host:
        out["always_eject_one_host"] = True
    return out


def _cluster(c: ClusterPolicy) -> dict:
    what = f"cluster {c.name}"
    ring = c.ring_config
    if ring is not None:
        lb = ring.lb_policy
        if lb not in ("RING_HASH", "MAGLEV"):
            raise ValueError(f"{what}: consistent-hash table {lb!r} has no Envoy lb_policy")
    else:
        lb = _LB_POLICIES.get(c.lb)
        if lb is None:
            raise ValueError(f"{what}: load balancer {c.lb!r} has no Envoy lb_policy")
    limits = c.limits
    out: dict = {
        "name": c.name,
        "type": "STATIC",
        "connect_timeout": _duration(c.connect_timeout, f"{what}: connectTimeout"),
        "lb_policy": lb,
        "circuit_breakers": {"thresholds": [{
            "max_connections": limits.max_connections if limits else UNLIMITED,
            "max_pending_requests": limits.max_pending_requests if limits else UNLIMITED,
            "max_requests": limits.max_requests if limits else UNLIMITED,
            "max_retries": limits.max_retries if limits else UNLIMITED,
        }]},
    }
    if ring is not None:
        if lb == "MAGLEV":
            out["maglev_lb_config"] = {"table_size": ring.table_size}
        else:
            cfg = {"minimum_ring_size": ring.minimum_ring_size}
            if ring.maximum_ring_size != DEFAULT_MAX_RING_SIZE:
                cfg["maximum_ring_size"] = ring.maximum_ring_size
            out["ring_hash_lb_config"] = cfg
    common: dict = {}
    if c.idle_timeout != _DEFAULT_IDLE_TIMEOUT:
        common["idle_timeout"] = _duration(c.idle_timeout, f"{what}: idleTimeout")
    if c.max_requests_per_connection:
        common["max_requests_per_connection"] = c.max_requests_per_connection
    if common:  # as Istio: only when the DestinationRule sets one of them
        out["typed_extension_protocol_options"] = {_HTTP_OPTIONS: {
            "@type": _T + _HTTP_OPTIONS,
            "common_http_protocol_options": common,
            "explicit_http_config": {"http_protocol_options": {}},
        }}
    o = c.outlier
    if o is not None and getattr(o, "enabled", True):
        out["outlier_detection"] = _outlier_detection(o, f"{what}: outlierDetection")
        # minHealthPercent, written only with an outlierDetection block (§2.19)
        out["common_lb_config"] = {"healthy_panic_threshold": {"value": float(o.healthy_panic_threshold)}}
    elif o is not None and o.healthy_panic_threshold != 50.0:
        raise ValueError(f"{what}: a panic threshold without outlier detection cannot come from Istio")
    eps = [_endpoint(e, what) for e in c.endpoints]
    out["load_assignment"] = {"cluster_name": c.name,
                              "endpoints": [{"lb_endpoints": eps}] if eps else []}
    return out


# ------------------------------------------------------------------------------------------------
# listener, bootstrap


def _access_log(access_log) -> list:
    if access_log is None:
        return []
    if not isinstance(access_log, str) or not access_log:
        raise ValueError(f"access_log: expected None, 'stdout' or a file path, got {access_log!r}")
    path = "/dev/stdout" if access_log == "stdout" else access_log
    return [{
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": _T + "envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": path,
            "log_format": {"text_format_source": {"inline_string": ISTIO_ACCESS_LOG_FORMAT}},
        },
    }]


def _http_filters() -> list:
    return [
        {"name": "envoy.filters.http.grpc_stats",
         "typed_config": {"@type": _T + "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
                          "emit_filter_state": True, "stats_for_all_methods": False}},
        {"name": _FAULT, "typed_config": {"@type": _FAULT_TYPE}},
        {"name": "envoy.filters.http.cors",
         "typed_config": {"@type": _T + "envoy.extensions.filters.http.cors.v3.Cors"}},
        {"name": "envoy.filters.http.router",
         "typed_config": {"@type": _T + "envoy.extensions.filters.http.router.v3.Router"}},
    ]


def _untranslated(snapshot: Snapshot) -> list[str]:
    """What meshcore implements but this generator does not translate yet: refused by name, so
    an Envoy on the generated config never silently behaves differently."""
    out = []
    seen = set()
    for vh in snapshot.vhosts.values():
        if id(vh) in seen:
            continue
        seen.add(id(vh))
        for r in vh.routes:
            if getattr(r, "direct", None) is not None:
                out.append(f"route {r.name}: http[].redirect / directResponse")
            if getattr(r, "cors", None) is not None:
                out.append(f"route {r.name}: http[].corsPolicy")
            for d in r.destinations:
                if getattr(d, "rewrite", None) is not None:
                    out.append(f"route {r.name}: http[].rewrite")
                if (getattr(d, "request_headers", None) is not None
                        or getattr(d, "response_headers", None) is not None):
                    out.append(f"route {r.name}: http[].headers / route[].headers")
    for c in snapshot.clusters.values():
        if getattr(c, "tls", None) is not None:
            out.append(f"cluster {c.name}: trafficPolicy.tls")
        if getattr(c, "slow_start", None) is not None:
            out.append(f"cluster {c.name}: loadBalancer.warmup / warmupDurationSecs")
        if getattr(c, "locality_lb", None) is not None:
            out.append(f"cluster {c.name}: loadBalancer.localityLbSetting")
        if getattr(c, "per_request_endpoints", False):
            out.append(f"cluster {c.name}: endpoints from the request (resolution NONE, "
                       "DYNAMIC_DNS, PASSTHROUGH, a ServiceEntry without ports)")
    return sorted(set(out))


def _refuse_unimplemented(snapshot: Snapshot) -> None:
    untranslated = _untranslated(snapshot)
    if untranslated:
        raise ValueError("the Envoy bootstrap generator does not translate these yet (meshcore "
                         "implements them):\n  " + "\n  ".join(untranslated))
    found = [w for w in snapshot.warnings if any(k in w for k in _UNIMPLEMENTED_MARKERS)]
    if found:
        raise ValueError("meshcore does not implement these fields, so no Envoy config can behave "
                         "as meshcore does on this YAML:\n  " + "\n  ".join(found))


def envoy_bootstrap(snapshot: Snapshot, *, listen=DEFAULT_LISTEN, admin=DEFAULT_ADMIN,
                    access_log=None) -> dict:
    """The Envoy 1.40 static bootstrap (a JSON-serialisable dict) for `snapshot`.

    `listen`, `admin`: `(host, port)` of the outbound listener and of Envoy's admin interface.
    `access_log`: None (off, Istio's default), `"stdout"`, or a file path; Istio's text format.
    Raises ValueError naming the field when the snapshot uses something Envoy cannot express or
    meshcore does not implement.
    """
    _refuse_unimplemented(snapshot)
    lhost, lport = listen
    ahost, aport = admin
    hcm: dict = {
        "@type": _HCM,
        "stat_prefix": f"outbound_{lhost}_{lport}",
        "codec_type": "HTTP1",
        "use_remote_address": False,
        "normalize_path": True,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        "upgrade_configs": [{"upgrade_type": "websocket"}],
        "stream_idle_timeout": "0s",
        "proxy_100_continue": True,
        "request_id_extension": {"typed_config": {
            "@type": _T + "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
            "use_request_id_for_trace_sampling": True,
        }},
        "route_config": {
            "name": "outbound",
            "validate_clusters": False,
            "virtual_hosts": _virtual_hosts(snapshot),
        },
        "http_filters": _http_filters(),
    }
    log = _access_log(access_log)
    if log:
        hcm["access_log"] = log
    return {
        "admin": {"address": _address(ahost, aport, "admin")},
        "static_resources": {
            "listeners": [{
                "name": f"{lhost}_{lport}",
                "address": _address(lhost, lport, "listen"),
                "traffic_direction": "OUTBOUND",
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm,
                }]}],
            }],
            "clusters": [_cluster(c) for _, c in sorted(snapshot.clusters.items())],
        },
        # Istio's bootstrap runtime (tools/packaging/common/envoy_bootstrap.json): no global
        # connection cap, and RE2 programs as large as meshcore accepts.
        "layered_runtime": {"layers": [{
            "name": "global config",
            "static_layer": {"overload.global_downstream_max_connections": 2147483647,
                             "re2.max_program_size.error_level": 32768},
        }]},
    }


class _Dumper(yaml.SafeDumper):
    """Plain YAML: no `&id` anchors for repeated sub-objects."""

    def ignore_aliases(self, data):
        return True


def to_yaml(bootstrap: dict) -> str:
    """The bootstrap as YAML text, keys in the order they were built."""
    return yaml.dump(bootstrap, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def to_json(bootstrap: dict) -> str:
    """The bootstrap as indented JSON text (Envoy reads it as YAML too)."""
    return orjson.dumps(bootstrap, option=orjson.OPT_INDENT_2).decode() + "\n"
