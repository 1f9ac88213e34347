"""Compile Istio YAML/JSON sources into an immutable `Snapshot` (off the hot path).

Rules of this module:
- `compile_sources` validates the WHOLE input and raises one `ConfigError` listing every problem,
  each formatted `<file>: <Kind> <name>: <field path>: <problem>` (or `<file>: document <N>: ...`
  when the document has no usable kind/name). Nothing is half-applied: either a complete
  Snapshot comes back or an error does.
- Fields meshcore decodes but does not implement yet are never dropped silently: each one set in the
  config becomes a warning (`...: not implemented yet; ignored`) in `Snapshot.warnings`.
- Istio semantics (semantics.md §1, §2, §12): clusters `outbound|<port>|<subset>|<host>`, policy
  resolution top-level -> portLevelSettings (wholesale) -> subset (per component, then the subset's
  own portLevelSettings wholesale), LB defaults of Istio >= 1.14, connect timeout 10 s, route timeout
  0 (none), weights of 0 dropped, a single destination takes 100 %.
- Only `resolution: DNS` touches the network (meshcore.config.dns: one lookup per name, cached and
  refreshed by the supervisor); pass `resolver=` or `dns=` to avoid it.
- The stages live in their own modules: meshcore.config.services (ServiceEntry, WorkloadEntry),
  meshcore.config.virtual_services (VirtualService, delegates, route actions), this module
  (documents, DestinationRules, clusters, virtual hosts); meshcore.config.validate is Istio's
  validator, meshcore.config.names Kubernetes naming.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Callable

import msgspec
import msgspec.inspect as mi
import orjson
import yaml

from meshcore.config import istio
from meshcore.config.report import NOT_IMPLEMENTED, Doc as _Doc, Report as _Report, key as _key
from meshcore.config.dns import DnsCache
from meshcore.config.names import DOMAIN_SUFFIX, ROOT_NAMESPACE, alt_domains, fqdn, visible
from meshcore.config.services import compile_service_entries
from meshcore.config.tls import tls_policy_from_istio
from meshcore.config.validate import check_destination_rule
from meshcore.config.virtual_services import (HttpRoute, Workload, compile_virtual_services,
                                              redirect_for)
from meshcore.routing.actions import HeaderEdits, Rewrite, Stage, re2_substitution
from meshcore.upstream.balancer import locality_lb_from_istio, slow_start_from_istio
from meshcore.upstream.breaker import breaker_limits_from_istio
from meshcore.upstream.hashkey import hash_policy_from_istio
from meshcore.upstream.outlier import outlier_policy_from_istio
from meshcore.policy.retry import DEFAULT_CONSISTENT_HASH_POLICY, retry_policy_from_istio
from meshcore.policy.retry import DEFAULT_POLICY as DEFAULT_RETRY_POLICY
from meshcore.config.policy import (
    ANY_PORT,
    DISCOVERY_ORIGINAL_DST,
    DISCOVERY_STATIC,
    LB_LEAST_REQUEST,
    LB_RANDOM,
    LB_ROUND_ROBIN,
    PER_REQUEST_DISCOVERY,
    ClusterPolicy,
    RoutePolicy,
    Snapshot,
    VirtualHostPolicy,
    WeightedCluster,
)
from meshcore.errors import ConfigError
from meshcore.routing.matchers import PathMatch, RequestMatch
from meshcore.routing.table import RouteTable

__all__ = ["compile_sources", "config_hash", "parse_documents", "NOT_IMPLEMENTED", "DEFAULT_CONNECT_TIMEOUT"]

DEFAULT_CONNECT_TIMEOUT = 10.0  # MeshConfig connectTimeout default (semantics §2.8)
DEFAULT_IDLE_TIMEOUT = 3600.0  # Envoy upstream idle timeout default (§2.12)

Resolver = Callable[[str, int], list]


# ------------------------------------------------------------------------------------------------
# Parsing: YAML (strict-ish, Kubernetes-like) and JSON


class _YamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """Safe loader that rejects duplicate keys and keeps timestamps as strings (as kubectl does)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                k = self.construct_object(key_node)
                try:
                    dup = k in seen
                except TypeError:
                    continue
                if dup:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"duplicate key {k!r}", key_node.start_mark
                    )
                seen.add(k)
        return super().construct_mapping(node, deep)


_YamlLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_documents(name: str, data: bytes) -> tuple[list[tuple[int, object]], list[str]]:
    """Split one source into `(1-based document number, decoded object)`; problems as strings.

    `.json` files are one JSON object or an array of objects; anything else is (multi-document)
    YAML. Documents before a syntax error are still returned, so they are validated too.
    """
    docs: list[tuple[int, object]] = []
    problems: list[str] = []
    if name.endswith(".json"):
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            problems.append(f"{name}: line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}")
            return docs, problems
        if isinstance(obj, list):
            docs.extend((i + 1, o) for i, o in enumerate(obj))
        else:
            docs.append((1, obj))
        return docs, problems
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        problems.append(f"{name}: invalid UTF-8 at byte {e.start}")
        return docs, problems
    n = 0
    try:
        for obj in yaml.load_all(text, Loader=_YamlLoader):
            n += 1
            docs.append((n, obj))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = e.problem or e.context or "syntax error"
        if e.context and e.problem:
            what = f"{e.problem} ({e.context})"
        problems.append(f"{name}: {where}invalid YAML: {what}")
    except yaml.YAMLError as e:
        problems.append(f"{name}: invalid YAML: {e}")
    return docs, problems


# ------------------------------------------------------------------------------------------------
# Structural validation: every type problem of a document, not only msgspec's first one


_TYPE_NAMES = {str: "str", int: "int", float: "float", bool: "bool", list: "array", dict: "object"}


