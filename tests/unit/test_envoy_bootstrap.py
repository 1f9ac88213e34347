"""The Envoy bootstrap generator (meshcore.config.envoy_bootstrap): Istio YAML -> compiled Snapshot
-> the static Envoy config istiod would program for an outbound sidecar listener.

These check the translation field by field; tests/integration/test_envoy_bootstrap_live.py runs
real Envoy on the output.
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import textwrap
from contextlib import redirect_stderr, redirect_stdout

import orjson
import pytest
import yaml

from meshcore import cli
from meshcore.config.compile import compile_sources
from meshcore.config.envoy_bootstrap import (
    ISTIO_ACCESS_LOG_FORMAT,
    envoy_bootstrap,
    to_json,
    to_yaml,
)
from meshcore.config.load import read_sources
from meshcore.config.policy import RoutePolicy
from meshcore.upstream.outlier import OutlierPolicy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
U32 = 2**32 - 1
PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"

SE = """
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: svc}
spec:
  hosts: [svc.local]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 127.0.0.1, ports: {http: 9001}, labels: {version: v1}}
  - {address: 127.0.0.2, ports: {http: 9002}, labels: {version: v2}, weight: 3}
"""


def snap(*docs: str):
    text = "\n---\n".join(textwrap.dedent(d) for d in docs)
    return compile_sources({"mesh.yaml": text.encode()}, resolver=lambda name, port: [])


def boot(*docs: str, **kw):
    return envoy_bootstrap(snap(*docs), **kw)


def hcm(b):
    return b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def vhosts(b):
    return {vh["name"]: vh for vh in hcm(b)["route_config"]["virtual_hosts"]}


def routes(b, vhost="svc.local:80"):
    return vhosts(b)[vhost]["routes"]


def clusters(b):
    return {c["name"]: c for c in b["static_resources"]["clusters"]}


def vs(http: str, annotations: str = "") -> str:
    meta = "{name: vs" + (f", annotations: {annotations}" if annotations else "") + "}"
    return f"""
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {meta}
spec:
  hosts: [svc.local]
  http: {http}
"""


def dr(traffic_policy: str, subsets: str = "[]") -> str:
    return f"""
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: dr}}
spec:
  host: svc.local
  trafficPolicy: {traffic_policy}
  subsets: {subsets}
