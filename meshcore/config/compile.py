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
- Only `resolution: DNS` touches the network (one getaddrinfo per name, at compile time); pass
  `resolver=` to avoid it.
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Callable

import msgspec
import msgspec.inspect as mi
import orjson
import yaml

from meshcore.config import istio
from meshcore.policy.fault import fault_policy_from_istio
from meshcore.policy.mirror import mirror_policies_from_istio
from meshcore.upstream.breaker import breaker_limits_from_istio
from meshcore.upstream.hashkey import hash_policy_from_istio
from meshcore.upstream.outlier import outlier_policy_from_istio
from meshcore.policy.retry import DEFAULT_CONSISTENT_HASH_POLICY, retry_policy_from_istio
from meshcore.policy.retry import DEFAULT_POLICY as DEFAULT_RETRY_POLICY
from meshcore.config.policy import (
    LB_LEAST_REQUEST,
    LB_RANDOM,
    LB_ROUND_ROBIN,
    ClusterPolicy,
    Endpoint,
    RoutePolicy,
    Snapshot,
    VirtualHostPolicy,
    WeightedCluster,
)
from meshcore.errors import ConfigError
from meshcore.routing.matchers import (
    Exact,
    HeaderMatch,
    PathMatch,
    Prefix,
    Present,
    QueryMatch,
    Regex,
    RequestMatch,
)
from meshcore.routing.table import RouteTable

__all__ = ["compile_sources", "config_hash", "parse_documents", "NOT_IMPLEMENTED", "DEFAULT_CONNECT_TIMEOUT"]

NOT_IMPLEMENTED = "not implemented yet; ignored"
DEFAULT_CONNECT_TIMEOUT = 10.0  # MeshConfig connectTimeout default (semantics §2.8)
DEFAULT_IDLE_TIMEOUT = 3600.0  # Envoy upstream idle timeout default (§2.12)

Resolver = Callable[[str, int], list]


def _default_resolver(name: str, port: int) -> list[str]:
    """Every IPv4/IPv6 address of `name`, in getaddrinfo order, without duplicates."""
    import socket  # only here: resolution DNS is the one place config compilation touches the network

    out: list[str] = []
    for fam, _, _, _, sa in socket.getaddrinfo(name, port, type=socket.SOCK_STREAM):
        if fam in (socket.AF_INET, socket.AF_INET6) and sa[0] not in out:
            out.append(sa[0])
    return out


# ------------------------------------------------------------------------------------------------
# Problem reporting


class _Report:
    """Collects problems; `sorted_*` lists them in source order (file, then document), each once."""

    def __init__(self):
        self.errors: list[tuple[str, str]] = []  # (label, message)
        self.warnings: list[tuple[str, str]] = []
        self.order: dict[str, int] = {}  # document label -> position in the sources

    @staticmethod
    def _fmt(label: str, path: str, problem: str) -> str:
        return f"{label}: {path}: {problem}" if path else f"{label}: {problem}"

    def error(self, label: str, path: str, problem: str) -> None:
        self.errors.append((label, self._fmt(label, path, problem)))

    def warn(self, label: str, path: str, problem: str = NOT_IMPLEMENTED) -> None:
        self.warnings.append((label, self._fmt(label, path, problem)))

    def _sorted(self, items) -> list[str]:
        big = len(self.order)
        ranked = sorted(enumerate(items), key=lambda x: (self.order.get(x[1][0], big), x[0]))
        return list(dict.fromkeys(msg for _, (_, msg) in ranked))

    def sorted_errors(self) -> list[str]:
        return self._sorted(self.errors)

    def sorted_warnings(self) -> list[str]:
        return self._sorted(self.warnings)


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


def _key(path: str, key) -> str:
    if isinstance(key, str) and _IDENT.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{orjson.dumps(key, default=str).decode()}]" if isinstance(key, str) else f"{path}[{key!r}]"


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
                out.append((_key(path, k), "unknown field"))
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


@dataclass
class _Doc:
    file: str
    number: int
    kind: str
    name: str
    namespace: str
    label: str
    obj: object  # istio.*Resource


def _label(file: str, number: int, kind, meta) -> str:
    name = meta.get("name") if isinstance(meta, dict) else None
    if isinstance(kind, str) and kind in istio.RESOURCE_TYPES and isinstance(name, str) and name:
        ns = meta.get("namespace")
        if isinstance(ns, str) and ns:
            return f"{file}: {kind} {ns}/{name}"
        return f"{file}: {kind} {name}"
    return f"{file}: document {number}"