def _tname(v) -> str:
    if v is None:
        return "null"
    return _TYPE_NAMES.get(type(v), type(v).__name__)


_FIELD_CACHE: dict[type, dict[str, mi.Field]] = {}


def _fields(t: mi.StructType) -> dict[str, mi.Field]:
    f = _FIELD_CACHE.get(t.cls)
    if f is None:
        f = _FIELD_CACHE[t.cls] = {x.encode_name: x for x in t.fields}
    return f


def _range(t) -> str:
    lo = t.ge if t.ge is not None else t.gt
    hi = t.le if t.le is not None else t.lt
    if lo is not None and hi is not None:
        return f" in range {lo}..{hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def _out_of_range(t, v) -> bool:
    return (
        (t.ge is not None and v < t.ge)
        or (t.gt is not None and v <= t.gt)
        or (t.le is not None and v > t.le)
        or (t.lt is not None and v >= t.lt)
    )


def _walk(t, v, path: str, out: list) -> None:
    """Check `v` against msgspec type info `t`; append `(path, problem)`; drop null struct fields."""
    if isinstance(t, mi.UnionType):
        if v is None and any(isinstance(x, mi.NoneType) for x in t.types):
            return
        t = next(x for x in t.types if not isinstance(x, mi.NoneType))
    if isinstance(t, mi.AnyType):
        return
    if isinstance(t, mi.StructType):
        if not isinstance(v, dict):
            out.append((path, f"expected object, got {_tname(v)}"))
            return
        fields = _fields(t)
        for k in list(v):
            if v[k] is None:  # Kubernetes treats null as unset
                del v[k]
                continue
            f = fields.get(k) if isinstance(k, str) else None
            if f is None:
                camel = re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), k) if isinstance(k, str) else k
                # protobuf's own snake_case name (Istio's docs use some): say what YAML calls it
                hint = f" (the YAML name is {camel})" if camel != k and camel in fields else ""
                out.append((_key(path, k), "unknown field" + hint))
                continue
            _walk(f.type, v[k], _key(path, k), out)
        for f in t.fields:
            if f.required and f.encode_name not in v:
                out.append((_key(path, f.encode_name), "missing required field"))
    elif isinstance(t, (mi.ListType, mi.VarTupleType)):
        if not isinstance(v, list):
            out.append((path, f"expected array, got {_tname(v)}"))
            return
        for i, item in enumerate(v):
            _walk(t.item_type, item, f"{path}[{i}]", out)
    elif isinstance(t, mi.DictType):
        if not isinstance(v, dict):
            out.append((path, f"expected object, got {_tname(v)}"))
            return
        for k, item in v.items():
            if not isinstance(k, str):
                out.append((_key(path, k), f"expected str key, got {_tname(k)}"))
                continue
            _walk(t.value_type, item, _key(path, k), out)
    elif isinstance(t, mi.StrType):
        if not isinstance(v, str):
            out.append((path, f"expected str, got {_tname(v)}"))
    elif isinstance(t, mi.BoolType):
        if not isinstance(v, bool):
            out.append((path, f"expected bool, got {_tname(v)}"))
    elif isinstance(t, mi.IntType):
        if not isinstance(v, int) or isinstance(v, bool):
            out.append((path, f"expected int, got {_tname(v)}"))
        elif _out_of_range(t, v):
            out.append((path, f"expected int{_range(t)}, got {v}"))
    elif isinstance(t, mi.FloatType):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            out.append((path, f"expected float, got {_tname(v)}"))
        elif _out_of_range(t, v):
            out.append((path, f"expected float{_range(t)}, got {v}"))
    elif isinstance(t, mi.LiteralType):
        if not isinstance(v, str):
            out.append((path, f"expected str, got {_tname(v)}"))
        elif v not in t.values:
            out.append((path, f"invalid value {v!r}; expected one of {', '.join(sorted(t.values))}"))
    elif isinstance(t, mi.CustomType) and t.cls is istio.Duration:
        if not isinstance(v, str):
            out.append((path, f"expected duration string (e.g. 15s, 100ms), got {_tname(v)}"))
        else:
            try:
                istio.parse_duration(v)
            except ValueError as e:
                out.append((path, str(e)))
    else:  # pragma: no cover - a type this module does not use
        out.append((path, f"unsupported schema type {t!r}"))


_TYPE_INFO = {kind: mi.type_info(cls) for kind, cls in istio.RESOURCE_TYPES.items()}


# ------------------------------------------------------------------------------------------------
# Documents


# Kinds of Istio's other APIs, and Kubernetes objects, that a config directory holds next to the
# four meshcore reads: skipped with one warning each (never an error), as a sidecar that does not
# act on them would. A networking.istio.io kind not listed here is a typo: an error.
SKIPPED_ISTIO_KINDS = {
    "networking.istio.io": ("Gateway", "Sidecar", "EnvoyFilter", "WorkloadGroup", "ProxyConfig"),
    "security.istio.io": ("PeerAuthentication", "AuthorizationPolicy", "RequestAuthentication"),
    "telemetry.istio.io": ("Telemetry",),
    "extensions.istio.io": ("WasmPlugin", "TrafficExtension"),
}
_NETWORKING = "networking.istio.io"


def _label(file: str, number: int, kind, meta, item: int | None = None) -> str:
    name = meta.get("name") if isinstance(meta, dict) else None
    if isinstance(kind, str) and kind and isinstance(name, str) and name:
        ns = meta.get("namespace")
        if isinstance(ns, str) and ns:
            return f"{file}: {kind} {ns}/{name}"
        return f"{file}: {kind} {name}"
    if item is not None:
        return f"{file}: document {number} items[{item}]"
    return f"{file}: document {number}"