"""


# ------------------------------------------------------------------------------------------------
# a bare ServiceEntry: Istio's defaults everywhere


def test_bare_service_entry_listener_and_hcm_as_istio_builds_them():
    b = boot(SE, listen=("127.0.0.1", 15101), admin=("127.0.0.1", 15100))
    assert b["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15100}
    lst = b["static_resources"]["listeners"]
    assert len(lst) == 1
    assert lst[0]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15101}
    h = hcm(b)
    assert h["stat_prefix"] == "outbound_127.0.0.1_15101"
    assert h["codec_type"] == "HTTP1"
    assert h["use_remote_address"] is False
    assert h["normalize_path"] is True and h["path_with_escaped_slashes_action"] == "KEEP_UNCHANGED"
    assert h["stream_idle_timeout"] == "0s"
    assert h["upgrade_configs"] == [{"upgrade_type": "websocket"}]
    assert h["request_id_extension"]["typed_config"]["@type"].endswith("UuidRequestIdConfig")
    assert "server_name" not in h  # outbound sidecars answer `server: envoy` (§8.6)
    assert "access_log" not in h  # off unless asked, as in Istio
    names = [f["name"] for f in h["http_filters"]]
    assert names[-1] == "envoy.filters.http.router"
    assert names.index("envoy.filters.http.fault") < names.index("envoy.filters.http.router")
    assert h["route_config"]["validate_clusters"] is False


def test_bare_service_entry_default_route_has_istio_default_retry_and_no_timeout():
    b = boot(SE)
    vh = vhosts(b)["svc.local:80"]
    assert vh["domains"] == ["svc.local", "svc.local:80"]
    assert vh["include_request_attempt_count"] is True
    (r,) = vh["routes"]
    assert r["name"] == "default" and r["match"] == {"prefix": "/"}
    a = r["route"]
    assert a["cluster"] == "outbound|80||svc.local"
    assert a["timeout"] == "0s" and a["max_grpc_timeout"] == "0s"
    rp = a["retry_policy"]
    assert set(rp["retry_on"].split(",")) == {"connect-failure", "refused-stream", "unavailable",
                                              "cancelled", "retriable-status-codes"}
    assert rp["num_retries"] == 2
    assert "retriable_status_codes" not in rp  # Istio >= 1.24: no 503 by default (§1.20)
    assert rp["host_selection_retry_max_attempts"] == 5
    assert [p["name"] for p in rp["retry_host_predicate"]] == [PREVIOUS_HOSTS]
    assert "retry_back_off" not in rp and "per_try_timeout" not in rp
    assert "hash_policy" not in a and "request_mirror_policies" not in a
    assert "typed_per_filter_config" not in r


def test_bare_service_entry_cluster_defaults():
    c = clusters(boot(SE))["outbound|80||svc.local"]
    assert c["type"] == "STATIC"
    assert c["connect_timeout"] == "10s"
    assert c["lb_policy"] == "LEAST_REQUEST"  # Istio >= 1.14 default
    assert c["circuit_breakers"] == {"thresholds": [{"max_connections": U32, "max_pending_requests": U32,
                                                      "max_requests": U32, "max_retries": U32}]}
    for absent in ("outlier_detection", "common_lb_config", "typed_extension_protocol_options",
                   "ring_hash_lb_config", "maglev_lb_config"):
        assert absent not in c
    la = c["load_assignment"]
    assert la["cluster_name"] == "outbound|80||svc.local"
    eps = la["endpoints"][0]["lb_endpoints"]
    assert [(e["endpoint"]["address"]["socket_address"]["address"],
             e["endpoint"]["address"]["socket_address"]["port_value"], e["load_balancing_weight"])
            for e in eps] == [("127.0.0.1", 9001, 1), ("127.0.0.2", 9002, 3)]


def test_output_is_json_serialisable_deterministic_and_yaml_round_trips():
    s = snap(SE, dr("{loadBalancer: {simple: RANDOM}}"))
    a, b = envoy_bootstrap(s), envoy_bootstrap(s)
    assert a == b
    assert orjson.loads(orjson.dumps(a)) == a
    assert orjson.loads(to_json(a)) == a
    text = to_yaml(a)
    assert "&id" not in text and "*id" not in text
    assert yaml.safe_load(text) == a


# ------------------------------------------------------------------------------------------------
# the Istio-realistic profile: retries + timeout, connection pool, outlier detection, access log

REALISTIC_VS = vs("""
  - route: [{destination: {host: svc.local}}]
    timeout: 3s
    retries: {attempts: 2, perTryTimeout: 1500ms, retryOn: "5xx,reset,connect-failure,503"}
""")
REALISTIC_DR = dr("""
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 2s}
      http: {http1MaxPendingRequests: 64, http2MaxRequests: 200, maxRetries: 5,
             maxRequestsPerConnection: 1000, idleTimeout: 30s}
    outlierDetection: {consecutive5xxErrors: 7, interval: 5s, baseEjectionTime: 15s,
                       maxEjectionPercent: 50}