def _decode(file: str, number: int, raw, rep: _Report) -> _Doc | None:
    if not isinstance(raw, dict):
        rep.error(f"{file}: document {number}", "", f"expected object, got {_tname(raw)}")
        return None
    kind = raw.get("kind")
    meta = raw.get("metadata")
    label = _label(file, number, kind, meta)
    if kind is None:
        rep.error(label, "kind", "missing required field")
        return None
    if not isinstance(kind, str):
        rep.error(label, "kind", f"expected str, got {_tname(kind)}")
        return None
    if kind not in istio.RESOURCE_TYPES:
        rep.error(label, "kind", f"unknown kind {kind!r}; expected one of {', '.join(istio.KINDS)}")
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
    ns = obj.metadata.namespace or "default"
    return _Doc(file, number, kind, name, ns, label, obj)


# ------------------------------------------------------------------------------------------------
# Compile-time state


@dataclass
class _Port:
    number: int
    name: str
    protocol: str
    target_port: int = 0


@dataclass
class _Service:
    host: str
    ports: dict = field(default_factory=dict)  # number -> _Port, first declaration wins
    endpoints: dict = field(default_factory=dict)  # number -> list[Endpoint]


@dataclass
class _DrInfo:
    doc: _Doc
    traffic_policy: object  # istio.TrafficPolicy | None
    subsets: dict = field(default_factory=dict)  # name -> istio.Subset


@dataclass
class _HttpRoute:
    """An http[] entry with matchers compiled and destinations still unresolved."""

    names: tuple  # route name per RoutePolicy piece
    matches: tuple  # tuple of tuples of RequestMatch, one per piece
    dests: tuple  # ((istio.Destination, weight, path), ...)
    timeout: float
    retry: object  # RetryPolicy or None
    fault: object  # FaultPolicy or None
    mirrors: tuple  # MirrorPolicy, ...
    path: str  # spec.http[i], for messages about the route's destinations
    retries: object  # the raw `retries` block: recompiled for consistent-hash destinations


@dataclass
class _VsInfo:
    doc: _Doc
    routes: list


_HTTP_PROTOCOLS = {"", "HTTP", "HTTP2", "GRPC", "GRPC-WEB"}


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