def _skip_reason(kind: str, api) -> str | None:
    """Why a document is skipped, or None when meshcore reads (or rejects) it."""
    if not isinstance(api, str) or not api:
        return None
    group = api.split("/", 1)[0] if "/" in api else ""
    if group == _NETWORKING and kind in istio.RESOURCE_TYPES:
        return None
    if group == _NETWORKING and kind not in SKIPPED_ISTIO_KINDS[_NETWORKING]:
        return None  # an unknown networking kind: reported as an error
    if group in SKIPPED_ISTIO_KINDS:
        return f"skipped: meshcore does not act on {kind} ({api})"
    if kind in istio.RESOURCE_TYPES:
        return None  # one of ours under a foreign apiVersion: an error
    return (f"skipped: {kind} ({api}) is not an Istio traffic resource; meshcore reads "
            f"{', '.join(istio.KINDS)}")


def _decode(file: str, number: int, raw, rep: _Report, namespace: str = "default",
            label: str | None = None) -> _Doc | None:
    if not isinstance(raw, dict):
        rep.error(label or f"{file}: document {number}", "", f"expected object, got {_tname(raw)}")
        return None
    kind = raw.get("kind")
    meta = raw.get("metadata")
    label = label or _label(file, number, kind, meta)
    if kind is None:
        rep.error(label, "kind", "missing required field")
        return None
    if not isinstance(kind, str):
        rep.error(label, "kind", f"expected str, got {_tname(kind)}")
        return None
    skipped = _skip_reason(kind, raw.get("apiVersion"))
    if skipped is not None:
        rep.warn(label, "", skipped)
        return None
    if kind not in istio.RESOURCE_TYPES:
        skippable = sorted(k for ks in SKIPPED_ISTIO_KINDS.values() for k in ks)
        rep.error(label, "kind", f"unknown kind {kind!r}; expected one of {', '.join(istio.KINDS)} "
                                 f"(or one meshcore skips: {', '.join(skippable)})")
        return None
    ok = True
    api = raw.get("apiVersion")
    if api is None:
        rep.error(label, "apiVersion", "missing required field")
        ok = False
    elif not isinstance(api, str):
        ok = False  # the walker reports the type
    elif api not in istio.API_VERSIONS:
        rep.error(label, "apiVersion", f"unsupported apiVersion {api!r}; expected one of {', '.join(istio.API_VERSIONS)}")
        ok = False
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not meta.get("name"):
        if isinstance(meta, dict) and "name" in meta and meta["name"] is not None and not isinstance(meta["name"], str):
            pass  # reported by the walker as a type error
        else:
            rep.error(label, "metadata.name", "missing required field")
        ok = False
    problems: list = []
    _walk(_TYPE_INFO[kind], raw, "", problems)
    for path, problem in problems:
        rep.error(label, path, problem)
    if problems or not ok:
        return None
    try:
        obj = msgspec.convert(raw, istio.RESOURCE_TYPES[kind], dec_hook=istio.dec_hook)
    except msgspec.ValidationError as e:  # should not happen after _walk; keep msgspec's word
        msg = str(e)
        path = ""
        m = re.search(r" - at `\$\.?(.*)`$", msg)
        if m:
            path, msg = m.group(1), msg[: m.start()]
        rep.error(label, path, msg[:1].lower() + msg[1:].replace("`", ""))
        return None
    ns = obj.metadata.namespace or namespace
    return _Doc(file, number, kind, name, ns, label, obj, raw)


# ------------------------------------------------------------------------------------------------
# Compile-time state


@dataclass
class _DrInfo:
    doc: _Doc
    traffic_policy: object  # istio.TrafficPolicy | None
    subsets: dict = field(default_factory=dict)  # name -> istio.Subset
    used: bool = False


def _wildcard_match(pattern: str, host: str) -> bool:
    if pattern == "*":
        return True
    return pattern.startswith("*") and host.endswith(pattern[1:]) and len(host) > len(pattern) - 1


def _most_specific(host: str, table: dict):
    """Value for `host` in a dict keyed by hosts/wildcards: exact first, else longest wildcard."""
    v = table.get(host)
    if v is not None:
        return v
    best = None
    best_len = -1
    for pattern, value in table.items():
        if pattern.startswith("*") and _wildcard_match(pattern, host) and len(pattern) > best_len:
            best, best_len = value, len(pattern)
    return best


# ------------------------------------------------------------------------------------------------
# DestinationRule


def _check_lb(lb: istio.LoadBalancerSettings | None, path: str, label: str, rep: _Report) -> None:
    if lb is None:
        return
    if lb.simple is not None and lb.consistent_hash is not None:
        rep.error(label, path, "only one of simple or consistentHash may be set")
    ch = lb.consistent_hash
    if ch is not None:
        keys = [name for attr, name in (("http_header_name", "httpHeaderName"), ("http_cookie", "httpCookie"),
                                        ("use_source_ip", "useSourceIp"),
                                        ("http_query_parameter_name", "httpQueryParameterName"))
                if getattr(ch, attr) not in (None, False)]
        if len(keys) > 1:
            rep.error(label, f"{path}.consistentHash", f"only one hash key may be set, got {', '.join(keys)}")
        if ch.ring_hash is not None and ch.maglev is not None:
            rep.error(label, f"{path}.consistentHash", "only one of ringHash or maglev may be set")
        try:
            _, _, warns = hash_policy_from_istio(ch)
        except ValueError as exc:
            rep.error(label, f"{path}.consistentHash", str(exc))
        else:
            for msg in warns:
                rep.warn(label, f"{path}.consistentHash", msg)
    if lb.warmup_duration_secs is not None and lb.warmup is not None:
        rep.error(label, path, "only one of warmupDurationSecs or warmup may be set")
    if lb.zone_aware_lb_setting is not None:
        rep.warn(label, f"{path}.zoneAwareLbSetting")
    if lb.locality_lb_setting is not None and lb.locality_lb_setting.failover_priority:
        rep.warn(label, f"{path}.localityLbSetting.failoverPriority")
    slow = lb.warmup is not None or lb.warmup_duration_secs is not None
    if slow and (lb.consistent_hash is not None or lb.simple in ("RANDOM", "PASSTHROUGH")):
        rep.warn(label, f"{path}.warmup" if lb.warmup is not None else f"{path}.warmupDurationSecs",
                 "slow start applies to ROUND_ROBIN and LEAST_REQUEST only (Envoy); ignored")