""")


def test_istio_realistic_route():
    b = boot(SE, REALISTIC_VS, REALISTIC_DR, access_log="stdout")
    (r,) = routes(b)
    assert r["name"] == "vs"
    a = r["route"]
    assert a["timeout"] == "3s" and a["max_grpc_timeout"] == "3s"
    rp = a["retry_policy"]
    assert rp["retry_on"].split(",") == ["5xx", "connect-failure", "retriable-status-codes", "reset"]
    assert rp["num_retries"] == 2
    assert rp["per_try_timeout"] == "1.5s"
    assert rp["retriable_status_codes"] == [503]
    assert [p["name"] for p in rp["retry_host_predicate"]] == [PREVIOUS_HOSTS]


def test_istio_realistic_cluster():
    c = clusters(boot(SE, REALISTIC_VS, REALISTIC_DR))["outbound|80||svc.local"]
    assert c["connect_timeout"] == "2s"
    assert c["circuit_breakers"]["thresholds"] == [{"max_connections": 100, "max_pending_requests": 64,
                                                    "max_requests": 200, "max_retries": 5}]
    opts = c["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert opts["common_http_protocol_options"] == {"idle_timeout": "30s",
                                                    "max_requests_per_connection": 1000}
    assert opts["explicit_http_config"] == {"http_protocol_options": {}}
    od = c["outlier_detection"]
    assert od == {"consecutive_5xx": 7, "enforcing_consecutive_5xx": 100,
                  "consecutive_gateway_failure": 5, "enforcing_consecutive_gateway_failure": 0,
                  "interval": "5s", "base_ejection_time": "15s", "max_ejection_percent": 50,
                  "enforcing_success_rate": 0}
    assert c["common_lb_config"] == {"healthy_panic_threshold": {"value": 0.0}}  # §2.19


def test_access_log_in_istio_text_format():
    h = hcm(boot(SE, access_log="stdout"))
    (log,) = h["access_log"]
    assert log["name"] == "envoy.access_loggers.file"
    cfg = log["typed_config"]
    assert cfg["path"] == "/dev/stdout"
    assert cfg["log_format"]["text_format_source"]["inline_string"] == ISTIO_ACCESS_LOG_FORMAT
    assert hcm(boot(SE, access_log="/tmp/x.log"))["access_log"][0]["typed_config"]["path"] == "/tmp/x.log"
    # the operators of semantics.md §10.2, in order
    ops = re.findall(r"%([A-Z_]+(?:\([^)]*\))?)%", ISTIO_ACCESS_LOG_FORMAT)
    assert ops == ["START_TIME", "REQ(:METHOD)", "REQ(X-ENVOY-ORIGINAL-PATH?:PATH)", "PROTOCOL",
                   "RESPONSE_CODE", "RESPONSE_FLAGS", "RESPONSE_CODE_DETAILS",
                   "CONNECTION_TERMINATION_DETAILS", "UPSTREAM_TRANSPORT_FAILURE_REASON",
                   "BYTES_RECEIVED", "BYTES_SENT", "DURATION", "RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)",
                   "REQ(X-FORWARDED-FOR)", "REQ(USER-AGENT)", "REQ(X-REQUEST-ID)", "REQ(:AUTHORITY)",
                   "UPSTREAM_HOST", "UPSTREAM_CLUSTER_RAW", "UPSTREAM_LOCAL_ADDRESS",
                   "DOWNSTREAM_LOCAL_ADDRESS", "DOWNSTREAM_REMOTE_ADDRESS", "REQUESTED_SERVER_NAME",
                   "ROUTE_NAME"]
    assert ISTIO_ACCESS_LOG_FORMAT.endswith("%ROUTE_NAME%\n")


@pytest.mark.parametrize("bad", ["", 3, b"/tmp/x"])
def test_bad_access_log_argument_is_refused(bad):
    with pytest.raises(ValueError, match="access_log"):
        boot(SE, access_log=bad)


# ------------------------------------------------------------------------------------------------
# matching


def test_matches_translate_to_envoy_route_matchers():
    b = boot(SE, vs("""
  - name: named
    match:
    - {name: a, uri: {exact: /exact}}
    - {name: b, uri: {prefix: /Pre}, ignoreUriCase: true}
    - {name: c, uri: {regex: "/re+x"}, method: {exact: POST}, authority: {prefix: svc}}
    route: [{destination: {host: svc.local}}]
  - match:
    - headers: {x-e: {exact: "1"}, x-p: {prefix: p}, x-r: {regex: "a+"}, x-any: {}}
      withoutHeaders: {x-no: {exact: "no"}, x-gone: {}}
      queryParams: {q: {exact: "1"}, qp: {prefix: x}, qr: {regex: "[0-9]+"}, qany: {}}
    route: [{destination: {host: svc.local}}]