def _ep_key(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


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
# ServiceEntry / WorkloadEntry


def _compile_service_entries(se_docs, we_docs, rep: _Report, resolver: Resolver) -> dict[str, _Service]:
    services: dict[str, _Service] = {}
    for doc in se_docs:
        se: istio.ServiceEntry = doc.obj.spec
        label = doc.label
        ok = True
        resolution = se.resolution or "NONE"
        if resolution == "NONE":
            rep.error(label, "spec.resolution", "resolution NONE (passthrough) is not supported")
            ok = False
        elif resolution == "DYNAMIC_DNS":
            rep.error(label, "spec.resolution", "resolution DYNAMIC_DNS is not supported")
            ok = False
        if not se.hosts:
            rep.error(label, "spec.hosts", "at least one host is required")
            ok = False
        hosts = []
        for i, h in enumerate(se.hosts):
            if not h:
                rep.error(label, f"spec.hosts[{i}]", "empty host")
                ok = False
            elif "*" in h:
                rep.error(label, f"spec.hosts[{i}]", f"wildcard host {h!r} is not supported (it needs resolution NONE)")
                ok = False
            else:
                hosts.append(h.lower())
        if not se.ports:
            rep.error(label, "spec.ports", "at least one port is required")
            ok = False
        ports: list[_Port] = []
        seen_num: set = set()
        seen_name: set = set()
        for i, p in enumerate(se.ports):
            if p.number in seen_num:
                rep.error(label, f"spec.ports[{i}].number", f"duplicate port {p.number}")
                ok = False
                continue
            seen_num.add(p.number)
            if not p.name:
                rep.error(label, f"spec.ports[{i}].name", "missing required field")
                ok = False
                continue
            if p.name in seen_name:
                rep.error(label, f"spec.ports[{i}].name", f"duplicate port name {p.name!r}")
                ok = False
                continue
            seen_name.add(p.name)
            proto = (p.protocol or "").upper()
            if proto not in _HTTP_PROTOCOLS:
                rep.warn(label, f"spec.ports[{i}].protocol", f"protocol {p.protocol} is not supported (HTTP/1.1 only); port ignored")
                continue
            if proto in ("HTTP2", "GRPC", "GRPC-WEB"):
                rep.warn(label, f"spec.ports[{i}].protocol", f"protocol {p.protocol} is proxied as HTTP/1.1")
            ports.append(_Port(p.number, p.name, proto or "HTTP", p.target_port or 0))
        if se.endpoints and se.workload_selector is not None:
            rep.error(label, "spec.workloadSelector", "only one of endpoints or workloadSelector may be set")
            ok = False
        # (WorkloadEntry-ish spec, label for problems, path prefix for problems)
        sources: list = [(ep, label, f"spec.endpoints[{i}]") for i, ep in enumerate(se.endpoints)]
        if se.workload_selector is not None:
            want = se.workload_selector.labels
            for wdoc in we_docs:
                if wdoc.namespace != doc.namespace:
                    continue
                we = wdoc.obj.spec
                if all(we.labels.get(k) == v for k, v in want.items()):
                    sources.append((we, wdoc.label, "spec"))
        if resolution == "DNS_ROUND_ROBIN" and len(sources) > 1:
            rep.error(label, "spec.endpoints", "resolution DNS_ROUND_ROBIN allows at most one endpoint")
            ok = False
        # Addresses -> list of IPs per source
        resolved: list = []  # (spec, [ips])
        for ep, elabel, epath in sources:
            addr = ep.address
            if not addr:
                rep.error(elabel, f"{epath}.address", "missing required field")
                ok = False
                continue
            if addr.startswith("unix://"):
                rep.error(elabel, f"{epath}.address", "unix domain socket endpoints are not supported")
                ok = False
                continue
            if _is_ip(addr):
                resolved.append((ep, [addr]))
            elif resolution == "STATIC":
                rep.error(elabel, f"{epath}.address", f"address {addr!r} is not an IP address (resolution STATIC)")
                ok = False
            elif resolution in ("DNS", "DNS_ROUND_ROBIN"):
                ips = _resolve(addr, ports[0].number if ports else 80, resolver, rep, elabel, f"{epath}.address")
                resolved.append((ep, ips))
        if not ok:
            continue
        per_host_sources: dict[str, list] = {}
        if resolution in ("DNS", "DNS_ROUND_ROBIN") and not se.endpoints and se.workload_selector is None:
            # No endpoints: every host resolves to itself (§12.2).
            for h in hosts:
                ips = _resolve(h, ports[0].number if ports else 80, resolver, rep, label, "spec.hosts")
                per_host_sources[h] = [(istio.WorkloadEntry(address=h), ips)]
        for h in hosts:
            svc = services.get(h)
            if svc is None:
                svc = services[h] = _Service(h)
            host_sources = per_host_sources.get(h, resolved)
            for port in ports:
                svc.ports.setdefault(port.number, port)
                eps = svc.endpoints.setdefault(port.number, [])
                for ep, ips in host_sources:
                    if resolution == "DNS_ROUND_ROBIN":
                        ips = ips[:1]
                    target = ep.ports.get(port.name) or port.target_port or port.number
                    weight = ep.weight or 1
                    lbls = tuple(sorted(ep.labels.items()))
                    for ip in ips:
                        eps.append(Endpoint(ip, target, weight, lbls, _ep_key(ip, target)))
    return services


def _resolve(name: str, port: int, resolver: Resolver, rep: _Report, label: str, path: str) -> list[str]:
    try:
        ips = list(resolver(name, port))
    except OSError as e:
        rep.warn(label, path, f"DNS lookup of {name!r} failed ({e.strerror or e}); no endpoints")
        return []
    if not ips:
        rep.warn(label, path, f"DNS lookup of {name!r} returned no addresses; no endpoints")
    return ips


# ------------------------------------------------------------------------------------------------
# DestinationRule


def _check_lb(lb: istio.LoadBalancerSettings | None, path: str, label: str, rep: _Report) -> None:
    if lb is None:
        return
    if lb.simple is not None and lb.consistent_hash is not None:
        rep.error(label, path, "only one of simple or consistentHash may be set")
    if lb.simple == "PASSTHROUGH":
        rep.error(label, f"{path}.simple", "PASSTHROUGH is not supported")
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
    for attr, name in (("locality_lb_setting", "localityLbSetting"), ("zone_aware_lb_setting", "zoneAwareLbSetting"),
                       ("warmup_duration_secs", "warmupDurationSecs"), ("warmup", "warmup")):
        if getattr(lb, attr) is not None:
            rep.warn(label, f"{path}.{name}")


_TCP_UNIMPLEMENTED = (("tcp_keepalive", "tcpKeepalive"),
                      ("max_connection_duration", "maxConnectionDuration"), ("idle_timeout", "idleTimeout"))
_HTTP_UNIMPLEMENTED = (("h2_upgrade_policy", "h2UpgradePolicy"), ("use_client_protocol", "useClientProtocol"),
                       ("max_concurrent_streams", "maxConcurrentStreams"), ("http2_keep_alive", "http2KeepAlive"))


def _check_cp(cp: istio.ConnectionPoolSettings | None, path: str, label: str, rep: _Report) -> None:
    if cp is None:
        return
    tcp = cp.tcp
    if tcp is not None:
        if tcp.connect_timeout is not None and tcp.connect_timeout.seconds < 0.001:
            rep.error(label, f"{path}.tcp.connectTimeout", "must be at least 1ms")
        for attr, name in _TCP_UNIMPLEMENTED:
            if getattr(tcp, attr) is not None:
                rep.warn(label, f"{path}.tcp.{name}")
    http = cp.http
    if http is not None:
        if http.max_requests_per_connection is not None and http.max_requests_per_connection < 0:
            rep.error(label, f"{path}.http.maxRequestsPerConnection", "must be >= 0")
        for attr, name in _HTTP_UNIMPLEMENTED:
            if getattr(http, attr) is not None:
                rep.warn(label, f"{path}.http.{name}")


def _check_policy_parts(p, path: str, label: str, rep: _Report) -> None:
    _check_lb(p.load_balancer, f"{path}.loadBalancer", label, rep)
    _check_cp(p.connection_pool, f"{path}.connectionPool", label, rep)
    if p.outlier_detection is not None:
        _, warns = outlier_policy_from_istio(p.outlier_detection, check_mep_on_first_eject=True)
        for msg in warns:  # each starts with its "outlierDetection.<field>" path
            rep.warn(label, path, msg)
    if p.tls is not None and (p.tls.mode or "DISABLE") != "DISABLE":
        rep.warn(label, f"{path}.tls")


def _check_traffic_policy(tp: istio.TrafficPolicy | None, path: str, label: str, rep: _Report) -> None:
    if tp is None:
        return
    _check_policy_parts(tp, path, label, rep)
    seen = set()
    for i, pls in enumerate(tp.port_level_settings):
        ppath = f"{path}.portLevelSettings[{i}]"
        if pls.port is None or not pls.port.number:
            rep.error(label, f"{ppath}.port", "missing required field")
        elif pls.port.number in seen:
            rep.error(label, f"{ppath}.port.number", f"duplicate port {pls.port.number}")
        else:
            seen.add(pls.port.number)
        _check_policy_parts(pls, ppath, label, rep)
    for attr, name in (("tunnel", "tunnel"), ("proxy_protocol", "proxyProtocol"), ("retry_budget", "retryBudget")):
        if getattr(tp, attr) is not None:
            rep.warn(label, f"{path}.{name}")


def _compile_destination_rules(dr_docs, rep: _Report) -> dict[str, _DrInfo]:
    out: dict[str, _DrInfo] = {}
    for doc in dr_docs:
        dr: istio.DestinationRule = doc.obj.spec
        label = doc.label
        ok = True
        host = dr.host.lower()
        if not host:
            rep.error(label, "spec.host", "empty host")
            ok = False
        if dr.workload_selector is not None:
            rep.warn(label, "spec.workloadSelector")
        _check_traffic_policy(dr.traffic_policy, "spec.trafficPolicy", label, rep)
        names = set()
        for i, s in enumerate(dr.subsets):
            if not s.name:
                rep.error(label, f"spec.subsets[{i}].name", "empty subset name")
                ok = False
            elif s.name in names:
                rep.error(label, f"spec.subsets[{i}].name", f"duplicate subset name {s.name!r}")
                ok = False
            names.add(s.name)
            _check_traffic_policy(s.traffic_policy, f"spec.subsets[{i}].trafficPolicy", label, rep)
        if not ok:
            continue
        info = out.get(host)
        if info is None:
            out[host] = _DrInfo(doc, dr.traffic_policy, {s.name: s for s in dr.subsets})
            continue
        # Several DestinationRules for one host: Istio merges them; the first traffic policy wins,
        # subsets are added unless the name is taken.
        if dr.traffic_policy is not None:
            if info.traffic_policy is None:
                info.traffic_policy = dr.traffic_policy
            else:
                rep.warn(label, "spec.trafficPolicy",
                         f"host {host!r} already has a trafficPolicy from {info.doc.label}; ignored")
        for i, s in enumerate(dr.subsets):
            if s.name in info.subsets:
                rep.warn(label, f"spec.subsets[{i}]",
                         f"subset {s.name!r} of host {host!r} already defined in {info.doc.label}; ignored")
            else:
                info.subsets[s.name] = s
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


def _cluster(name: str, host: str, port: int, subset: str, endpoints, dr: _DrInfo | None, subset_spec) -> ClusterPolicy:
    comps = _effective(dr.traffic_policy if dr else None,
                       subset_spec.traffic_policy if subset_spec is not None else None, port)
    lb = comps["load_balancer"]
    lb_kind = _LB_MAP.get(lb.simple, LB_LEAST_REQUEST) if lb is not None and lb.simple else LB_LEAST_REQUEST
    hash_policy = ring_config = None
    if lb is not None and lb.consistent_hash is not None:
        hash_policy, ring_config, _ = hash_policy_from_istio(lb.consistent_hash)  # validated before
        lb_kind = ring_config.lb_policy
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
    )


