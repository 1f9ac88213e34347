"""Config decoding, validation and compilation (meshcore.config.{istio,load,compile,dump})."""
from __future__ import annotations

import os
import pickle
import re
import textwrap

import msgspec
import msgspec.inspect as mi
import orjson
import pytest

from meshcore.config import istio
from meshcore.config.compile import compile_sources, config_hash
from meshcore.config.dump import snapshot_to_dict, snapshot_to_json
from meshcore.config.load import read_sources
from meshcore.config.policy import LB_LEAST_REQUEST, LB_RANDOM, LB_ROUND_ROBIN
from meshcore.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")
NI = "not implemented yet; ignored"


def fake_resolver(table=None):
    table = table or {}

    def resolve(name, port):
        if name not in table:
            raise OSError(-2, "Name or service not known")
        return list(table[name])

    return resolve


def snap(text: str, name: str = "rules.yaml", **kw):
    kw.setdefault("resolver", fake_resolver())
    return compile_sources({name: textwrap.dedent(text).encode()}, **kw)


def problems(text: str, name: str = "rules.yaml", **kw) -> list[str]:
    kw.setdefault("resolver", fake_resolver())
    with pytest.raises(ConfigError) as ei:
        compile_sources({name: textwrap.dedent(text).encode()}, **kw)
    return ei.value.problems


SE_WEB = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web}
spec:
  hosts: [web]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}}
"""


def with_se(text: str, se: str = SE_WEB) -> str:
    return se + "---\n" + textwrap.dedent(text)


def eps(cluster):
    return [(e.address, e.port) for e in cluster.endpoints]


# ================================================================================================
# examples/


def demo():
    return compile_sources(read_sources([os.path.join(EXAMPLES, "demo")]))


def kube_alt_names(host: str, ports=(80,), ns="default") -> set:
    """The Kubernetes names a short ServiceEntry host also answers to (proxy in its namespace)."""
    names = {f"{host}.{ns}.svc.cluster.local", f"{host}.{ns}", f"{host}.{ns}.svc"}
    return names | {f"{n}:{p}" for n in names for p in ports}


def test_demo_vhosts_and_clusters():
    s = demo()
    assert set(s.vhosts) == {
        "myweb-service", "myweb-service:80", "split-service", "split-service:80",
        "retry-service", "retry-service:80",
    } | kube_alt_names("myweb-service") | kube_alt_names("split-service") | kube_alt_names("retry-service")
    assert s.vhosts["retry-service.default.svc.cluster.local:80"] is s.vhosts["retry-service:80"]
    assert set(s.clusters) == {
        "outbound|80||myweb-service", "outbound|80|v1|myweb-service", "outbound|80|v2|myweb-service",
        "outbound|80||split-service", "outbound|80|v1|split-service", "outbound|80|v2|split-service",
        "outbound|80||retry-service",
    }
    assert s.warnings == ()
    all6 = [("127.0.0.1", p) for p in range(18081, 18087)]
    assert eps(s.clusters["outbound|80||myweb-service"]) == all6
    assert eps(s.clusters["outbound|80|v1|myweb-service"]) == all6[:3]
    assert eps(s.clusters["outbound|80|v2|myweb-service"]) == all6[3:]
    assert eps(s.clusters["outbound|80|v1|split-service"]) == all6[:3]
    assert eps(s.clusters["outbound|80||retry-service"]) == [("127.0.0.1", p) for p in (18091, 18092, 18093)]
    for name in ("outbound|80||myweb-service", "outbound|80|v1|myweb-service", "outbound|80|v2|myweb-service"):
        assert s.clusters[name].lb == LB_RANDOM
    assert s.clusters["outbound|80|v1|split-service"].lb == LB_LEAST_REQUEST
    assert s.clusters["outbound|80||retry-service"].connect_timeout == 10.0
    e = s.clusters["outbound|80|v1|myweb-service"].endpoints[0]
    assert (e.weight, e.labels, e.key) == (1, (("app", "myweb"), ("version", "v1")), "127.0.0.1:18081")

    (lb_route,) = s.vhosts["myweb-service"].routes
    assert lb_route.name == "istio-lb"
    assert [(d.cluster, d.weight) for d in lb_route.destinations] == [("outbound|80|v1|myweb-service", 100)]
    assert lb_route.timeout == 0.0
    (split,) = s.vhosts["split-service:80"].routes
    assert [(d.cluster, d.weight) for d in split.destinations] == [
        ("outbound|80|v1|split-service", 80), ("outbound|80|v2|split-service", 20)]
    assert split.total_weight == 100
    (retry,) = s.vhosts["retry-service"].routes  # the article's retry VirtualService
    assert retry.name == "retry-vs"
    assert [(d.cluster, d.weight) for d in retry.destinations] == [("outbound|80||retry-service", 100)]
    assert (retry.timeout, retry.retry.num_retries, retry.retry.per_try_timeout) == (15.0, 15, 1.0)
    assert s.vhosts["retry-service"] is s.vhosts["retry-service:80"]


SEED = os.path.join(EXAMPLES, "seed")
SEED_DIRS = sorted(d for d in os.listdir(SEED) if os.path.isdir(os.path.join(SEED, d)))
BASE_CLUSTERS = {"outbound|80||retry-service", "outbound|80||myweb-service", "outbound|80||sniffer"}


def seed(d):
    return compile_sources(read_sources([os.path.join(SEED, d)]))


def test_seed_dirs_present_and_share_one_services_file():
    assert SEED_DIRS == ["1-retry", "2-circuit-breaker", "3-lb-header-hash", "3-lb-random",
                         "3-lb-round-robin", "4-mirror"]
    texts = set(read_sources([os.path.join(SEED, d, "services.yaml") for d in SEED_DIRS]).values())
    assert len(texts) == 1


@pytest.mark.parametrize("d", SEED_DIRS)
def test_seed_common_vhosts(d):
    s = seed(d)
    assert set(s.vhosts) == {"retry-service", "retry-service:80", "myweb-service", "myweb-service:80",
                             "sniffer", "sniffer:80"} | kube_alt_names("retry-service") | \
        kube_alt_names("myweb-service") | kube_alt_names("sniffer")
    assert BASE_CLUSTERS <= set(s.clusters)
    assert eps(s.clusters["outbound|80||sniffer"]) == [("127.0.0.1", 18099)]


def test_seed_retry():
    s = seed("1-retry")
    (r,) = s.vhosts["retry-service"].routes
    assert r.name == "retry-vs" and r.timeout == 15.0
    assert [d.cluster for d in r.destinations] == ["outbound|80||retry-service"]
    assert set(s.clusters) == BASE_CLUSTERS
    assert s.warnings == ()
    assert r.retry.num_retries == 15 and r.retry.per_try_timeout == 1.0
    assert r.retry.retry_on_string == "5xx,gateway-error,reset"


def test_seed_circuit_breaker():
    s = seed("2-circuit-breaker")
    (r,) = s.vhosts["retry-service:80"].routes
    assert r.timeout == 30.0
    c = s.clusters["outbound|80||retry-service"]
    assert c.max_requests_per_connection == 1
    assert c.lb == LB_LEAST_REQUEST
    assert len(c.endpoints) == 3
    tails = [w.split(": ", 2)[2] for w in s.warnings]
    assert len(tails) == 1 and tails[0].startswith(
        "spec.trafficPolicy: outlierDetection.consecutiveErrors is deprecated: applied as Istio 1.4 did")
    assert (c.limits.max_connections, c.limits.max_pending_requests) == (1, 1)
    assert c.outlier.consecutive_gateway_failure == 2 and c.outlier.enforcing_consecutive_gateway_failure == 100
    assert (c.outlier.interval_ms, c.outlier.base_ejection_time_ms, c.outlier.max_ejection_percent) == (10000, 60000, 100)


@pytest.mark.parametrize("d,lb", [("3-lb-random", LB_RANDOM), ("3-lb-round-robin", LB_ROUND_ROBIN),
                                  ("3-lb-header-hash", "RING_HASH")])
def test_seed_lb(d, lb):
    s = seed(d)
    assert set(s.clusters) == BASE_CLUSTERS | {"outbound|80|v1|myweb-service"}
    assert s.clusters["outbound|80|v1|myweb-service"].lb == lb
    assert s.clusters["outbound|80||myweb-service"].lb == lb
    assert eps(s.clusters["outbound|80|v1|myweb-service"]) == [("127.0.0.1", p) for p in (18081, 18082, 18083)]
    (r,) = s.vhosts["myweb-service"].routes
    assert [d.cluster for d in r.destinations] == ["outbound|80|v1|myweb-service"]
    assert s.warnings == ()
    if d == "3-lb-header-hash":
        assert [p.name for p in r.hash_policies] == ["User"]  # the route hashes on the header
        assert r.retry.previous_hosts is False  # Istio >= 1.23 drops it for consistent hash


def test_seed_mirror():
    s = seed("4-mirror")
    assert s.warnings == ()
    (r,) = s.vhosts["retry-service"].routes
    assert [d.cluster for d in r.destinations] == ["outbound|80||retry-service"]
    ((mirror, cluster),) = r.mirrors
    # `sniffer` expands to its Kubernetes name, which the ServiceEntry host `sniffer` stands for
    assert (mirror.host, mirror.percent, mirror.shadow_suffix) == ("sniffer.default.svc.cluster.local", 100.0, True)
    assert cluster == "outbound|80||sniffer"


# ================================================================================================
# load.py


def test_read_sources_files_and_dirs(tmp_path):
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "b.yaml").write_bytes(b"b")
    (d / "a.yml").write_bytes(b"a")
    (d / "c.json").write_bytes(b"c")
    (d / "notes.txt").write_bytes(b"x")
    (d / ".hidden.yaml").write_bytes(b"x")
    (d / "sub.yaml").mkdir()
    f = tmp_path / "one.yaml"
    f.write_bytes(b"1")
    out = read_sources([str(f), str(d)])
    assert list(out) == [str(f), str(d / "a.yml"), str(d / "b.yaml"), str(d / "c.json")]
    assert out[str(d / "c.json")] == b"c"


def test_read_sources_unreadable(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    also = str(tmp_path / "gone")
    with pytest.raises(ConfigError) as ei:
        read_sources([missing, also])
    assert ei.value.problems == [f"{missing}: cannot read: No such file or directory",
                                 f"{also}: cannot read: No such file or directory"]


# ================================================================================================
# Error reporting: exact messages


RETRY_VS = """\
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: retry-vs
spec:
  hosts: [retry-service]
  http:
  - route:
    - destination: {host: retry-service}
    retries:
      attempts: "15"