"""))
    rs = routes(b)
    assert [r["name"] for r in rs] == ["named.a", "named.b", "named.c", "vs"]
    assert rs[0]["match"] == {"path": "/exact"}
    assert rs[1]["match"] == {"prefix": "/pre", "case_sensitive": False}
    assert rs[2]["match"] == {"safe_regex": {"regex": "/re+x"}, "headers": [
        {"name": ":method", "string_match": {"exact": "POST"}},
        {"name": ":authority", "string_match": {"prefix": "svc"}}]}
    m = rs[3]["match"]
    assert m["prefix"] == "/"
    assert {h["name"]: {k: v for k, v in h.items() if k != "name"} for h in m["headers"]} == {
        "x-any": {"present_match": True},
        "x-e": {"string_match": {"exact": "1"}},
        "x-p": {"string_match": {"prefix": "p"}},
        "x-r": {"string_match": {"safe_regex": {"regex": "a+"}}},
        "x-no": {"string_match": {"exact": "no"}, "invert_match": True,
                 "treat_missing_header_as_empty": True},  # §1.7
        "x-gone": {"present_match": True, "invert_match": True},
    }
    assert {q["name"]: {k: v for k, v in q.items() if k != "name"} for q in m["query_parameters"]} == {
        "q": {"string_match": {"exact": "1"}},
        "qp": {"string_match": {"prefix": "x"}},
        "qr": {"string_match": {"safe_regex": {"regex": "[0-9]+"}}},
        "qany": {"present_match": True},
    }
    # every match entry carries the same action (separate dicts: no YAML anchors)
    assert rs[0]["route"] == rs[1]["route"] == rs[2]["route"]
    assert rs[0]["route"] is not rs[1]["route"]


def test_unnamed_or_ed_matches_give_one_route_each_with_the_route_name():
    rs = routes(boot(SE, vs("""
  - match: [{uri: {prefix: /a}}, {uri: {prefix: /b}}]
    route: [{destination: {host: svc.local}}]