def _subset_endpoints(endpoints, labels: dict) -> list:
    if not labels:
        return list(endpoints)
    want = labels.items()
    return [e for e in endpoints if all(kv in e.labels for kv in want)]


# ------------------------------------------------------------------------------------------------
# VirtualService


_HTTP_UNIMPLEMENTED_FIELDS = (
    ("headers", "headers"), ("rewrite", "rewrite"),
    ("redirect", "redirect"), ("direct_response", "directResponse"), ("cors_policy", "corsPolicy"),
    ("delegate", "delegate"), ("websocket_upgrade", "websocketUpgrade"), ("append_headers", "appendHeaders"),
    ("remove_response_headers", "removeResponseHeaders"), ("append_response_headers", "appendResponseHeaders"),
    ("remove_request_headers", "removeRequestHeaders"), ("append_request_headers", "appendRequestHeaders"),
)
_DEST_UNIMPLEMENTED_FIELDS = (
    ("headers", "headers"), ("remove_response_headers", "removeResponseHeaders"),
    ("append_response_headers", "appendResponseHeaders"), ("remove_request_headers", "removeRequestHeaders"),
    ("append_request_headers", "appendRequestHeaders"),
)
_MATCH_UNIMPLEMENTED_FIELDS = (
    ("source_labels", "sourceLabels"), ("gateways", "gateways"), ("source_namespace", "sourceNamespace"),
    ("port", "port"), ("scheme", "scheme"), ("stat_prefix", "statPrefix"),
)
_PSEUDO_HEADER_KEYS = ("uri", "scheme", "method", "authority")
_HEADER_NAME = re.compile(r"[-_A-Za-z0-9]+\Z")