"""


def test_type_error_message_exact():
    assert problems(RETRY_VS) == [
        "rules.yaml: VirtualService retry-vs: spec.http[0].retries.attempts: expected int, got str"]


def test_every_problem_is_listed_across_documents_and_files():
    bad_dr = """\
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: dr}
    spec:
      host: web
      trafficPolicy:
        loadBalancer: {simple: FASTEST}
        connectionPool: {tcp: {connectTimeout: 15, maxConnections: -1.5}}
      subsets:
      - labels: {version: v1}
    """
    with pytest.raises(ConfigError) as ei:
        compile_sources({"rules.yaml": RETRY_VS.encode() + b"      per_try_timeout: 1s\n",
                         "dr.yaml": textwrap.dedent(bad_dr).encode()})
    assert ei.value.problems == [
        "rules.yaml: VirtualService retry-vs: spec.http[0].retries.attempts: expected int, got str",
        "rules.yaml: VirtualService retry-vs: spec.http[0].retries.per_try_timeout: unknown field (the YAML name is perTryTimeout)",
        "dr.yaml: DestinationRule dr: spec.trafficPolicy.loadBalancer.simple: invalid value 'FASTEST'; "
        "expected one of LEAST_CONN, LEAST_REQUEST, PASSTHROUGH, RANDOM, ROUND_ROBIN, UNSPECIFIED",
        "dr.yaml: DestinationRule dr: spec.trafficPolicy.connectionPool.tcp.connectTimeout: "
        "expected duration string (e.g. 15s, 100ms), got int",
        "dr.yaml: DestinationRule dr: spec.trafficPolicy.connectionPool.tcp.maxConnections: expected int, got float",
        "dr.yaml: DestinationRule dr: spec.subsets[0].name: missing required field",
    ]
    assert str(ei.value) == "\n".join(ei.value.problems)


def test_unknown_kind_and_api_version():
    p = problems("""\
    apiVersion: networking.istio.io/v1
    kind: Gatway
    metadata: {name: gw}
    spec: {}
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: d}
    ---
    apiVersion: networking.istio.io/v2
    kind: VirtualService
    metadata: {name: vs}
    spec: {hosts: [a], http: [{route: [{destination: {host: a}}]}]}
    ---
    kind: VirtualService
    metadata: {name: vs2}
    spec: {hosts: [a]}
    ---
    apiVersion: networking.istio.io/v1
    metadata: {name: x}
    ---
    - just
    - a list
    ---
    apiVersion: [networking.istio.io/v1]
    kind: [VirtualService]
    metadata: {name: x}
    ---
    apiVersion: [networking.istio.io/v1]
    kind: ServiceEntry
    metadata: oops
    """)
    kinds = "expected one of ServiceEntry, WorkloadEntry, VirtualService, DestinationRule"
    skippable = ("AuthorizationPolicy, EnvoyFilter, Gateway, PeerAuthentication, ProxyConfig, "
                 "RequestAuthentication, Sidecar, Telemetry, TrafficExtension, WasmPlugin, WorkloadGroup")
    assert p == [
        f"rules.yaml: Gatway gw: kind: unknown kind 'Gatway'; {kinds} (or one meshcore skips: {skippable})",
        "rules.yaml: VirtualService vs: apiVersion: unsupported apiVersion 'networking.istio.io/v2'; expected one of "
        "networking.istio.io/v1alpha3, networking.istio.io/v1beta1, networking.istio.io/v1",
        "rules.yaml: VirtualService vs2: apiVersion: missing required field",
        "rules.yaml: document 5: kind: missing required field",
        "rules.yaml: document 6: expected object, got array",
        "rules.yaml: document 7: kind: expected str, got array",
        "rules.yaml: document 8: metadata.name: missing required field",
        "rules.yaml: document 8: apiVersion: expected str, got array",
        "rules.yaml: document 8: metadata: expected object, got str",
        "rules.yaml: document 8: spec: missing required field",
    ]


def test_other_kinds_are_skipped_with_one_warning_each():
    s = snap(with_se("""\
    apiVersion: networking.istio.io/v1
    kind: Gateway
    metadata: {name: gw, namespace: istio-system}
    spec: {selector: {istio: ingressgateway}, servers: []}
    ---
    apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: default}
    spec: {mtls: {mode: STRICT}}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: web}
    spec: {ports: [{port: 80}]}
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: web-v1}
    ---
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: r}
    """))
    assert list(s.warnings) == [
        "rules.yaml: Gateway istio-system/gw: skipped: meshcore does not act on Gateway (networking.istio.io/v1)",
        "rules.yaml: PeerAuthentication default: skipped: meshcore does not act on PeerAuthentication "
        "(security.istio.io/v1)",
        "rules.yaml: Service web: skipped: Service (v1) is not an Istio traffic resource; meshcore reads "
        "ServiceEntry, WorkloadEntry, VirtualService, DestinationRule",
        "rules.yaml: Deployment web-v1: skipped: Deployment (apps/v1) is not an Istio traffic resource; meshcore "
        "reads ServiceEntry, WorkloadEntry, VirtualService, DestinationRule",
        "rules.yaml: HTTPRoute r: skipped: HTTPRoute (gateway.networking.k8s.io/v1) is not an Istio traffic "
        "resource; meshcore reads ServiceEntry, WorkloadEntry, VirtualService, DestinationRule",
    ]
    assert "outbound|80||web" in s.clusters


def test_kubernetes_list_items_are_read_as_documents():
    doc = {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "l"},
         "spec": {"hosts": ["l.example.com"], "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                  "resolution": "STATIC", "endpoints": [{"address": "10.0.0.9"}]}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}},
        {"kind": "ServiceEntry"},
    ]}
    with pytest.raises(ConfigError) as ei:
        compile_sources({"l.json": orjson.dumps(doc)})
    assert ei.value.problems == ["l.json: document 1 items[2]: apiVersion: missing required field",
                                 "l.json: document 1 items[2]: metadata.name: missing required field",
                                 "l.json: document 1 items[2]: spec: missing required field"]
    doc["items"].pop()
    s = compile_sources({"l.json": orjson.dumps(doc)})
    assert eps(s.clusters["outbound|80||l.example.com"]) == [("10.0.0.9", 80)]
    assert s.warnings == ("l.json: ConfigMap c: skipped: ConfigMap (v1) is not an Istio traffic resource; "
                          "meshcore reads ServiceEntry, WorkloadEntry, VirtualService, DestinationRule",)


@pytest.mark.parametrize("api", istio.API_VERSIONS)
def test_all_api_versions_accepted(api):
    s = snap(SE_WEB.replace("networking.istio.io/v1", api, 1))
    assert "outbound|80||web" in s.clusters


def test_missing_metadata_name():
    p = problems("""\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {namespace: prod}
    spec: {hosts: [a], http: [{route: [{destination: {host: a}}]}]}
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    spec: {host: a}
    """)
    assert p == ["rules.yaml: document 1: metadata.name: missing required field",
                 "rules.yaml: document 2: metadata.name: missing required field"]


def test_namespace_in_label():
    p = problems("""\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: vs, namespace: prod}
    spec: {hosts: [a], http: [{timeout: abc, route: [{destination: {host: a}}]}]}
    """)
    assert p == ["rules.yaml: VirtualService prod/vs: spec.http[0].timeout: invalid duration 'abc' "
                 "(expected a number with unit ns/us/ms/s/m/h, e.g. 15s, 1.5s, 100ms, 1m)"]


def test_yaml_syntax_error_with_line():
    p = problems("""\
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: ok}
    spec: {host: a, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata:
      name: x
    spec:
      hosts: [a
    """)
    assert len(p) == 1
    assert re.fullmatch(r"rules\.yaml: line 12, column 1: invalid YAML: .+", p[0]), p


def test_yaml_mapping_error_line():
    p = problems("a: b: c\n")
    assert p == ["rules.yaml: line 1, column 5: invalid YAML: mapping values are not allowed in this context"]


def test_yaml_duplicate_key_is_an_error():
    p = problems("""\
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: dr}
    spec:
      host: a
      host: b
    """)
    assert p == ["rules.yaml: line 6, column 3: invalid YAML: duplicate key 'host' (while constructing a mapping)"]


def test_json_source_and_json_error():
    doc = {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "j"},
           "spec": {"hosts": ["j"], "ports": [{"number": 8080, "name": "http"}], "resolution": "STATIC",
                    "endpoints": [{"address": "10.1.1.1"}]}}
    s = compile_sources({"a.json": orjson.dumps(doc), "b.json": orjson.dumps([dict(doc, metadata={"name": "k"})])})
    assert eps(s.clusters["outbound|8080||j"]) == [("10.1.1.1", 8080), ("10.1.1.1", 8080)]
    with pytest.raises(ConfigError) as ei:
        compile_sources({"bad.json": b'{"a": 1,\n  "b": }'})
    (msg,) = ei.value.problems
    assert msg.startswith("bad.json: line 2, column ") and ": invalid JSON: " in msg


@pytest.mark.parametrize("text,seconds", [("15s", 15.0), ("1.5s", 1.5), ("100ms", 0.1), ("1m", 60.0),
                                          ("1h", 3600.0), ("1h30m", 5400.0), ("250us", 0.00025), ("0", 0.0),
                                          ("0s", 0.0), (".5s", 0.5)])
def test_valid_durations(text, seconds):
    assert istio.parse_duration(text) == pytest.approx(seconds)
    if seconds < 0.001:
        # Istio's validator: a route timeout must be at least 1ms, to the millisecond
        p = problems(with_se(f"""\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: vs}}
        spec: {{hosts: [web], http: [{{timeout: "{text}", route: [{{destination: {{host: web}}}}]}}]}}
        """))
        assert p == ["rules.yaml: VirtualService vs: spec.http[0].timeout: duration must be greater than 1ms"]
        return
    s = snap(with_se(f"""\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{name: vs}}
    spec: {{hosts: [web], http: [{{timeout: "{text}", route: [{{destination: {{host: web}}}}]}}]}}
    """))
    assert s.vhosts["web"].routes[0].timeout == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["15", "abc", "1.5", "-1s", "s", "1d", "1 s", "", "1s2"])
def test_invalid_durations(text):
    p = problems(f"""\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{name: vs}}
    spec: {{hosts: [a], http: [{{timeout: "{text}", route: [{{destination: {{host: a}}}}]}}]}}
    """)
    assert len(p) == 1
    assert p[0].startswith(f"rules.yaml: VirtualService vs: spec.http[0].timeout: invalid duration '{text}'")


def test_bare_number_duration_is_rejected():
    p = problems("""\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: vs}
    spec: {hosts: [a], http: [{timeout: 15, route: [{destination: {host: a}}]}]}
    """)
    assert p == ["rules.yaml: VirtualService vs: spec.http[0].timeout: expected duration string (e.g. 15s, 100ms), got int"]


def vs_with_match(match: str) -> str:
    return f"""\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{name: vs}}
    spec:
      hosts: [a]
      http:
      - match: [{match}]
        route: [{{destination: {{host: a}}}}]
    """


def test_invalid_regexes():
    p = problems(vs_with_match('{uri: {regex: "a(b"}}, {headers: {x: {regex: "a(?=b)"}}}, '
                               '{queryParams: {q: {regex: "(a)\\\\1"}}}, {method: {regex: "[z-a]"}}'))
    assert p[0].startswith("rules.yaml: VirtualService vs: spec.http[0].match[0].uri.regex: invalid regex 'a(b': ")
    assert p[1] == ("rules.yaml: VirtualService vs: spec.http[0].match[1].headers.x.regex: invalid regex 'a(?=b)': "
                    "look-around assertions are not supported (RE2)")
    assert p[2] == ("rules.yaml: VirtualService vs: spec.http[0].match[2].queryParams.q.regex: invalid regex '(a)\\1': "
                    "backreferences are not supported (RE2)")
    assert p[3].startswith("rules.yaml: VirtualService vs: spec.http[0].match[3].method.regex: invalid regex '[z-a]': ")
    assert len(p) == 4


def test_string_match_oneof_and_header_names():
    p = problems(vs_with_match('{uri: {exact: /a, prefix: /b}}, {headers: {"bad name": {exact: x}}}, '
                               '{withoutHeaders: {x: {exact: a, regex: b}}}'))
    assert p == [
        "rules.yaml: VirtualService vs: spec.http[0].match[0].uri: only one of exact, prefix, regex may be set, got exact, prefix",
        "rules.yaml: VirtualService vs: spec.http[0].match[1].headers[\"bad name\"]: invalid header name 'bad name'",
        "rules.yaml: VirtualService vs: spec.http[0].match[2].withoutHeaders.x: only one of exact, prefix, regex may be set, got exact, regex",
    ]


def test_unknown_fields_everywhere():
    p = problems("""\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: vs, color: red}
    spec:
      hosts: [a]
      http:
      - route: [{destination: {host: a, version: 2}}]
        retries: {attempts: 3, per_try_timeout: 1s}
      bogus: 1
    extra: true
    """)
    assert p == [
        "rules.yaml: VirtualService vs: metadata.color: unknown field",
        "rules.yaml: VirtualService vs: spec.http[0].route[0].destination.version: unknown field",
        "rules.yaml: VirtualService vs: spec.http[0].retries.per_try_timeout: unknown field (the YAML name is perTryTimeout)",
        "rules.yaml: VirtualService vs: spec.bogus: unknown field",
        "rules.yaml: VirtualService vs: extra: unknown field",
    ]


def test_range_and_required_errors():
    p = problems("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: se}
    spec:
      hosts: [x]
      ports: [{number: 70000, name: http}, {name: p2}]
      resolution: STATIC
      endpoints: [{address: 10.0.0.1, weight: -1, labels: {version: 1}}]
    """)
    assert p == [
        "rules.yaml: ServiceEntry se: spec.ports[0].number: expected int in range 1..65535, got 70000",
        "rules.yaml: ServiceEntry se: spec.ports[1].number: missing required field",
        "rules.yaml: ServiceEntry se: spec.endpoints[0].weight: expected int in range 0..4294967295, got -1",
        "rules.yaml: ServiceEntry se: spec.endpoints[0].labels.version: expected str, got int",
    ]