""")))
    assert [(r["name"], r["match"]) for r in rs] == [("vs", {"prefix": "/a"}), ("vs", {"prefix": "/b"})]


def test_multi_port_service_and_wildcard_virtual_service_domains():
    b = boot("""
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: two}
spec:
  hosts: [two.local]
  ports: [{number: 8080, name: alt, protocol: HTTP}, {number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
""", """
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: wild}
spec:
  hosts: ["*.wild.example"]
  http: [{route: [{destination: {host: two.local, port: {number: 8080}}}]}]
""")
    domains = {name: vh["domains"] for name, vh in vhosts(b).items()}
    # the bare host goes where meshcore sends it: the port-80 virtual host
    assert domains["two.local:80"] == ["two.local", "two.local:80"]
    assert domains["two.local:8080"] == ["two.local:8080"]
    assert domains["*.wild.example:80"] == ["*.wild.example", "*.wild.example:80"]
    assert vhosts(b)["*.wild.example:80"]["routes"][0]["route"]["cluster"] == "outbound|8080||two.local"
    assert set(clusters(b)) == {"outbound|80||two.local", "outbound|8080||two.local"}


# ------------------------------------------------------------------------------------------------
# destinations, timeouts, retries


def test_weighted_destinations_and_weight_zero_dropped():
    b = boot(SE, dr("{loadBalancer: {simple: ROUND_ROBIN}}",
                    "[{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]"), vs("""
  - route:
    - {destination: {host: svc.local, subset: v1}, weight: 25}
    - {destination: {host: svc.local, subset: v2}, weight: 75}
    - {destination: {host: svc.local}, weight: 0}
"""))
    a = routes(b)[0]["route"]
    assert "cluster" not in a
    assert a["weighted_clusters"] == {"clusters": [{"name": "outbound|80|v1|svc.local", "weight": 25},
                                                   {"name": "outbound|80|v2|svc.local", "weight": 75}]}
    cs = clusters(b)
    assert [e["endpoint"]["address"]["socket_address"]["port_value"]
            for e in cs["outbound|80|v2|svc.local"]["load_assignment"]["endpoints"][0]["lb_endpoints"]] == [9002]


def test_retry_options_backoff_priorities_and_predicate_switch():
    b = boot(SE, vs("""
  - route: [{destination: {host: svc.local}}]
    retries: {attempts: 3, retryOn: "gateway-error,retriable-4xx", retryIgnorePreviousHosts: false,
              retryRemoteLocalities: true, backoff: 40ms}
"""))
    rp = routes(b)[0]["route"]["retry_policy"]
    assert rp["retry_on"] == "gateway-error,retriable-4xx"
    assert rp["num_retries"] == 3
    assert "retry_host_predicate" not in rp
    assert rp["host_selection_retry_max_attempts"] == 5
    assert rp["retry_priority"]["name"] == "envoy.retry_priorities.previous_priorities"
    assert rp["retry_priority"]["typed_config"]["update_frequency"] == 2
    assert rp["retry_back_off"] == {"base_interval": "0.04s"}  # Envoy's max is 10 x base


def test_attempts_zero_means_no_retry_policy():
    a = routes(boot(SE, vs("[{route: [{destination: {host: svc.local}}], retries: {attempts: 0}}]")))[0]["route"]
    assert "retry_policy" not in a and a["timeout"] == "0s"


@pytest.mark.parametrize("text,expected", [("250ms", "0.25s"), ("1h", "3600s"), ("1.001s", "1.001s"),
                                           ("90s", "90s"), ("1m30s", "90s")])
def test_durations_are_exact(text, expected):
    a = routes(boot(SE, vs(f"[{{route: [{{destination: {{host: svc.local}}}}], timeout: {text}}}]")))[0]["route"]
    assert a["timeout"] == expected


# ------------------------------------------------------------------------------------------------
# fault, mirror


def test_fault_goes_to_the_per_route_fault_filter_config():
    r = routes(boot(SE, vs("""
  - route: [{destination: {host: svc.local}}]
    fault:
      delay: {fixedDelay: 1.5s, percentage: {value: 0.57}}
      abort: {httpStatus: 418, percentage: {value: 100}}
""")))[0]
    cfg = r["typed_per_filter_config"]["envoy.filters.http.fault"]
    assert cfg["@type"] == "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
    assert cfg["delay"] == {"fixed_delay": "1.5s", "percentage": {"numerator": 5699, "denominator": "MILLION"}}
    assert cfg["abort"] == {"http_status": 418, "percentage": {"numerator": 1000000, "denominator": "MILLION"}}


def test_fault_delay_with_deprecated_percent_is_per_hundred():
    cfg = routes(boot(SE, vs("""
  - route: [{destination: {host: svc.local}}]
    fault: {delay: {fixedDelay: 2s, percent: 30}}
""")))[0]["typed_per_filter_config"]["envoy.filters.http.fault"]
    assert cfg["delay"] == {"fixed_delay": "2s", "percentage": {"numerator": 30, "denominator": "HUNDRED"}}
    assert "abort" not in cfg


SHADOW = """
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: shadow}
spec:
  hosts: [shadow.local]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.9, ports: {http: 9009}}]
"""


def test_mirrors_with_percentages_and_shadow_suffix():
    b = boot(SE, SHADOW, vs("""
  - route: [{destination: {host: svc.local}}]
    mirror: {host: shadow.local}
    mirror_percent: 40
  - route: [{destination: {host: svc.local}}]
    mirrors: [{destination: {host: shadow.local}, percentage: {value: 12.5}}, {destination: {host: shadow.local}}]