def _is_set(v) -> bool:
    return v is not None and v != () and v != {}


def _string_match(sm: istio.StringMatch, path: str, label: str, rep: _Report, *, header: bool):
    """Value matcher for a StringMatch, or None after reporting an error. `{}` -> presence."""
    set_ = [k for k in ("exact", "prefix", "regex") if getattr(sm, k) is not None]
    if len(set_) > 1:
        rep.error(label, path, f"only one of exact, prefix, regex may be set, got {', '.join(set_)}")
        return None
    if not set_:
        return Present()
    if sm.exact is not None:
        return Exact(sm.exact.encode("utf-8"))
    if sm.prefix is not None:
        return Prefix(sm.prefix.encode("utf-8"))
    if header and sm.regex == "*":
        return Present()
    try:
        return Regex(sm.regex)
    except ValueError as e:
        rep.error(label, f"{path}.regex", f"invalid regex '{sm.regex}': {e}")
        return None


def _compile_match(m: istio.HTTPMatchRequest, path: str, label: str, rep: _Report) -> RequestMatch | None:
    ok = True
    for attr, name in _MATCH_UNIMPLEMENTED_FIELDS:
        if _is_set(getattr(m, attr)):
            rep.warn(label, f"{path}.{name}")
    pm = None
    if m.uri is not None:
        u = m.uri
        set_ = [k for k in ("exact", "prefix", "regex") if getattr(u, k) is not None]
        if len(set_) > 1:
            rep.error(label, f"{path}.uri", f"only one of exact, prefix, regex may be set, got {', '.join(set_)}")
            ok = False
        elif not set_:
            pm = PathMatch("prefix", b"/", bool(m.ignore_uri_case))
        elif u.regex is not None:
            try:
                pm = PathMatch("regex", u.regex)
            except ValueError as e:
                rep.error(label, f"{path}.uri.regex", f"invalid regex '{u.regex}': {e}")
                ok = False
        else:
            kind = set_[0]
            pm = PathMatch(kind, getattr(u, kind).encode("utf-8"), bool(m.ignore_uri_case))
    method = authority = None
    if m.method is not None:
        method = _string_match(m.method, f"{path}.method", label, rep, header=True)
        ok = ok and method is not None
    if m.authority is not None:
        authority = _string_match(m.authority, f"{path}.authority", label, rep, header=True)
        ok = ok and authority is not None
    headers = []
    for attr, name, invert in (("headers", "headers", False), ("without_headers", "withoutHeaders", True)):
        for hname, sm in sorted(getattr(m, attr).items()):
            hpath = _key(f"{path}.{name}", hname)
            if hname.lower() in _PSEUDO_HEADER_KEYS:
                rep.warn(label, hpath, f"Istio ignores {hname!r} in {name}; use match.{hname.lower()}")
                continue
            if not _HEADER_NAME.match(hname):
                rep.error(label, hpath, f"invalid header name {hname!r}")
                ok = False
                continue
            vm = _string_match(sm, hpath, label, rep, header=True)
            if vm is None:
                ok = False
                continue
            headers.append(HeaderMatch(hname.lower().encode("ascii"), vm, invert))
    query = []
    for qname, sm in sorted(m.query_params.items()):
        qpath = _key(f"{path}.queryParams", qname)
        vm = _string_match(sm, qpath, label, rep, header=False)
        if vm is None:
            ok = False
            continue
        query.append(QueryMatch(qname.encode("utf-8"), vm))
    if not ok:
        return None
    if pm is None:
        pm = PathMatch("prefix", b"/", False)
    return RequestMatch(m.name or "", pm, method, authority, headers, query)