def test_config_folders_combine_as_kubectl_apply():
    """`-f dir1 -f dir2`: the same resource twice is kept once; a different redefinition is an error
    naming both places (issue 13 item 3)."""
    dr = """\
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: same}
    spec: {host: a}
    """
    vs = """\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: same}
    spec: {hosts: [a], http: [{route: [{destination: {host: a}}]}]}
    """
    other_ns = dr.replace("{name: same}", "{name: same, namespace: other}")
    explicit_default = dr.replace("{name: same}", "{name: same, namespace: default, resourceVersion: '7'}")
    s = compile_sources({"one.yaml": textwrap.dedent(dr + "---\n" + vs).encode(),
                         "two.yaml": textwrap.dedent(explicit_default + "---\n" + other_ns).encode()})
    assert [w.split(": ", 3)[2] for w in s.warnings] == ["spec.http[0].route[0].destination.host"]  # only that
    changed = dr.replace("{host: a}", "{host: b}")
    with pytest.raises(ConfigError) as ei:
        compile_sources({"one.yaml": textwrap.dedent(dr + "---\n" + vs).encode(),
                         "two.yaml": textwrap.dedent(vs + "---\n" + changed).encode()})
    assert ei.value.problems == [
        "two.yaml: DestinationRule same: metadata.name: conflicting redefinition of DestinationRule default/same: "
        "already defined with different content in one.yaml document 1"]