_TCP_UNIMPLEMENTED = (("tcp_keepalive", "tcpKeepalive"),
                      ("max_connection_duration", "maxConnectionDuration"), ("idle_timeout", "idleTimeout"))
_HTTP_UNIMPLEMENTED = (("h2_upgrade_policy", "h2UpgradePolicy"), ("use_client_protocol", "useClientProtocol"),
                       ("max_concurrent_streams", "maxConcurrentStreams"), ("http2_keep_alive", "http2KeepAlive"))


def _check_cp(cp: istio.ConnectionPoolSettings | None, path: str, label: str, rep: _Report) -> None:
    if cp is None:
        return
    if cp.tcp is not None:
        for attr, name in _TCP_UNIMPLEMENTED:
            if getattr(cp.tcp, attr) is not None:
                rep.warn(label, f"{path}.tcp.{name}")
    if cp.http is not None:
        for attr, name in _HTTP_UNIMPLEMENTED:
            if getattr(cp.http, attr) is not None:
                rep.warn(label, f"{path}.http.{name}")


def _check_policy_parts(p, path: str, label: str, rep: _Report) -> None:
    _check_lb(p.load_balancer, f"{path}.loadBalancer", label, rep)
    _check_cp(p.connection_pool, f"{path}.connectionPool", label, rep)
    if p.outlier_detection is not None:
        _, warns = outlier_policy_from_istio(p.outlier_detection, check_mep_on_first_eject=True)
        for msg in warns:  # each starts with its "outlierDetection.<field>" path
            rep.warn(label, path, msg)
    _, warns = tls_policy_from_istio(p.tls)
    for f, msg in warns:
        rep.warn(label, f"{path}.tls.{f}", msg)


def _check_traffic_policy(tp: istio.TrafficPolicy | None, path: str, label: str, rep: _Report) -> None:
    if tp is None:
        return
    _check_policy_parts(tp, path, label, rep)
    seen = set()
    for i, pls in enumerate(tp.port_level_settings):
        ppath = f"{path}.portLevelSettings[{i}]"
        if pls.port is not None and pls.port.number:
            if pls.port.number in seen:
                rep.error(label, f"{ppath}.port.number", f"duplicate port {pls.port.number}")
            seen.add(pls.port.number)
        _check_policy_parts(pls, ppath, label, rep)
    for attr, name in (("tunnel", "tunnel"), ("proxy_protocol", "proxyProtocol"), ("retry_budget", "retryBudget")):
        if getattr(tp, attr) is not None:
            rep.warn(label, f"{path}.{name}")


class _DestinationRules:
    """DestinationRules by namespace, looked up as Istio does for a sidecar (destinationRule()):
    this proxy's namespace first (its workloadSelector rules when they select this workload,
    then the others), then the service's namespace, then the root namespace, each time the most
    specific host; only rules exported to this proxy's namespace count outside its own."""

    def __init__(self, proxy_namespace: str):
        self.proxy_namespace = proxy_namespace
        self.by_ns: dict[str, dict[str, _DrInfo]] = {}

    def add(self, doc: _Doc, host: str) -> None:
        dr: istio.DestinationRule = doc.obj.spec
        table = self.by_ns.setdefault(doc.namespace, {})
        info = table.get(host)
        if info is None:
            table[host] = _DrInfo(doc, dr.traffic_policy, {s.name: s for s in dr.subsets})
            return
        # Several DestinationRules for one host: Istio merges them; the first traffic policy wins,
        # subsets are added unless the name is taken.
        if dr.traffic_policy is not None:
            if info.traffic_policy is None:
                info.traffic_policy = dr.traffic_policy
            else:
                rep_warn = self._rep
                rep_warn.warn(doc.label, "spec.trafficPolicy",
                              f"host {host!r} already has a trafficPolicy from {info.doc.label}; ignored")
        for i, s in enumerate(dr.subsets):
            if s.name in info.subsets:
                self._rep.warn(doc.label, f"spec.subsets[{i}]",
                               f"subset {s.name!r} of host {host!r} already defined in {info.doc.label}; ignored")
            else:
                info.subsets[s.name] = s

    def lookup(self, host: str, service_namespace: str | None) -> _DrInfo | None:
        seen = []
        for ns in (self.proxy_namespace, service_namespace, ROOT_NAMESPACE):
            if ns is None or ns in seen:
                continue
            seen.append(ns)
            table = self.by_ns.get(ns)
            if table:
                info = _most_specific(host, table)
                if info is not None:
                    info.used = True
                    return info
        return None