def _compile_http(vs_doc: _Doc, i: int, h: istio.HTTPRoute, rep: _Report) -> _HttpRoute | None:
    label = vs_doc.label
    path = f"spec.http[{i}]"
    ok = True
    for attr, name in _HTTP_UNIMPLEMENTED_FIELDS:
        if _is_set(getattr(h, attr)):
            rep.warn(label, f"{path}.{name}")
    if not h.route and h.redirect is None and h.direct_response is None and h.delegate is None:
        rep.error(label, path, "one of route, redirect, directResponse or delegate is required")
        ok = False
    exclusive = [n for a, n in (("route", "route"), ("redirect", "redirect"), ("direct_response", "directResponse"),
                                ("delegate", "delegate")) if _is_set(getattr(h, a))]
    if len(exclusive) > 1:
        rep.error(label, path, f"only one of route, redirect, directResponse or delegate may be set, got {', '.join(exclusive)}")
        ok = False
    compiled = []
    for j, m in enumerate(h.match):
        rm = _compile_match(m, f"{path}.match[{j}]", label, rep)
        if rm is None:
            ok = False
        compiled.append(rm)
    dests = []
    for j, rd in enumerate(h.route):
        dpath = f"{path}.route[{j}]"
        for attr, name in _DEST_UNIMPLEMENTED_FIELDS:
            if _is_set(getattr(rd, attr)):
                rep.warn(label, f"{dpath}.{name}")
        if not rd.destination.host:
            rep.error(label, f"{dpath}.destination.host", "empty host")
            ok = False
        dests.append((rd.destination, rd.weight or 0, dpath))
    if len(dests) > 1:
        dests = [d for d in dests if d[1] > 0]
        if not dests:
            rep.error(label, f"{path}.route", "every destination has weight 0")
            ok = False
    elif dests:
        dests = [(dests[0][0], 100, dests[0][2])]
    if not ok:
        return None
    base = h.name or vs_doc.name
    if not compiled:
        compiled = [RequestMatch("", PathMatch("prefix", b"/", False))]
    if any(m.name for m in compiled):
        # Istio emits one Envoy route per match entry, named "<route>.<match name>"
        names = tuple(f"{base}.{m.name}" if m.name else base for m in compiled)
        matches = tuple((m,) for m in compiled)
    else:
        names = (base,)
        matches = (tuple(compiled),)
    timeout = h.timeout.seconds if h.timeout is not None else 0.0
    # Consistent hashing (which drops the previous-hosts predicate) is not implemented yet.
    retry, warns = retry_policy_from_istio(h.retries, False)
    for field, msg in warns:
        rep.warn(label, f"{path}.retries.{field}" if field else f"{path}.retries", msg)
    fault, warns = fault_policy_from_istio(h.fault)
    for field, msg in warns:
        rep.warn(label, f"{path}.fault.{field}" if field else f"{path}.fault", msg)
    mirrors, warns = mirror_policies_from_istio(h, vs_doc.obj.metadata.annotations)
    for field, msg in warns:
        where = field if field.startswith("metadata.") else (f"{path}.{field}" if field else path)
        rep.warn(label, where, msg)
    return _HttpRoute(names, matches, tuple(dests), timeout, retry, fault, mirrors, path, h.retries)