def test_seed_scenario_folders_combine():
    s = compile_sources(read_sources([os.path.join(SEED, "1-retry"), os.path.join(SEED, "3-lb-random")]))
    assert "outbound|80||retry-service" in s.clusters and "outbound|80||myweb-service" in s.clusters


def test_semantic_errors():
    """What Istio's validator rejects (pkg/config/validation), with file, document and field."""
    p = problems("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: none}
    spec: {hosts: [n], ports: [{number: 80, name: http}], endpoints: [{address: 10.0.0.1}]}
    ---
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: static}
    spec:
      hosts: [s, "*.wild.com", "*"]
      ports: [{number: 80, name: http, protocol: HTTP}, {number: 80, name: http2, protocol: HTTP}, {number: 81, name: http, protocol: HTTP}, {number: 82, name: Bad_Name, protocol: QUIC}]
      resolution: STATIC
      endpoints: [{address: not-an-ip}, {address: "unix://relative"}]
      workloadSelector: {labels: {app: x}}
    ---
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: dyn}
    spec: {hosts: [p.example.com], resolution: DYNAMIC_DNS, addresses: [10.0.0.0/8]}
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: dr}
    spec:
      host: s
      trafficPolicy:
        loadBalancer: {simple: PASSTHROUGH, consistentHash: {httpHeaderName: u, useSourceIp: true}}
        connectionPool: {tcp: {connectTimeout: 0s}, http: {maxRequestsPerConnection: -1}}
        portLevelSettings: [{port: {number: 80}, loadBalancer: {simple: RANDOM}}, {port: {number: 80}, loadBalancer: {simple: RANDOM}}, {}]
      subsets: [{name: v1}, {name: v1}]
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: vs}
    spec:
      hosts: [s, s]
      http:
      - {timeout: 1s}
      - route: [{destination: {host: s}, weight: 0}, {destination: {host: s, subset: v1}}]
      - route: [{destination: {host: s}}]
        redirect: {uri: /x}
    """)
    assert p == [
        'rules.yaml: ServiceEntry none: spec.endpoints: no endpoints should be provided for resolution type none',
        'rules.yaml: ServiceEntry static: spec: only one of WorkloadSelector or Endpoints is allowed in Service Entry',
        'rules.yaml: ServiceEntry static: spec.hosts[2]: invalid host *',
        'rules.yaml: ServiceEntry static: spec.ports[1].number: service entry port 80 already defined',
        "rules.yaml: ServiceEntry static: spec.ports[2].name: service entry port name 'http' already defined",
        'rules.yaml: ServiceEntry static: spec.ports[3].name: invalid port name: Bad_Name',
        'rules.yaml: ServiceEntry static: spec.ports[3].protocol: unsupported protocol: QUIC',
        "rules.yaml: ServiceEntry static: spec.endpoints[0].address: endpoint address 'not-an-ip' is not a valid IP address",
        'rules.yaml: ServiceEntry static: spec.endpoints[1].address: relative is not an absolute path to a file',
        'rules.yaml: ServiceEntry static: spec.endpoints[1]: exactly 1 service port required for unix endpoints',
        'rules.yaml: ServiceEntry static: spec.hosts: multiple hosts provided with non-HTTP, non-TLS ports',
        'rules.yaml: ServiceEntry dyn: spec.addresses: CIDR addresses are allowed only for NONE/STATIC resolution types',
        'rules.yaml: ServiceEntry dyn: spec.hosts[0]: host must be wildcarded for resolution mode DYNAMIC_DNS',
        'rules.yaml: ServiceEntry dyn: spec.addresses: addresses cannot be set for resolution type DYNAMIC_DNS. HTTP route domains will only be generated from the hosts field values',
        'rules.yaml: ServiceEntry dyn: spec.location: location must be MESH_EXTERNAL or MESH_INTERNAL for resolution type DYNAMIC_DNS',
        'rules.yaml: DestinationRule dr: spec.trafficPolicy.connectionPool.http.maxRequestsPerConnection: max requests per connection must be non-negative',
        'rules.yaml: DestinationRule dr: spec.trafficPolicy.connectionPool.tcp.connectTimeout: duration must be greater than 1ms',
        'rules.yaml: DestinationRule dr: spec.trafficPolicy.portLevelSettings[2].port: portTrafficPolicy must have valid port',
        'rules.yaml: DestinationRule dr: spec.trafficPolicy.portLevelSettings[2]: port traffic policy must have at least one field',
        'rules.yaml: DestinationRule dr: spec.subsets[1].name: duplicate subset names: v1',
        'rules.yaml: DestinationRule dr: spec.trafficPolicy.loadBalancer: only one of simple or consistentHash may be set',
        'rules.yaml: DestinationRule dr: spec.trafficPolicy.loadBalancer.consistentHash: only one hash key may be set, got httpHeaderName, useSourceIp',
        'rules.yaml: DestinationRule dr: spec.trafficPolicy.portLevelSettings[1].port.number: duplicate port 80',
        'rules.yaml: VirtualService vs: spec.hosts[1]: duplicate hosts in virtual service: s & s',
        'rules.yaml: VirtualService vs: spec.http[0]: HTTP route, redirect or direct_response is required',
        'rules.yaml: VirtualService vs: spec.http[1].route: total destination weight = 0',
        'rules.yaml: VirtualService vs: spec.http[2]: HTTP route cannot contain both route and redirect',
    ]


def test_all_weights_zero_is_an_error():
    p = problems(with_se("""\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: vs}
    spec:
      hosts: [web]
      http: [{route: [{destination: {host: web}, weight: 0}, {destination: {host: web}}]}]
    """))
    assert p == ["rules.yaml: VirtualService vs: spec.http[0].route: total destination weight = 0"]


def test_null_means_unset():
    s = snap(with_se("""\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: vs, labels: ~}
    spec:
      hosts: [web]
      gateways: ~
      http:
      - route: [{destination: {host: web, subset: ~}}]
        retries:
        timeout: ~
    """))
    assert s.warnings == ()
    assert s.vhosts["web"].routes[0].destinations[0].cluster == "outbound|80||web"


# ================================================================================================
# Warnings for fields not implemented yet


def tails(s):
    return [w.split(": ", 2)[2] for w in s.warnings]


def test_virtual_service_fields_decode_and_only_the_unimplemented_warn():
    s = snap(with_se("""\
    apiVersion: networking.istio.io/v1alpha3
    kind: VirtualService
    metadata: {name: vs}
    spec:
      hosts: [web]
      exportTo: ["."]
      http:
      - match:
        - uri: {prefix: /}
          sourceLabels: {app: a}
          gateways: [mesh]
          sourceNamespace: ns
          port: 80
          scheme: {exact: http}
          statPrefix: s
          name: m
        route:
        - destination: {host: web}
          headers: {request: {set: {a: b}}}
        retries: {attempts: 3}
        fault: {abort: {httpStatus: 500, percentage: {value: 10}}}
        mirror: {host: web}
        mirrorPercentage: {value: 50}
        mirror_percent: 50
        headers: {response: {remove: [x]}}
        rewrite: {uri: /x}
        corsPolicy: {allowOrigins: [{exact: "*"}]}
      - redirect: {uri: /new}
      - directResponse: {status: 503}
      - delegate: {name: d}
      tcp: [{route: [{destination: {host: web}}]}]
      tls: [{match: [{sniHosts: [web]}], route: [{destination: {host: web}}]}]
    """), namespace="ns", labels={"app": "a"})
    assert tails(s) == [
        'spec.http[0].mirror_percent: using deprecated setting "mirrorPercent", use "mirrorPercentage" instead',
        "spec.tcp: TCP routes are not implemented (HTTP/1.1 only); ignored",
        "spec.tls: TLS routes are not implemented (HTTP/1.1 only); ignored",
        "spec.http[3].delegate: delegate VirtualService ns/d not found; route ignored",
        "spec.http[0].match[0].statPrefix: meshcore keeps no per-route stats; ignored",
        "spec.http[0].mirror_percent: mirror_percent is ignored when mirrorPercentage is set",
    ]
    routes = s.vhosts["web"].routes
    assert [r.name for r in routes] == ["vs.m", "vs", "vs"]
    assert routes[0].destinations[0].rewrite.prefix == (b"/", b"/x", False)
    assert routes[0].cors is not None
    assert routes[1].destinations == () and routes[1].direct.path == b"/new"
    assert routes[2].direct.reply.status == 503
    # another workload (labels, namespace) does not get the sourceLabels/sourceNamespace route
    other = snap(with_se(vs_text := """\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: vs}
    spec:
      hosts: [web]
      http:
      - match: [{sourceLabels: {app: a}, name: only-a}]
        route: [{destination: {host: web}}]
      - match: [{gateways: [edge], name: gw-only}, {sourceNamespace: other, name: other-ns}, {port: 8080, name: p8080}]
        route: [{destination: {host: web}}]
      - route: [{destination: {host: web}}]
    """))
    assert [r.name for r in other.vhosts["web"].routes] == ["vs"]
    mine = snap(with_se(vs_text), labels={"app": "a", "version": "v1"})
    assert [r.name for r in mine.vhosts["web"].routes] == ["vs.only-a", "vs"]


def test_istio_14_fields_decode_and_warn():
    s = snap(with_se("""\
    apiVersion: networking.istio.io/v1alpha3
    kind: VirtualService
    metadata: {name: vs}
    spec:
      hosts: [web]
      http:
      - route:
        - destination: {host: web}
          appendRequestHeaders: {a: b}
        websocketUpgrade: true
        appendHeaders: {x: y}
        removeResponseHeaders: [z]
        fault: {abort: {percent: 10, httpStatus: 503}, delay: {percent: 5, fixedDelay: 1s}}
        corsPolicy: {allowOrigin: ["*"]}
    ---
    apiVersion: networking.istio.io/v1alpha3
    kind: DestinationRule
    metadata: {name: dr}
    spec:
      host: web
      trafficPolicy:
        loadBalancer: {consistentHash: {httpCookie: {name: c, ttl: 0s}, minimumRingSize: 1024}}
        outlierDetection: {consecutiveErrors: 2, consecutive5xxErrors: 3, baseEjectionTime: 1m}
        tls: {mode: ISTIO_MUTUAL}
    """))
    assert tails(s) == [
        'spec.http[0].websocketUpgrade: an Istio <= 1.4 field, ignored: Istio >= 1.5 lets every route carry WebSocket upgrades',
        'spec.http[0].appendHeaders: removed in Istio 1.5 (use headers); ignored',
        'spec.http[0].removeResponseHeaders: removed in Istio 1.5 (use headers); ignored',
        'spec.http[0].route[0].appendRequestHeaders: removed in Istio 1.5 (use headers); ignored',
        'spec.http[0].corsPolicy.allowOrigin: deprecated: use allowOrigins',
        'spec.http[0].fault.abort.percent: abort.percent (Istio <= 1.4) is ignored by current Istio; use abort.percentage',
        'spec.http[0].fault.abort.percentage: no percentage (or 0%): the abort is never injected',
        "spec.trafficPolicy.loadBalancer.consistentHash.minimumRingSize: consistent hash MinimumRingSize is deprecated, use ConsistentHashLB's RingHash configuration instead",
        'spec.trafficPolicy: outlierDetection.consecutiveErrors is deprecated: applied as Istio 1.4 did (consecutive_gateway_failure=2, 502/503/504 and connection failures only; 5xx not enforced). Istio >= 1.7 ignores it and falls back to 5 consecutive 5xx; use consecutiveGatewayErrors / consecutive5xxErrors',
        "spec.trafficPolicy.tls.mode: ISTIO_MUTUAL needs Istio's workload certificates, which meshcore has not; traffic to this destination is sent in plaintext",
    ]


def test_destination_rule_unimplemented_fields_warn():
    s = snap(with_se("""\
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: dr}
    spec:
      host: web
      workloadSelector: {matchLabels: {app: x}}
      exportTo: ["."]
      trafficPolicy:
        loadBalancer:
          simple: ROUND_ROBIN
          zoneAwareLbSetting: {enabled: true}
          warmupDurationSecs: 10s
        connectionPool:
          tcp: {maxConnections: 1, connectTimeout: 1s, tcpKeepalive: {probes: 1}, maxConnectionDuration: 1h, idleTimeout: 1s}
          http: {http1MaxPendingRequests: 1, http2MaxRequests: 1, maxRequestsPerConnection: 1, maxRetries: 1,
                 idleTimeout: 1s, h2UpgradePolicy: UPGRADE, useClientProtocol: false, maxConcurrentStreams: 1}
        outlierDetection: {consecutive5xxErrors: 1}
        tls: {mode: DISABLE}
        tunnel: {targetHost: h, targetPort: 1}
        retryBudget: {percent: 20}
        portLevelSettings:
        - port: {number: 80}
          loadBalancer: {simple: RANDOM, warmup: {duration: 1s}}
          tls: {mode: SIMPLE}
      subsets:
      - name: v1
        labels: {version: v1}
        trafficPolicy: {outlierDetection: {interval: 1s}}
    """), labels={"app": "x"})  # the workloadSelector selects this workload
    base = "spec.trafficPolicy"
    assert tails(s) == [
        'spec.trafficPolicy.loadBalancer.zoneAwareLbSetting: not implemented yet; ignored',
        'spec.trafficPolicy.connectionPool.tcp.tcpKeepalive: not implemented yet; ignored',
        'spec.trafficPolicy.connectionPool.tcp.maxConnectionDuration: not implemented yet; ignored',
        'spec.trafficPolicy.connectionPool.tcp.idleTimeout: not implemented yet; ignored',
        'spec.trafficPolicy.connectionPool.http.h2UpgradePolicy: not implemented yet; ignored',
        'spec.trafficPolicy.connectionPool.http.useClientProtocol: not implemented yet; ignored',
        'spec.trafficPolicy.connectionPool.http.maxConcurrentStreams: not implemented yet; ignored',
        'spec.trafficPolicy.portLevelSettings[0].loadBalancer.warmup: slow start applies to ROUND_ROBIN and LEAST_REQUEST only (Envoy); ignored',
        'spec.trafficPolicy.tunnel: not implemented yet; ignored',
        'spec.trafficPolicy.retryBudget: not implemented yet; ignored',
    ]


def test_service_entry_harmless_metadata_does_not_warn():
    s = snap("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: se, namespace: default, labels: {a: b}, annotations: {x: y}, uid: u, generation: 3}
    spec:
      hosts: [x.example.com]
      addresses: [10.9.0.0/16]
      location: MESH_EXTERNAL
      exportTo: ["."]
      subjectAltNames: ["spiffe://x"]
      ports: [{number: 80, name: http, protocol: http}]
      resolution: STATIC
      endpoints: [{address: 10.9.0.1, locality: r/z, network: n, serviceAccount: sa}]
    status: {}
    """)
    assert s.warnings == ()