"""))
    a0, a1 = (r["route"] for r in routes(b))
    assert a0["request_mirror_policies"] == [{
        "cluster": "outbound|80||shadow.local",
        "runtime_fraction": {"default_value": {"numerator": 40, "denominator": "HUNDRED"}},
        "trace_sampled": False}]
    assert [m["runtime_fraction"]["default_value"] for m in a1["request_mirror_policies"]] == [
        {"numerator": 125000, "denominator": "MILLION"}, {"numerator": 1000000, "denominator": "MILLION"}]
    assert "outbound|80||shadow.local" in clusters(b)
    off = boot(SE, SHADOW, vs("[{route: [{destination: {host: svc.local}}], mirror: {host: shadow.local}}]",
                              annotations='{"meshcore.io/shadow-host-suffix": "false"}'))
    assert routes(off)[0]["route"]["request_mirror_policies"][0]["disable_shadow_host_suffix_append"] is True


def test_capture_sink_mirror_is_refused():
    s = snap(SE, vs("[{route: [{destination: {host: svc.local}}], mirror: {host: capture.meshcore.local}}]",
                    annotations='{"meshcore.io/capture-file": "/tmp/c.jsonl"}'))
    with pytest.raises(ValueError, match="capture sink"):
        envoy_bootstrap(s)


# ------------------------------------------------------------------------------------------------
# load balancing, consistent hash


@pytest.mark.parametrize("simple,expected", [("ROUND_ROBIN", "ROUND_ROBIN"), ("RANDOM", "RANDOM"),
                                             ("LEAST_REQUEST", "LEAST_REQUEST"), ("LEAST_CONN", "LEAST_REQUEST")])
def test_simple_lb(simple, expected):
    c = clusters(boot(SE, dr(f"{{loadBalancer: {{simple: {simple}}}}}")))["outbound|80||svc.local"]
    assert c["lb_policy"] == expected


def test_consistent_hash_keys_ring_and_maglev():
    b = boot(SE, dr("{loadBalancer: {consistentHash: {httpHeaderName: User}}}",
                    """[{name: ck, labels: {version: v1}, trafficPolicy: {loadBalancer: {consistentHash:
                          {httpCookie: {name: sess, path: /app, ttl: 60s}, maglev: {tableSize: 251}}}}},
                        {name: ip, labels: {version: v2}, trafficPolicy: {loadBalancer: {consistentHash:
                          {useSourceIp: true, ringHash: {minimumRingSize: 64}}}}},
                        {name: q, labels: {version: v2}, trafficPolicy: {loadBalancer: {consistentHash:
                          {httpQueryParameterName: u, maglev: {tableSize: 65537}}}}}]"""), vs("""
  - match: [{uri: {prefix: /hdr}}]
    route: [{destination: {host: svc.local}}]
  - match: [{uri: {prefix: /ck}}]
    route: [{destination: {host: svc.local, subset: ck}}]
  - match: [{uri: {prefix: /two}}]
    route: [{destination: {host: svc.local, subset: ip}, weight: 50}, {destination: {host: svc.local, subset: q}, weight: 50}]