def _compile_destination_rules(dr_docs, rep: _Report, names, workload) -> _DestinationRules:
    out = _DestinationRules(workload.namespace)
    out._rep = rep
    selected, general = [], []
    for doc in dr_docs:
        dr: istio.DestinationRule = doc.obj.spec
        label = doc.label
        errors = len(rep.errors)
        rep.checks(label, check_destination_rule(dr, doc.namespace))
        _check_traffic_policy(dr.traffic_policy, "spec.trafficPolicy", label, rep)
        for i, s in enumerate(dr.subsets):
            _check_traffic_policy(s.traffic_policy, f"spec.subsets[{i}].trafficPolicy", label, rep)
        if len(rep.errors) > errors:
            continue
        host = names.canonical(fqdn(dr.host, doc.namespace))
        if doc.namespace != workload.namespace and not visible(dr.export_to, doc.namespace, workload.namespace):
            rep.warn(label, "spec.exportTo", f"not exported to namespace {workload.namespace!r} (this proxy's "
                                             "--namespace); ignored")
            continue
        ws = dr.workload_selector
        if ws is not None:
            if doc.namespace != workload.namespace or not workload.has_labels(ws.match_labels):
                rep.warn(label, "spec.workloadSelector",
                         f"does not select this workload (namespace {workload.namespace!r}, --labels "
                         f"{','.join(f'{k}={v}' for k, v in workload.labels) or 'none'}); ignored")
                continue
            selected.append((doc, host))
        else:
            general.append((doc, host))
    for doc, host in selected + general:  # a rule selecting this workload takes precedence
        out.add(doc, host)
    return out


_COMPONENTS = ("load_balancer", "connection_pool", "outlier_detection", "tls")


def _effective(tp, subset_tp, port: int) -> dict:
    """Istio's policy merge for one cluster (semantics §2.1, MergeTrafficPolicy)."""
    comps = dict.fromkeys(_COMPONENTS)
    if tp is not None:
        for c in _COMPONENTS:
            comps[c] = getattr(tp, c)
        for pls in tp.port_level_settings:
            if pls.port is not None and pls.port.number == port:
                for c in _COMPONENTS:  # wholesale: unset parts fall to defaults
                    comps[c] = getattr(pls, c)
                break
    if subset_tp is not None:
        for c in _COMPONENTS:
            v = getattr(subset_tp, c)
            if v is not None:
                comps[c] = v
        for pls in subset_tp.port_level_settings:
            if pls.port is not None and pls.port.number == port:
                for c in _COMPONENTS:
                    comps[c] = getattr(pls, c)
                break
    return comps


_LB_MAP = {
    "ROUND_ROBIN": LB_ROUND_ROBIN,
    "RANDOM": LB_RANDOM,
    "LEAST_REQUEST": LB_LEAST_REQUEST,
    "LEAST_CONN": LB_LEAST_REQUEST,
    "UNSPECIFIED": LB_LEAST_REQUEST,
}


def _cluster(name: str, host: str, port: int, subset: str, endpoints, dr: _DrInfo | None, subset_spec,
             discovery: str = DISCOVERY_STATIC, locality: str = "") -> ClusterPolicy:
    comps = _effective(dr.traffic_policy if dr else None,
                       subset_spec.traffic_policy if subset_spec is not None else None, port)
    lb = comps["load_balancer"]
    lb_kind = _LB_MAP.get(lb.simple, LB_LEAST_REQUEST) if lb is not None and lb.simple else LB_LEAST_REQUEST
    hash_policy = ring_config = None
    if lb is not None and lb.consistent_hash is not None:
        hash_policy, ring_config, _ = hash_policy_from_istio(lb.consistent_hash)  # validated before
        lb_kind = ring_config.lb_policy
    if lb is not None and lb.simple == "PASSTHROUGH":
        # Istio: an ORIGINAL_DST cluster, whatever the ServiceEntry listed
        discovery, endpoints = DISCOVERY_ORIGINAL_DST, ()
    if discovery in PER_REQUEST_DISCOVERY:
        endpoints = ()
    connect_timeout = DEFAULT_CONNECT_TIMEOUT
    idle_timeout = DEFAULT_IDLE_TIMEOUT
    max_rpc = 0
    od = comps["outlier_detection"]
    # Envoy 1.40's maxEjectionPercent rule (check_mep_on_first_eject), the reference here.
    outlier = outlier_policy_from_istio(od, check_mep_on_first_eject=True)[0] if od is not None else None
    cp = comps["connection_pool"]
    limits = breaker_limits_from_istio(cp) if cp is not None else None
    if cp is not None:
        if cp.tcp is not None and cp.tcp.connect_timeout is not None:
            connect_timeout = cp.tcp.connect_timeout.seconds
        if cp.http is not None:
            if cp.http.idle_timeout is not None:
                idle_timeout = cp.http.idle_timeout.seconds
            if cp.http.max_requests_per_connection:
                max_rpc = cp.http.max_requests_per_connection
    tls, _ = tls_policy_from_istio(comps["tls"])
    slow_start = None
    locality_lb = None
    if ring_config is None and discovery not in PER_REQUEST_DISCOVERY:
        if lb_kind in (LB_ROUND_ROBIN, LB_LEAST_REQUEST) and lb is not None:
            slow_start = slow_start_from_istio(lb)
        locality_lb = locality_lb_from_istio(lb.locality_lb_setting if lb is not None else None,
                                             endpoints, locality, od is not None)
    return ClusterPolicy(
        name=name,
        service_host=host,
        port=port,
        subset=subset,
        endpoints=tuple(endpoints),
        lb=lb_kind,
        connect_timeout=connect_timeout,
        idle_timeout=idle_timeout,
        max_requests_per_connection=max_rpc,
        outlier=outlier,
        limits=limits,
        hash_policy=hash_policy,
        ring_config=ring_config,
        discovery=discovery,
        per_request_endpoints=discovery in PER_REQUEST_DISCOVERY or port == ANY_PORT,
        tls=tls,
        slow_start=slow_start,
        locality_lb=locality_lb,
    )


def _subset_endpoints(endpoints, labels: dict) -> list:
    if not labels:
        return list(endpoints)
    want = labels.items()
    return [e for e in endpoints if all(kv in e.labels for kv in want)]


# ------------------------------------------------------------------------------------------------
# Snapshot assembly