def test_non_http_ports_are_ignored_with_a_warning():
    s = snap("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: se}
    spec:
      hosts: [db]
      ports: [{number: 5432, name: tcp-pg, protocol: TCP}, {number: 8080, name: grpc, protocol: GRPC}]
      resolution: STATIC
      endpoints: [{address: 10.0.0.9}]
    """)
    assert tails(s) == ["spec.ports[0].protocol: protocol TCP is not supported (HTTP/1.1 only); port ignored",
                        "spec.ports[1].protocol: protocol GRPC is proxied as HTTP/1.1"]
    assert set(s.clusters) == {"outbound|8080||db"}


def test_gateway_only_virtual_service_is_ignored_with_warning():
    s = snap(with_se("""\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: vs}
    spec:
      hosts: [web]
      gateways: [istio-system/ingress]
      http: [{timeout: 5s, route: [{destination: {host: web, subset: v1}}]}]
    """))
    assert tails(s) == ["spec.gateways: does not include 'mesh': applies to gateways only; ignored by the sidecar"]
    assert s.vhosts["web"].routes[0].name == "default"
    s2 = snap(with_se("""\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: vs}
    spec:
      hosts: [web]
      gateways: [istio-system/ingress, mesh]
      http: [{timeout: 5s, route: [{destination: {host: web}}]}]
    """))
    assert s2.warnings == () and s2.vhosts["web"].routes[0].timeout == 5.0


# ================================================================================================
# ServiceEntry / WorkloadEntry -> clusters


def test_endpoint_port_precedence_and_weight():
    s = snap("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: se}
    spec:
      hosts: [svc]
      ports:
      - {number: 80, name: http, targetPort: 8080}
      - {number: 81, name: admin}
      resolution: STATIC
      endpoints:
      - {address: 10.0.0.1, ports: {http: 9000, admin: 9001}, weight: 3}
      - {address: 10.0.0.2, weight: 0}
      - {address: "::1"}
    """)
    c80 = s.clusters["outbound|80||svc"]
    assert [(e.address, e.port, e.weight, e.key) for e in c80.endpoints] == [
        ("10.0.0.1", 9000, 3, "10.0.0.1:9000"), ("10.0.0.2", 8080, 1, "10.0.0.2:8080"), ("::1", 8080, 1, "[::1]:8080")]
    assert eps(s.clusters["outbound|81||svc"]) == [("10.0.0.1", 9001), ("10.0.0.2", 81), ("::1", 81)]
    assert s.vhosts["svc"] is s.vhosts["svc:80"]
    # Istio's validator: an endpoint port must name a service port
    p = problems("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: se}
    spec:
      hosts: [svc]
      ports: [{number: 80, name: http}]
      resolution: STATIC
      endpoints: [{address: "::1", ports: {other: 1}}]
    """)
    assert p == ["rules.yaml: ServiceEntry se: spec.endpoints[0].ports.other: endpoint port 1 is not defined by the "
                 "service entry"]


def test_bare_host_prefers_port_80_else_first_port():
    s = snap("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: a}
    spec: {hosts: [a], ports: [{number: 9090, name: x}, {number: 80, name: y}], resolution: STATIC}
    ---
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: b}
    spec: {hosts: [B.Example.com], ports: [{number: 9090, name: x}, {number: 8080, name: y}], resolution: STATIC}
    """)
    assert s.vhosts["a"] is s.vhosts["a:80"]
    assert s.vhosts["b.example.com"] is s.vhosts["b.example.com:9090"]
    assert s.vhosts["b.example.com:8080"].name == "b.example.com:8080"
    assert s.clusters["outbound|9090||b.example.com"].endpoints == ()