def _compile_virtual_services(vs_docs, rep: _Report) -> dict[str, _VsInfo]:
    """host (lowercase, possibly wildcard) -> the VirtualService bound to it."""
    bound: dict[str, _VsInfo] = {}
    for doc in vs_docs:
        vs: istio.VirtualService = doc.obj.spec
        label = doc.label
        applies = not vs.gateways or "mesh" in vs.gateways
        if not applies:
            rep.warn(label, "spec.gateways", "does not include 'mesh': applies to gateways only; ignored by the sidecar")
        if vs.tcp:
            rep.warn(label, "spec.tcp")
        if vs.tls:
            rep.warn(label, "spec.tls")
        ok = True
        if not vs.hosts:
            rep.error(label, "spec.hosts", "at least one host is required")
            ok = False
        for i, hst in enumerate(vs.hosts):
            if not hst:
                rep.error(label, f"spec.hosts[{i}]", "empty host")
                ok = False
            elif "*" in hst[1:] or (hst.startswith("*") and hst != "*" and not hst.startswith("*.")):
                rep.error(label, f"spec.hosts[{i}]", f"invalid wildcard host {hst!r}")
                ok = False
        routes = []
        for i, h in enumerate(vs.http):
            r = _compile_http(doc, i, h, rep)
            if r is None:
                ok = False
            routes.append(r)
        if not ok or not applies:
            continue
        info = _VsInfo(doc, routes)
        for i, hst in enumerate(vs.hosts):
            key = hst.lower()
            prev = bound.get(key)
            if prev is not None:
                if prev is not info:
                    rep.warn(label, f"spec.hosts[{i}]",
                             f"host {key!r} is already bound by {prev.doc.label}; ignored for this host")
                continue
            bound[key] = info
    return bound


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