def _hash_policies(destinations, clusters) -> tuple:
    """Envoy's route hash policies: one per destination whose cluster hashes (semantics §2.7)."""
    return tuple(clusters[d.cluster].hash_policy for d in destinations
                 if clusters[d.cluster].ring_config is not None and clusters[d.cluster].hash_policy is not None)


class _MirrorDest:
    """A MirrorPolicy seen as an Istio Destination, so mirrors resolve to clusters like routes."""

    class _Port:
        def __init__(self, number):
            self.number = number

    def __init__(self, m):
        self.host = m.host
        self.subset = m.subset
        self.port = self._Port(m.port) if m.port else None


def config_hash(sources: dict[str, bytes], extra: tuple = ()) -> str:
    """sha256 over the sources sorted by name (name, length, content), then `extra` (DNS answers)."""
    h = hashlib.sha256()
    for name in sorted(sources):
        data = sources[name]
        nb = name.encode("utf-8")
        h.update(len(nb).to_bytes(8, "big"))
        h.update(nb)
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    if extra:
        h.update(orjson.dumps(extra))
    return h.hexdigest()


def _prefix_dependent(r: HttpRoute) -> bool:
    return ((r.rewrite is not None and bool(r.rewrite.uri))
            or (r.redirect is not None and bool(r.redirect.prefix_rewrite)))


def _groups(r: HttpRoute, port: int):
    """The route's pieces that apply on service `port`, grouped into (name, matches, prefix):
    consecutive pieces with one name share a RoutePolicy unless a prefix rewrite tells them apart."""
    out = []
    for p in r.pieces:
        if p.port is not None and p.port != port:
            continue
        if out and out[-1][0] == p.name and not _prefix_dependent(r):
            out[-1][1].append(p.match)
            continue
        out.append((p.name, [p.match], p.prefix))
    return out


def _rewrite(r: HttpRoute, prefix: tuple, authority: str) -> Rewrite | None:
    rw = r.rewrite
    pfx = regex = None
    sub = ""
    if rw is not None and rw.uri:
        pfx = (prefix[0], rw.uri.encode("utf-8"), prefix[1])
    elif rw is not None and rw.uri_regex_rewrite is not None:
        regex = rw.uri_regex_rewrite.match
        sub = re2_substitution(rw.uri_regex_rewrite.rewrite or "")
    if pfx is None and regex is None and not authority:
        return None
    return Rewrite(pfx, regex, sub, authority.encode("utf-8"))


def _destination_actions(r: HttpRoute, prefix: tuple, dest_ops, weighted: bool):
    """(Rewrite, request HeaderEdits, response HeaderEdits) for one destination of a route, route
    and destination level combined as Istio writes them and Envoy applies them: one destination
    joins the route's lists (its `set` can override the route's `add`); weighted destinations are
    evaluated before the route level (Envoy's default order)."""
    route_req, route_resp, route_auth = r.route_ops
    dest_req, dest_resp, dest_auth = dest_ops
    if r.rewrite is not None and r.rewrite.authority:
        route_auth = r.rewrite.authority
    if weighted:
        authority = dest_auth or route_auth
        req = HeaderEdits((dest_req, route_req))
        resp = HeaderEdits((dest_resp, route_resp))
    else:
        authority = route_auth or dest_auth
        req = HeaderEdits((Stage(route_req.removes | dest_req.removes, route_req.ops + dest_req.ops),))
        resp = HeaderEdits((Stage(route_resp.removes | dest_resp.removes, route_resp.ops + dest_resp.ops),))
    return _rewrite(r, prefix, authority), (req or None), (resp or None)


def _list_items(raw):
    """`(None, document)`, or `(i, item)` for each item of a Kubernetes `v1` List (kubectl applies
    a List's items as if each were its own document)."""
    if (isinstance(raw, dict) and raw.get("kind") == "List" and isinstance(raw.get("apiVersion"), str)
            and isinstance(raw.get("items"), list)):
        return list(enumerate(raw["items"]))
    return [(None, raw)]


_SERVER_SET_METADATA = ("namespace", "uid", "resourceVersion", "generation", "creationTimestamp",
                        "managedFields", "selfLink", "deletionTimestamp", "deletionGracePeriodSeconds")


def _content(raw: dict) -> dict:
    """A document as compared for redefinitions: without status and server-set metadata."""
    out = {k: v for k, v in raw.items() if k != "status"}
    meta = out.get("metadata")
    if isinstance(meta, dict):
        out["metadata"] = {k: v for k, v in meta.items() if k not in _SERVER_SET_METADATA}
    return out


def _combine(docs: list[_Doc], rep: _Report) -> list[_Doc]:
    """Several files or folders accumulate as `kubectl apply -f a -f b` does: a resource defined
    twice with the same content is kept once; a different redefinition is an error naming both."""
    first: dict[tuple, _Doc] = {}
    unique: list[_Doc] = []
    for d in docs:
        k = (d.kind, d.namespace, d.name)
        p = first.get(k)
        if p is None:
            first[k] = d
            unique.append(d)
            continue
        if _content(p.raw) == _content(d.raw):
            continue
        rep.error(d.label, "metadata.name",
                  f"conflicting redefinition of {d.kind} {d.namespace}/{d.name}: already defined with "
                  f"different content in {p.file} document {p.number}")
    return unique