"""))
    hdr, ck, two = (r["route"] for r in routes(b))
    assert hdr["hash_policy"] == [{"header": {"header_name": "User"}}]
    # a single consistent-hash destination: Istio drops the previous_hosts predicate (§1.20)
    assert "retry_host_predicate" not in hdr["retry_policy"]
    assert ck["hash_policy"] == [{"cookie": {"name": "sess", "ttl": "60s", "path": "/app"}}]
    # weighted: one policy per destination, in order (§2.7); the predicate stays
    assert two["hash_policy"] == [{"connection_properties": {"source_ip": True}},
                                  {"query_parameter": {"name": "u"}}]
    assert [p["name"] for p in two["retry_policy"]["retry_host_predicate"]] == [PREVIOUS_HOSTS]
    cs = clusters(b)
    assert cs["outbound|80||svc.local"]["lb_policy"] == "RING_HASH"
    assert cs["outbound|80||svc.local"]["ring_hash_lb_config"] == {"minimum_ring_size": 1024}
    assert cs["outbound|80|ck|svc.local"]["lb_policy"] == "MAGLEV"
    assert cs["outbound|80|ck|svc.local"]["maglev_lb_config"] == {"table_size": 251}
    assert cs["outbound|80|ip|svc.local"]["ring_hash_lb_config"] == {"minimum_ring_size": 64}
    assert cs["outbound|80|q|svc.local"]["maglev_lb_config"] == {"table_size": 65537}


def test_cookie_without_ttl_and_session_cookie():
    b = boot(SE, dr("{loadBalancer: {consistentHash: {httpCookie: {name: s0, ttl: 0s}}}}"))
    assert routes(b)[0]["route"]["hash_policy"] == [{"cookie": {"name": "s0", "ttl": "0s"}}]
    b = boot(SE, dr("{loadBalancer: {consistentHash: {httpCookie: {name: s1}}}}"))
    assert routes(b)[0]["route"]["hash_policy"] == [{"cookie": {"name": "s1"}}]


# ------------------------------------------------------------------------------------------------
# outlier detection variants


def test_outlier_deprecated_consecutive_errors_split_mode_and_panic_threshold():
    c = clusters(boot(SE, dr("{outlierDetection: {consecutiveErrors: 2, baseEjectionTime: 1m, "
                             "maxEjectionPercent: 100}}")))["outbound|80||svc.local"]
    od = c["outlier_detection"]
    # as meshcore applies it (Istio 1.4's mapping, §2.15)
    assert (od["consecutive_gateway_failure"], od["enforcing_consecutive_gateway_failure"],
            od["enforcing_consecutive_5xx"]) == (2, 100, 0)
    assert od["base_ejection_time"] == "60s" and od["interval"] == "10s"
    assert od["max_ejection_percent"] == 100
    c = clusters(boot(SE, dr("{outlierDetection: {splitExternalLocalOriginErrors: true, "
                             "consecutiveLocalOriginFailures: 3, consecutiveGatewayErrors: 4, "
                             "minHealthPercent: 30}}")))["outbound|80||svc.local"]
    od = c["outlier_detection"]
    assert od["split_external_local_origin_errors"] is True
    assert (od["consecutive_local_origin_failure"], od["enforcing_consecutive_local_origin_failure"],
            od["enforcing_local_origin_success_rate"]) == (3, 100, 0)
    assert (od["consecutive_gateway_failure"], od["enforcing_consecutive_gateway_failure"]) == (4, 100)
    assert od["max_ejection_percent"] == 10  # Envoy's default, written explicitly
    assert c["common_lb_config"] == {"healthy_panic_threshold": {"value": 30.0}}


def test_outlier_block_alone_gets_envoy_defaults():
    od = clusters(boot(SE, dr("{outlierDetection: {interval: 2s}}")))["outbound|80||svc.local"]["outlier_detection"]
    assert od == {"consecutive_5xx": 5, "enforcing_consecutive_5xx": 100, "consecutive_gateway_failure": 5,
                  "enforcing_consecutive_gateway_failure": 0, "interval": "2s", "base_ejection_time": "30s",
                  "max_ejection_percent": 10, "enforcing_success_rate": 0}


# ------------------------------------------------------------------------------------------------
# refusals: what Envoy cannot express or meshcore does not implement


@pytest.mark.parametrize("docs,field", [
    ((SE, vs("[{route: [{destination: {host: svc.local}}], headers: {request: {set: {x: y}}}}]")),
     "http[].headers"),
    ((SE, vs("[{route: [{destination: {host: svc.local}}], rewrite: {uri: /x}}]")), "http[].rewrite"),
    ((SE, dr("{tls: {mode: SIMPLE}}")), "trafficPolicy.tls"),
    ((SE, dr("{loadBalancer: {simple: ROUND_ROBIN, warmupDurationSecs: 10s}}")), "warmupDurationSecs"),
    ((SE, vs("[{redirect: {uri: /x}}]")), "redirect"),
])
def test_fields_the_generator_does_not_translate_yet_are_refused_by_name(docs, field):
    with pytest.raises(ValueError) as exc:
        envoy_bootstrap(snap(*docs))
    assert field in str(exc.value) and "does not translate" in str(exc.value)


@pytest.mark.parametrize("docs,field", [
    ((SE, dr("{connectionPool: {tcp: {idleTimeout: 5s}}}")), "tcp.idleTimeout"),
    ((SE, vs("[{route: [{destination: {host: svc.local}}], fault: {abort: {grpcStatus: UNAVAILABLE, "
             "percentage: {value: 10}}}}]")), "abort.grpcStatus"),
    ((SE.replace("ports: [{number: 80, name: http, protocol: HTTP}]",
                 "ports: [{number: 80, name: http, protocol: HTTP}, {number: 5432, name: pg, protocol: TCP}]"),),
     "spec.ports[1].protocol"),
    ((SE.replace("protocol: HTTP}", "protocol: GRPC}"),), "spec.ports[0].protocol"),
])
def test_fields_meshcore_does_not_implement_are_refused_by_name(docs, field):
    s = snap(*docs)
    with pytest.raises(ValueError) as exc:
        envoy_bootstrap(s)
    assert field in str(exc.value)
    assert "mesh.yaml" in str(exc.value)


def test_unexpressible_hand_made_policies_are_refused():
    s = snap(SE, dr("{outlierDetection: {interval: 1s}}"))
    name = "outbound|80||svc.local"
    c = s.clusters[name]

    def with_cluster(**kw):
        return dataclasses.replace(s, clusters={**s.clusters, name: dataclasses.replace(c, **kw)})

    old_rule = dataclasses.replace(c.outlier, check_mep_on_first_eject=False)
    with pytest.raises(ValueError, match="maxEjectionPercent"):
        envoy_bootstrap(with_cluster(outlier=old_rule))
    ep = dataclasses.replace(c.endpoints[0], address="svc-host.internal")
    with pytest.raises(ValueError, match="not an IP address"):
        envoy_bootstrap(with_cluster(endpoints=(ep,)))
    with pytest.raises(ValueError, match="load balancer"):
        envoy_bootstrap(with_cluster(lb="WEIGHTED_MAGIC"))
    with pytest.raises(ValueError, match="panic threshold"):
        envoy_bootstrap(with_cluster(outlier=OutlierPolicy(enabled=False, healthy_panic_threshold=10.0)))
    vh = s.vhosts["svc.local:80"]
    empty = dataclasses.replace(vh, routes=(RoutePolicy(name="redirect"),))
    with pytest.raises(ValueError, match="route redirect: a route without destinations"):
        envoy_bootstrap(dataclasses.replace(s, vhosts={"svc.local:80": empty}))


def test_listen_port_is_checked():
    with pytest.raises(ValueError, match="listen: invalid port"):
        boot(SE, listen=("127.0.0.1", 70000))


# ------------------------------------------------------------------------------------------------
# the seed article's configs and the CLI


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "examples", "seed"))))
def test_every_seed_config_translates(name):
    s = compile_sources(read_sources([os.path.join(ROOT, "examples", "seed", name)]))
    b = envoy_bootstrap(s)
    assert {c["name"] for c in b["static_resources"]["clusters"]} == set(s.clusters)
    assert {vh["name"] for vh in hcm(b)["route_config"]["virtual_hosts"]} == {v.name for v in s.vhosts.values()}


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_cli_prints_the_bootstrap_as_yaml_or_json(tmp_path):
    cfg = os.path.join(ROOT, "examples", "seed", "2-circuit-breaker")
    rc, out, err = _cli("envoy-config", "--config", cfg, "--listen", "127.0.0.1:16001",
                        "--admin", "127.0.0.1:16000", "--access-log", "stdout")
    assert rc == 0, err
    expected = envoy_bootstrap(compile_sources(read_sources([cfg])), listen=("127.0.0.1", 16001),
                               admin=("127.0.0.1", 16000), access_log="stdout")
    assert yaml.safe_load(out) == expected
    assert "warning:" in err  # the seed's deprecated consecutiveErrors
    rc, out, _ = _cli("envoy-config", "--config", cfg, "--format", "json")
    assert rc == 0 and orjson.loads(out) == envoy_bootstrap(compile_sources(read_sources([cfg])))


def test_cli_errors_exit_1_with_the_reason(tmp_path):
    rc, out, err = _cli("envoy-config", "--config", str(tmp_path / "missing.yaml"))
    assert rc == 1 and out == "" and "cannot read" in err
    bad = tmp_path / "tls.yaml"
    bad.write_text(textwrap.dedent(SE) + "---\n" + textwrap.dedent(dr("{tls: {mode: SIMPLE}}")))
    rc, out, err = _cli("envoy-config", "--config", str(bad))
    assert rc == 1 and out == ""
    assert "meshcore envoy-config:" in err and "trafficPolicy.tls" in err