def test_workload_entries_selected_by_labels_in_namespace():
    s = snap("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: se}
    spec:
      hosts: [svc]
      ports: [{number: 80, name: http, targetPort: 8000}]
      resolution: STATIC
      workloadSelector: {labels: {app: svc}}
    ---
    apiVersion: networking.istio.io/v1
    kind: WorkloadEntry
    metadata: {name: w1}
    spec: {address: 10.0.0.1, labels: {app: svc, version: v1}, ports: {http: 9999}}
    ---
    apiVersion: networking.istio.io/v1beta1
    kind: WorkloadEntry
    metadata: {name: w2, namespace: default}
    spec: {address: 10.0.0.2, labels: {app: svc, version: v2}, weight: 5}
    ---
    apiVersion: networking.istio.io/v1
    kind: WorkloadEntry
    metadata: {name: w3, namespace: elsewhere}
    spec: {address: 10.0.0.3, labels: {app: svc}}
    ---
    apiVersion: networking.istio.io/v1
    kind: WorkloadEntry
    metadata: {name: w4}
    spec: {address: 10.0.0.4, labels: {app: other}}
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: dr}
    spec: {host: svc, subsets: [{name: v2, labels: {version: v2}}]}
    """)
    assert [(e.address, e.port, e.weight) for e in s.clusters["outbound|80||svc"].endpoints] == [
        ("10.0.0.1", 9999, 1), ("10.0.0.2", 8000, 5)]
    assert eps(s.clusters["outbound|80|v2|svc"]) == [("10.0.0.2", 8000)]


def test_workload_entry_address_errors_name_the_workload_entry():
    p = problems("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: se}
    spec:
      hosts: [svc]
      ports: [{number: 80, name: http}]
      resolution: STATIC
      workloadSelector: {labels: {app: svc}}
    ---
    apiVersion: networking.istio.io/v1
    kind: WorkloadEntry
    metadata: {name: w1}
    spec: {address: db.internal, labels: {app: svc}}
    """)
    assert p == ["rules.yaml: WorkloadEntry w1: spec.address: address 'db.internal' is not an IP address (resolution STATIC)"]


def test_dns_resolution():
    resolver = fake_resolver({"a.internal": ["10.0.0.1", "10.0.0.2"], "ext.example.com": ["192.0.2.7", "2001:db8::1"]})
    s = snap("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: dns}
    spec:
      hosts: [svc]
      ports: [{number: 80, name: http}]
      resolution: DNS
      endpoints: [{address: a.internal, labels: {version: v1}}, {address: 10.9.9.9}]
    ---
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: ext}
    spec:
      hosts: [ext.example.com]
      ports: [{number: 443, name: http-tls, targetPort: 80}]
      resolution: DNS
    ---
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: broken}
    spec:
      hosts: [broken]
      ports: [{number: 80, name: http}]
      resolution: DNS
      endpoints: [{address: nowhere.invalid}]
    """, resolver=resolver)
    c = s.clusters["outbound|80||svc"]
    assert [(e.address, e.port, e.labels) for e in c.endpoints] == [
        ("10.0.0.1", 80, (("version", "v1"),)), ("10.0.0.2", 80, (("version", "v1"),)), ("10.9.9.9", 80, ())]
    assert [e.key for e in s.clusters["outbound|443||ext.example.com"].endpoints] == ["192.0.2.7:80", "[2001:db8::1]:80"]
    assert s.clusters["outbound|80||broken"].endpoints == ()
    assert s.warnings == ("rules.yaml: ServiceEntry broken: spec.endpoints[0].address: DNS lookup of 'nowhere.invalid' "
                          "failed (Name or service not known); no endpoints",)


def test_dns_round_robin_uses_one_address():
    s = snap("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: dns}
    spec: {hosts: [svc], ports: [{number: 80, name: http}], resolution: DNS_ROUND_ROBIN}
    """, resolver=fake_resolver({"svc": ["10.0.0.1", "10.0.0.2"]}))
    assert eps(s.clusters["outbound|80||svc"]) == [("10.0.0.1", 80)]