def compile_sources(sources: dict[str, bytes], generation: int = 0, *, resolver: Resolver | None = None,
                    namespace: str = "default", labels: dict | None = None, locality: str = "",
                    dns: DnsCache | None = None, sidecar: bool = False,
                    outbound_traffic_policy: str = "ALLOW_ANY") -> Snapshot:
    """Decode, validate and compile Istio config into a Snapshot.

    `sources`: display name -> file content (see `meshcore.config.load.read_sources`); files ending
    in `.json` are JSON, the rest multi-document YAML. `namespace`: this proxy's namespace, also
    the namespace of documents that name none (`--namespace`); `labels`: this workload's labels
    (`--labels`, for sourceLabels and DestinationRule workloadSelector); `locality`: this proxy's
    `region/zone/subzone` (`--locality`). `dns`: the DnsCache that resolves `resolution: DNS`
    names (default: a fresh one over `resolver(name, port) -> [ip, ...]`, itself defaulting to
    socket.getaddrinfo). `sidecar`: also compile what a captured connection needs
    (`Snapshot.sidecar`, meshcore.config.sidecar: TCP ports, service addresses, per-port route
    tables, inbound ports, Istio's PassthroughCluster/BlackHoleCluster/inbound clusters) under
    `outbound_traffic_policy` (ALLOW_ANY or REGISTRY_ONLY).

    Error handling: raises ConfigError listing every problem found; warnings (unimplemented fields,
    empty clusters, skipped documents) go to `Snapshot.warnings`.
    """
    rep = _Report()
    if dns is None:
        dns = DnsCache(resolver)
    workload = Workload(namespace, tuple(sorted((labels or {}).items())))
    docs: list[_Doc] = []
    for file, data in sources.items():
        parsed, problems = parse_documents(file, data)
        for number, raw in parsed:
            if raw is None:
                continue
            for item, obj in _list_items(raw):
                meta = obj.get("metadata") if isinstance(obj, dict) else None
                kind = obj.get("kind") if isinstance(obj, dict) else None
                label = _label(file, number, kind, meta, item)
                rep.order.setdefault(label, len(rep.order))
                d = _decode(file, number, obj, rep, namespace, label)
                if d is not None:
                    docs.append(d)
        for problem in problems:  # a syntax error ends the file: report it after its documents
            rep.order.setdefault(file, len(rep.order))
            rep.errors.append((file, problem))

    unique = _combine(docs, rep)
    by_kind: dict[str, list[_Doc]] = {k: [] for k in istio.KINDS}
    for d in unique:
        by_kind[d.kind].append(d)

    dns_names: list = []

    def lookup(name: str, port: int) -> list:
        dns_names.append((name, port))
        return dns.lookup(name, port)

    services, names = compile_service_entries(by_kind["ServiceEntry"], by_kind["WorkloadEntry"], rep,
                                              lookup, workload.namespace, sidecar=sidecar)
    drs = _compile_destination_rules(by_kind["DestinationRule"], rep, names, workload)
    bound = compile_virtual_services(by_kind["VirtualService"], rep, workload)
    # A VirtualService host naming a short ServiceEntry host's Kubernetes name binds that service.
    bound = {names.canonical(h): info for h, info in bound.items()}

    if rep.errors:
        raise ConfigError(rep.sorted_errors())

    # --- clusters for every service port, plus DestinationRule subsets
    clusters: dict[str, ClusterPolicy] = {}
    for host, svc in services.items():
        dr = drs.lookup(host, svc.namespace)
        for number in svc.port_numbers + list(svc.tcp_ports):
            eps = svc.endpoints.get(number, [])
            name = f"outbound|{number}||{host}"
            clusters[name] = _cluster(name, host, number, "", eps, dr, None, svc.discovery, locality)
            if dr is not None:
                for sname, sub in dr.subsets.items():
                    cname = f"outbound|{number}|{sname}|{host}"
                    clusters[cname] = _cluster(cname, host, number, sname, _subset_endpoints(eps, sub.labels),
                                               dr, sub, svc.discovery, locality)

    # --- virtual hosts: (host, port) for every service, and VirtualService hosts without a service
    vhost_targets: list[tuple[str, int]] = []
    for host, svc in services.items():
        for number in svc.port_numbers:
            vhost_targets.append((host, number))
    for host in bound:
        if host not in services:
            vhost_targets.append((host, 80))

    def resolve_dest(dest, vport: int, vs_label: str, dpath: str) -> str:
        dhost = names.canonical(dest.host.lower())
        svc = services.get(dhost)
        if dest.port is not None and dest.port.number:
            dport = dest.port.number
        elif svc is not None and len(svc.ports) == 1:
            dport = next(iter(svc.ports))
        elif svc is not None and not svc.ports and not svc.tcp_ports:
            dport = ANY_PORT
        else:
            dport = vport
        subset = dest.subset or ""
        cname = f"outbound|{dport}|{subset}|{dhost}"
        if cname in clusters:
            return cname
        dr = drs.lookup(dhost, svc.namespace if svc is not None else None)
        sub = dr.subsets.get(subset) if (dr is not None and subset) else None
        if svc is None:
            hint = ""
            if dhost.count(".") == 1 and names.canonical(f"{dhost}.{DOMAIN_SUFFIX}") != f"{dhost}.{DOMAIN_SUFFIX}" \
                    or f"{dhost}.{DOMAIN_SUFFIX}" in services:
                hint = f" (Istio does not expand {dhost!r}; did you mean {dhost}.{DOMAIN_SUFFIX}?)"
            rep.warn(vs_label, f"{dpath}.destination.host",
                     f"host {dhost!r} has no ServiceEntry; cluster {cname} has no endpoints{hint}")
        elif dport not in svc.ports and (svc.ports or svc.tcp_ports):
            rep.warn(vs_label, f"{dpath}.destination.port",
                     f"service {dhost!r} has no port {dport}; cluster {cname} has no endpoints")
        elif subset and sub is None:
            rep.warn(vs_label, f"{dpath}.destination.subset",
                     f"subset {subset!r} is not defined by a DestinationRule for {dhost!r}; cluster {cname} has no endpoints")
        eps = ()
        discovery = DISCOVERY_STATIC
        if svc is not None and (dport in svc.ports or not (svc.ports or svc.tcp_ports)):
            eps = svc.endpoints.get(dport, [])
            discovery = svc.discovery
            if subset and sub is not None:
                eps = _subset_endpoints(eps, sub.labels)
            elif subset:
                eps = ()
        clusters[cname] = _cluster(cname, dhost, dport, subset, eps, dr, sub, discovery, locality)
        return cname

    vhosts: dict[str, VirtualHostPolicy] = {}
    bare: dict[str, VirtualHostPolicy] = {}
    for host, port in vhost_targets:
        info = _most_specific(host, bound)
        routes: list[RoutePolicy] = []
        if info is not None:
            for r in info.routes:
                routes.extend(_route_policies(r, port, info, resolve_dest, clusters))
        if not routes and info is None:
            cname = f"outbound|{port}||{host}"
            if cname not in clusters:
                svc = services.get(host)
                clusters[cname] = _cluster(cname, host, port, "", (), drs.lookup(host, None), None,
                                           svc.discovery if svc is not None else DISCOVERY_STATIC, locality)
            routes.append(RoutePolicy(
                name="default",
                matches=(RequestMatch("", PathMatch("prefix", b"/", False)),),
                destinations=(WeightedCluster(cname, 100),),
                total_weight=100,
                timeout=0.0,
                # istiod gives a VirtualService-less host its default policy (no previous_hosts
                # predicate for a consistent-hash destination)
                retry=(DEFAULT_CONSISTENT_HASH_POLICY if clusters[cname].ring_config is not None
                       else DEFAULT_RETRY_POLICY),
                hash_policies=_hash_policies((WeightedCluster(cname, 100),), clusters),
            ))
        vh = VirtualHostPolicy(name=f"{host}:{port}" if port != ANY_PORT else host, routes=tuple(routes))
        if port == ANY_PORT:
            bare[host] = vh
            continue
        vhosts[f"{host}:{port}"] = vh
        if host not in bare or port == 80:
            bare[host] = vh
    for host, vh in bare.items():
        vhosts.setdefault(host, vh)
    _add_alt_domains(vhosts, services, names, workload.namespace)
    sidecar_table = None
    if sidecar:
        from meshcore.config.sidecar import compile_sidecar
        sidecar_table = compile_sidecar(services, vhosts, clusters, names, workload, rep,
                                        outbound_traffic_policy)

    return Snapshot(
        generation=generation,
        config_hash=config_hash(sources, dns.answers()),
        vhosts=vhosts,
        clusters=clusters,
        warnings=tuple(rep.sorted_warnings()),
        route_table=RouteTable.from_vhosts(vhosts),
        dns_names=tuple(dict.fromkeys(dns_names)),
        sidecar=sidecar_table,
    )