def config_hash(sources: dict[str, bytes]) -> str:
    """sha256 over the sources sorted by name (name, length, content)."""
    h = hashlib.sha256()
    for name in sorted(sources):
        data = sources[name]
        nb = name.encode("utf-8")
        h.update(len(nb).to_bytes(8, "big"))
        h.update(nb)
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def compile_sources(sources: dict[str, bytes], generation: int = 0, *, resolver: Resolver | None = None) -> Snapshot:
    """Decode, validate and compile Istio config into a Snapshot.

    `sources`: display name -> file content (see `meshcore.config.load.read_sources`); files ending
    in `.json` are JSON, the rest multi-document YAML. `resolver(name, port) -> [ip, ...]` resolves
    `resolution: DNS` addresses (default: socket.getaddrinfo).

    Error handling: raises ConfigError listing every problem found; warnings (unimplemented fields,
    empty clusters) go to `Snapshot.warnings`.
    """
    rep = _Report()
    resolver = resolver or _default_resolver
    docs: list[_Doc] = []
    for file, data in sources.items():
        parsed, problems = parse_documents(file, data)
        for number, raw in parsed:
            if raw is None:
                continue
            if isinstance(raw, dict):
                rep.order.setdefault(_label(file, number, raw.get("kind"), raw.get("metadata")), len(rep.order))
            else:
                rep.order.setdefault(_label(file, number, None, None), len(rep.order))
            d = _decode(file, number, raw, rep)
            if d is not None:
                docs.append(d)
        for problem in problems:  # a syntax error ends the file: report it after its documents
            rep.order.setdefault(file, len(rep.order))
            rep.errors.append((file, problem))

    # duplicate names per kind (and namespace)
    first: dict[tuple, _Doc] = {}
    unique: list[_Doc] = []
    for d in docs:
        k = (d.kind, d.namespace, d.name)
        if k in first:
            p = first[k]
            rep.error(d.label, "metadata.name",
                      f"duplicate {d.kind} {d.name!r} (first defined in {p.file} document {p.number})")
            continue
        first[k] = d
        unique.append(d)

    by_kind: dict[str, list[_Doc]] = {k: [] for k in istio.KINDS}
    for d in unique:
        by_kind[d.kind].append(d)

    services = _compile_service_entries(by_kind["ServiceEntry"], by_kind["WorkloadEntry"], rep, resolver)
    drs = _compile_destination_rules(by_kind["DestinationRule"], rep)
    bound = _compile_virtual_services(by_kind["VirtualService"], rep)

    if rep.errors:
        raise ConfigError(rep.sorted_errors())

    # --- clusters for every service port, plus DestinationRule subsets
    clusters: dict[str, ClusterPolicy] = {}
    for host, svc in services.items():
        dr = _most_specific(host, drs)
        for number in svc.ports:
            eps = svc.endpoints.get(number, [])
            name = f"outbound|{number}||{host}"
            clusters[name] = _cluster(name, host, number, "", eps, dr, None)
            if dr is not None:
                for sname, sub in dr.subsets.items():
                    cname = f"outbound|{number}|{sname}|{host}"
                    clusters[cname] = _cluster(cname, host, number, sname, _subset_endpoints(eps, sub.labels), dr, sub)

    # --- virtual hosts: (host, port) for every service, and VirtualService hosts without a service
    vhost_targets: list[tuple[str, int]] = []
    for host, svc in services.items():
        for number in svc.ports:
            vhost_targets.append((host, number))
    for key in bound:
        if key not in services:
            vhost_targets.append((key, 80))

    def resolve_dest(dest: istio.Destination, vport: int, vs_label: str, dpath: str) -> str:
        dhost = dest.host.lower()
        svc = services.get(dhost)
        if dest.port is not None and dest.port.number:
            dport = dest.port.number
        elif svc is not None and len(svc.ports) == 1:
            dport = next(iter(svc.ports))
        else:
            dport = vport
        subset = dest.subset or ""
        cname = f"outbound|{dport}|{subset}|{dhost}"
        if cname in clusters:
            return cname
        dr = _most_specific(dhost, drs)
        sub = dr.subsets.get(subset) if (dr is not None and subset) else None
        if svc is None:
            rep.warn(vs_label, f"{dpath}.destination.host",
                     f"host {dhost!r} has no ServiceEntry; cluster {cname} has no endpoints")
        elif dport not in svc.ports:
            rep.warn(vs_label, f"{dpath}.destination.port",
                     f"service {dhost!r} has no port {dport}; cluster {cname} has no endpoints")
        elif subset and sub is None:
            rep.warn(vs_label, f"{dpath}.destination.subset",
                     f"subset {subset!r} is not defined by a DestinationRule for {dhost!r}; cluster {cname} has no endpoints")
        clusters[cname] = _cluster(cname, dhost, dport, subset, (), dr, sub)
        return cname

    vhosts: dict[str, VirtualHostPolicy] = {}
    bare: dict[str, VirtualHostPolicy] = {}
    for host, port in vhost_targets:
        info = _most_specific(host, bound)
        routes: list[RoutePolicy] = []
        if info is not None:
            for r in info.routes:
                wcs = tuple(WeightedCluster(resolve_dest(d, port, info.doc.label, dp), w) for d, w, dp in r.dests)
                total = sum(wc.weight for wc in wcs)
                mirrors = tuple(
                    (m, "" if m.is_capture else resolve_dest(_MirrorDest(m), port, info.doc.label, f"{r.path}.mirror"))
                    for m in r.mirrors)
                hashing = _hash_policies(wcs, clusters)
                retry = r.retry
                if len(wcs) == 1 and clusters[wcs[0].cluster].ring_config is not None and retry is not None:
                    # Istio >= 1.23 drops previous_hosts when the one destination hashes
                    retry = retry_policy_from_istio(r.retries, True)[0]
                for name, ms in zip(r.names, r.matches):
                    routes.append(RoutePolicy(name=name, matches=ms, destinations=wcs, total_weight=total,
                                              timeout=r.timeout, retry=retry, fault=r.fault,
                                              mirrors=mirrors, hash_policies=hashing))
        if not routes:
            cname = f"outbound|{port}||{host}"
            if cname not in clusters:
                clusters[cname] = _cluster(cname, host, port, "", (), _most_specific(host, drs), None)
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
        vh = VirtualHostPolicy(name=f"{host}:{port}", routes=tuple(routes))
        vhosts[f"{host}:{port}"] = vh
        if host not in bare or port == 80:
            bare[host] = vh
    for host, vh in bare.items():
        vhosts[host] = vh

    return Snapshot(
        generation=generation,
        config_hash=config_hash(sources),
        vhosts=vhosts,
        clusters=clusters,
        warnings=tuple(rep.sorted_warnings()),
        route_table=RouteTable.from_vhosts(vhosts),
    )