def test_service_entries_with_same_host_merge():
    s = snap(with_se("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: web-more}
    spec:
      hosts: [web]
      ports: [{number: 80, name: web, targetPort: 8080}, {number: 90, name: other}]
      resolution: STATIC
      endpoints: [{address: 10.0.0.3, labels: {version: v1}}]
    """))
    assert eps(s.clusters["outbound|80||web"]) == [("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 8080)]
    assert eps(s.clusters["outbound|90||web"]) == [("10.0.0.3", 90)]


# ================================================================================================
# DestinationRule policy resolution (§2.1) and LB mapping (§2.3)


@pytest.mark.parametrize("simple,lb", [("ROUND_ROBIN", LB_ROUND_ROBIN), ("RANDOM", LB_RANDOM),
                                       ("LEAST_REQUEST", LB_LEAST_REQUEST), ("LEAST_CONN", LB_LEAST_REQUEST),
                                       ("UNSPECIFIED", LB_LEAST_REQUEST), (None, LB_LEAST_REQUEST)])
def test_lb_mapping(simple, lb):
    policy = f"trafficPolicy: {{loadBalancer: {{simple: {simple}}}}}" if simple else ""
    s = snap(with_se(f"""\
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {{name: dr}}
    spec:
      host: web
      {policy}
    """))
    assert s.clusters["outbound|80||web"].lb == lb


def test_no_destination_rule_defaults():
    c = snap(SE_WEB).clusters["outbound|80||web"]
    assert (c.lb, c.connect_timeout, c.idle_timeout, c.max_requests_per_connection, c.subset) == (
        LB_LEAST_REQUEST, 10.0, 3600.0, 0, "")


def test_policy_resolution_order():
    se = """\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: se}
    spec:
      hosts: [svc]
      ports: [{number: 80, name: http}, {number: 81, name: http-b}]
      resolution: STATIC
      endpoints: [{address: 10.0.0.1, labels: {v: "1"}}, {address: 10.0.0.2, labels: {v: "2"}}]
    """
    s = snap(textwrap.dedent(se) + textwrap.dedent("""\
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: dr}
    spec:
      host: svc
      trafficPolicy:
        loadBalancer: {simple: ROUND_ROBIN}
        connectionPool: {tcp: {connectTimeout: 250ms}, http: {idleTimeout: 30s, maxRequestsPerConnection: 5}}
        portLevelSettings:
        - port: {number: 81}
          connectionPool: {http: {maxRequestsPerConnection: 7}}
      subsets:
      - name: a
        labels: {v: "1"}
        trafficPolicy: {loadBalancer: {simple: RANDOM}}
      - name: b
        labels: {v: "2"}
        trafficPolicy:
          connectionPool: {tcp: {connectTimeout: 2s}}
          portLevelSettings:
          - port: {number: 81}
            loadBalancer: {simple: LEAST_CONN}
    """))
    c = s.clusters

    def view(name):
        x = c[name]
        return (x.lb, x.connect_timeout, x.idle_timeout, x.max_requests_per_connection)

    # top level
    assert view("outbound|80||svc") == (LB_ROUND_ROBIN, 0.25, 30.0, 5)
    # port-level replaces wholesale: LB and the rest of the pool fall to defaults
    assert view("outbound|81||svc") == (LB_LEAST_REQUEST, 10.0, 3600.0, 7)
    # subset overrides only the components it sets
    assert view("outbound|80|a|svc") == (LB_RANDOM, 0.25, 30.0, 5)
    assert view("outbound|81|a|svc") == (LB_RANDOM, 10.0, 3600.0, 7)
    assert view("outbound|80|b|svc") == (LB_ROUND_ROBIN, 2.0, 3600.0, 0)
    # the subset's own port-level settings replace wholesale
    assert view("outbound|81|b|svc") == (LB_LEAST_REQUEST, 10.0, 3600.0, 0)
    assert eps(c["outbound|80|a|svc"]) == [("10.0.0.1", 80)]
    assert eps(c["outbound|81|b|svc"]) == [("10.0.0.2", 81)]
    assert c["outbound|81|b|svc"].subset == "b" and c["outbound|81|b|svc"].port == 81


def test_wildcard_destination_rule_and_merge():
    s = snap("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: se}
    spec: {hosts: [a.example.com, b.example.com], ports: [{number: 80, name: http, protocol: HTTP}], resolution: STATIC}
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: wild}
    spec: {host: "*.example.com", trafficPolicy: {loadBalancer: {simple: RANDOM}}}
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: exact}
    spec: {host: b.example.com, subsets: [{name: s1}]}
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: exact2}
    spec: {host: b.example.com, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}, subsets: [{name: s1}, {name: s2}]}
    """)
    assert s.clusters["outbound|80||a.example.com"].lb == LB_RANDOM
    assert s.clusters["outbound|80||b.example.com"].lb == LB_ROUND_ROBIN
    assert {"outbound|80|s1|b.example.com", "outbound|80|s2|b.example.com"} <= set(s.clusters)
    assert tails(s) == ["spec.subsets[0]: subset 's1' of host 'b.example.com' already defined in "
                        "rules.yaml: DestinationRule exact; ignored"]


# ================================================================================================
# VirtualService -> routes