def _route_policies(r: HttpRoute, port: int, info, resolve_dest, clusters) -> list[RoutePolicy]:
    """The RoutePolicies of one http[] route on one service port."""
    out = []
    label = info.doc.label
    wcs_cache = None
    for name, matches, prefix in _groups(r, port):
        matches = tuple(matches)
        if r.redirect is not None:
            red = redirect_for(r.redirect, prefix, HeaderEdits((r.route_ops[1],)).lines(), port)
            out.append(RoutePolicy(name=name, matches=matches, direct=red, cors=r.cors))
            continue
        if r.direct is not None:
            out.append(RoutePolicy(name=name, matches=matches, direct=r.direct, cors=r.cors))
            continue
        if wcs_cache is None:
            wcs_cache = [(resolve_dest(d, port, label, dp), w, ops) for d, w, dp, ops in r.dests]
        weighted = r.weighted  # Istio: route[] with several entries -> weighted_clusters
        wcs = []
        for cname, w, ops in wcs_cache:
            rewrite, req, resp = _destination_actions(r, prefix, ops, weighted)
            wcs.append(WeightedCluster(cname, w, rewrite, req, resp))
        wcs = tuple(wcs)
        total = sum(wc.weight for wc in wcs)
        mirrors = tuple(
            (m, "" if m.is_capture else resolve_dest(_MirrorDest(m), port, label, f"{r.path}.mirror"))
            for m in r.mirrors)
        hashing = _hash_policies(wcs, clusters)
        retry = r.retry
        if len(wcs) == 1 and clusters[wcs[0].cluster].ring_config is not None and retry is not None:
            # Istio >= 1.23 drops previous_hosts when the one destination hashes
            retry = retry_policy_from_istio(r.retries, True)[0]
        out.append(RoutePolicy(name=name, matches=matches, destinations=wcs, total_weight=total,
                               timeout=r.timeout, retry=retry, fault=r.fault, mirrors=mirrors,
                               hash_policies=hashing, cors=r.cors))
    return out


def _add_alt_domains(vhosts: dict, services: dict, names, proxy_namespace: str) -> None:
    """The short forms a sidecar also answers to (Istio's GenerateAltVirtualHosts): for
    `name.ns.svc.cluster.local`, `name.ns`, `name.ns.svc` (and `name` in the proxy's namespace),
    with and without each port; a short ServiceEntry host also answers to its Kubernetes names.
    Names already taken keep their virtual host."""
    additions: dict[str, VirtualHostPolicy] = {}
    for key, vh in list(vhosts.items()):
        host, sep, port = key.rpartition(":")
        if not sep or not port.isdigit():
            host, port = key, ""
        alts = list(alt_domains(host, proxy_namespace))
        svc = services.get(host)
        if svc is not None and "." not in host and not host.startswith("*"):
            kube = f"{host}.{svc.namespace}.{DOMAIN_SUFFIX}"
            alts = [kube] + [a for a in alt_domains(kube, proxy_namespace) if a != host]
        for alt in alts:
            k = f"{alt}:{port}" if port else alt
            if k not in vhosts:
                additions.setdefault(k, vh)
    for k, vh in additions.items():
        vhosts[k] = vh