def test_destinations_weights_ports_and_missing_targets():
    s = snap("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: se}
    spec:
      hosts: [multi]
      ports: [{number: 80, name: http}, {number: 8080, name: alt}]
      resolution: STATIC
      endpoints: [{address: 10.0.0.1}]
    ---
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: one}
    spec: {hosts: [one], ports: [{number: 9000, name: http}], resolution: STATIC, endpoints: [{address: 10.0.0.2}]}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: vs}
    spec:
      hosts: [multi]
      http:
      - match: [{headers: {x: {exact: "1"}}}]
        route: [{destination: {host: one}, weight: 30}]
        timeout: 1.5s
      - match: [{headers: {x: {exact: "2"}}}]
        route:
        - {destination: {host: multi}, weight: 3}
        - {destination: {host: one}, weight: 0}
        - {destination: {host: multi, port: {number: 8080}}, weight: 1}
      - match: [{headers: {x: {exact: "3"}}}]
        route:
        - {destination: {host: ghost}, weight: 50}
        - {destination: {host: one, subset: nope}, weight: 50}
        - {destination: {host: one, port: {number: 1}}, weight: 50}
      - route: [{destination: {host: multi}}]
    """)
    for port in (80, 8080):
        r = s.vhosts[f"multi:{port}"].routes
        assert [(d.cluster, d.weight) for d in r[0].destinations] == [("outbound|9000||one", 100)]
        assert r[0].timeout == 1.5 and r[0].total_weight == 100
        assert [(d.cluster, d.weight) for d in r[1].destinations] == [
            (f"outbound|{port}||multi", 3), ("outbound|8080||multi", 1)]
        assert r[1].total_weight == 4 and r[1].timeout == 0.0
        assert [d.cluster for d in r[2].destinations] == [
            f"outbound|{port}||ghost.default.svc.cluster.local", "outbound|9000|nope|one", "outbound|1||one"]
        assert r[2].total_weight == 150
        assert [d.cluster for d in r[3].destinations] == [f"outbound|{port}||multi"]
    assert s.clusters["outbound|80||ghost.default.svc.cluster.local"].endpoints == ()
    assert s.clusters["outbound|9000|nope|one"].endpoints == ()
    assert s.clusters["outbound|1||one"].endpoints == ()
    assert tails(s) == [
        "spec.http[2].route[0].destination.host: host 'ghost.default.svc.cluster.local' has no ServiceEntry; "
        "cluster outbound|80||ghost.default.svc.cluster.local has no endpoints",
        "spec.http[2].route[1].destination.subset: subset 'nope' is not defined by a DestinationRule for 'one'; "
        "cluster outbound|9000|nope|one has no endpoints",
        "spec.http[2].route[2].destination.port: service 'one' has no port 1; cluster outbound|1||one has no endpoints",
        "spec.http[2].route[0].destination.host: host 'ghost.default.svc.cluster.local' has no ServiceEntry; "
        "cluster outbound|8080||ghost.default.svc.cluster.local has no endpoints",
    ]


def test_virtual_service_for_host_without_service_entry():
    s = snap("""\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: vs}
    spec:
      hosts: [nowhere.local, "*.wild.local"]
      http: [{route: [{destination: {host: nowhere.local}}]}]
    """)
    assert set(s.vhosts) == {"nowhere.local", "nowhere.local:80", "*.wild.local", "*.wild.local:80"}
    assert s.vhosts["nowhere.local"].routes[0].destinations[0].cluster == "outbound|80||nowhere.local"
    assert s.clusters["outbound|80||nowhere.local"].endpoints == ()
    assert tails(s) == ["spec.http[0].route[0].destination.host: host 'nowhere.local' has no ServiceEntry; "
                        "cluster outbound|80||nowhere.local has no endpoints"]


def test_wildcard_virtual_service_applies_to_service_hosts_exact_wins():
    s = snap("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: se}
    spec: {hosts: [a.example.com, b.example.com], ports: [{number: 80, name: http, protocol: HTTP}], resolution: STATIC}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: wild}
    spec: {hosts: ["*.example.com"], http: [{timeout: 1s, route: [{destination: {host: a.example.com}}]}]}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: exact}
    spec: {hosts: [B.example.com], http: [{timeout: 2s, route: [{destination: {host: b.example.com}}]}]}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: dup}
    spec: {hosts: [b.example.com], http: [{timeout: 3s, route: [{destination: {host: b.example.com}}]}]}
    """)
    assert s.vhosts["a.example.com"].routes[0].name == "wild"
    assert s.vhosts["b.example.com"].routes[0].name == "exact"
    assert s.vhosts["*.example.com"].routes[0].timeout == 1.0
    assert tails(s) == ["spec.hosts[0]: host 'b.example.com' is already bound by "
                        "rules.yaml: VirtualService exact; ignored for this host"]


def test_route_names_with_named_matches():
    s = snap(with_se("""\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: vs}
    spec:
      hosts: [web]
      http:
      - name: api
        match: [{name: v1, uri: {prefix: /v1}}, {uri: {prefix: /old}}, {name: v2, uri: {prefix: /v2}}]
        route: [{destination: {host: web}}]
      - name: rest
        match: [{uri: {prefix: /a}}, {uri: {prefix: /b}}]
        route: [{destination: {host: web}}]
      - route: [{destination: {host: web}}]
    """))
    routes = s.vhosts["web"].routes
    assert [(r.name, len(r.matches)) for r in routes] == [("api.v1", 1), ("api", 1), ("api.v2", 1), ("rest", 2), ("vs", 1)]


# ================================================================================================
# hashing, dump, pickling, schema names


def test_config_hash():
    a = {"a.yaml": SE_WEB.encode(), "b.yaml": b""}
    s1 = compile_sources(a, generation=7)
    s2 = compile_sources(dict(reversed(list(a.items()))))
    assert s1.generation == 7
    assert s1.config_hash == s2.config_hash == config_hash(a)
    assert re.fullmatch(r"[0-9a-f]{64}", s1.config_hash)
    assert compile_sources({"a.yaml": SE_WEB.encode() + b"\n"}).config_hash != s1.config_hash


def test_dump_is_readable_json():
    s = demo()
    d = orjson.loads(snapshot_to_json(s))
    assert d == snapshot_to_dict(s)
    vh = {v["name"]: v for v in d["virtual_hosts"]}
    assert vh["split-service:80"]["domains"] == sorted({"split-service", "split-service:80"}
                                                       | kube_alt_names("split-service"))
    r = vh["split-service:80"]["routes"][0]
    assert r["match"] == [{"path": {"prefix": "/"}}]
    assert r["route"] == [{"cluster": "outbound|80|v1|split-service", "weight": 80},
                          {"cluster": "outbound|80|v2|split-service", "weight": 20}]
    cl = {c["name"]: c for c in d["clusters"]}
    assert cl["outbound|80|v2|myweb-service"]["endpoints"][0] == {
        "address": "127.0.0.1", "port": 18084, "weight": 1, "labels": {"app": "myweb", "version": "v2"},
        "key": "127.0.0.1:18084", "locality": ""}
    assert cl["outbound|80|v2|myweb-service"]["lb_policy"] == "RANDOM"
    assert (cl["outbound|80|v2|myweb-service"]["discovery"], cl["outbound|80|v2|myweb-service"]["tls"]) == ("STATIC", None)
    s2 = snap(with_se(vs_with_match('{name: m, uri: {regex: "/r+"}, ignoreUriCase: true, method: {exact: GET}, '
                                    'headers: {x: {}}, withoutHeaders: {y: {prefix: a}}, queryParams: {q: {exact: "1"}}}')
                      .replace("hosts: [a]", "hosts: [web]").replace("host: a}", "host: web}")))
    d2 = snapshot_to_dict(s2)
    (route,) = [v for v in d2["virtual_hosts"] if v["name"] == "web:80"][0]["routes"]
    assert route["match"] == [{"name": "m", "path": {"regex": "/r+"}, "method": {"exact": "GET"},
                               "headers": [{"name": "x", "present": True},
                                           {"name": "y", "prefix": "a", "invert": True}],
                               "query_params": [{"name": "q", "exact": "1"}]}]


def test_snapshot_pickles():
    s = demo()
    s2 = pickle.loads(pickle.dumps(s))
    assert set(s2.vhosts) == set(s.vhosts)
    assert s2.clusters == s.clusters
    assert snapshot_to_dict(s2) == snapshot_to_dict(s)


def _proto_json_name(name: str) -> str:
    out, up = [], False
    for ch in name:
        if ch == "_":
            up = True
        else:
            out.append(ch.upper() if up else ch)
            up = False
    return "".join(out)


def test_yaml_names_are_protobuf_json_names():
    seen = set()
    specials = {"mirror_percent": "mirror_percent", "from_": "from", "bytes_": "bytes"}

    def visit(t):
        if isinstance(t, mi.StructType):
            if t.cls in seen:
                return
            seen.add(t.cls)
            assert t.forbid_unknown_fields, t.cls
            for f in t.fields:
                assert f.encode_name == specials.get(f.name, _proto_json_name(f.name)), (t.cls, f.name)
                visit(f.type)
        elif isinstance(t, mi.UnionType):
            for x in t.types:
                visit(x)
        elif isinstance(t, (mi.ListType, mi.VarTupleType)):
            visit(t.item_type)
        elif isinstance(t, mi.DictType):
            visit(t.value_type)

    for cls in istio.RESOURCE_TYPES.values():
        visit(mi.type_info(cls))
        assert cls.__struct_config__.frozen
    assert len(seen) > 60


def test_structs_decode_directly_with_msgspec():
    vs = msgspec.convert({"hosts": ["a"], "http": [{"timeout": "2s", "mirror_percent": 5}]},
                         istio.VirtualService, dec_hook=istio.dec_hook)
    assert vs.http[0].timeout.seconds == 2.0 and vs.http[0].mirror_percent == 5
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"hosts": ["a"], "http": [{"mirrorPercent": 5}]}, istio.VirtualService, dec_hook=istio.dec_hook)
