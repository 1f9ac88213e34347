"""Istio's validator (pkg/config/validation, istio/istio) for the four kinds meshcore reads.

What Istio's admission webhook rejects, meshcore rejects, with the same reasons, and what it warns
about, meshcore warns about; each problem is `(field path, message)` so the compiler can name file,
document and field. Pure functions over the decoded Structs of meshcore.config.istio; nothing here
decides behaviour (meshcore.config.compile does), so a check never hides a missing feature.

Each `check_*` returns a `Checks`: `.errors` and `.warnings`, lists of (path, message).
"""
from __future__ import annotations

import base64
import ipaddress
import posixpath
import re

from meshcore.config import istio
from meshcore.routing.matchers import compile_re2

__all__ = ["Checks", "check_virtual_service", "check_destination_rule", "check_service_entry",
           "check_workload_entry", "check_wildcard_domain", "check_fqdn", "is_claim",
           "header_value_problem", "PROTOCOLS"]

_LABEL = r"[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?"
_DNS1123_LABEL = re.compile(f"{_LABEL}\\Z")
_WILDCARD_LABEL = re.compile(rf"(?:\*|(?:\*|\*-)?{_LABEL})\Z")
_QUALIFIED_NAME = r"(?:[A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_TAG_KEY = re.compile(rf"((?:{_LABEL}(?:\.{_LABEL})*/))?({_QUALIFIED_NAME})\Z")
_LABEL_VALUE = re.compile(rf"(?:{_QUALIFIED_NAME})?\Z")
_HEADER_NAME = re.compile(r"[-_A-Za-z0-9!#$%&'*+.^`|~]+\Z")  # an RFC 7230 token
_HEADER_VALUE_BAD = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
_PSEUDO_HEADERS = (":method", ":scheme", ":authority", ":path", ":status")
_CLAIM = re.compile(r"@request\.auth\.claims(?:\.[^.\[\]]+)+\Z|@request\.auth\.claims(?:\[[^\[\]]+\])+\Z")
PROTOCOLS = ("tcp", "udp", "grpc", "grpc-web", "http", "http_proxy", "http2", "https", "tls",
             "mongo", "redis", "mysql")
_CORS_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE", "*")
_REDIRECT_CODES_MIN, _REDIRECT_CODES_MAX = 300, 399


class Checks:
    __slots__ = ("errors", "warnings")

    def __init__(self):
        self.errors: list[tuple[str, str]] = []
        self.warnings: list[tuple[str, str]] = []

    def error(self, path: str, msg: str) -> None:
        self.errors.append((path, msg))

    def warn(self, path: str, msg: str) -> None:
        self.warnings.append((path, msg))


def _k(path: str, key: str) -> str:
    return f"{path}[{key!r}]".replace("'", '"') if not re.match(r"[A-Za-z_][A-Za-z0-9_-]*\Z", key) \
        else f"{path}.{key}"


# ------------------------------------------------------------------------------------------------
# Names, ports, labels


def is_claim(name: str) -> bool:
    """`@request.auth.claims.<name>` / `@request.auth.claims[<name>]...` (JWT claim routing)."""
    return _CLAIM.match(name) is not None


def is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


def _dns1123_labels(domain: str) -> str | None:
    parts = domain.split(".")
    if parts[-1].isdigit():
        return f"domain name {domain!r} invalid (top level domain {parts[-1]!r} cannot be all-numeric)"
    for i, label in enumerate(parts):
        if i == len(parts) - 1 and label == "":
            return None
        if len(label) > 63 or not _DNS1123_LABEL.match(label):
            return f"domain name {domain!r} invalid (label {label!r} invalid)"
    return None


def _preconditions(name: str) -> str | None:
    if len(name) > 255:
        return f"domain name {name!r} too long (max 255)"
    if not name:
        return "empty domain name not allowed"
    return None


def check_fqdn(name: str) -> str | None:
    return _preconditions(name) or _dns1123_labels(name)


def check_wildcard_domain(domain: str) -> str | None:
    """A valid FQDN that may start with a wildcard label (`*`, `*.example.com`, `*x.example.com`)."""
    p = _preconditions(domain)
    if p:
        return p
    first, dot, rest = domain.partition(".")
    if len(first) > 63 or not _WILDCARD_LABEL.match(first):
        return f"domain name {domain!r} invalid (label {first!r} invalid)"
    return _dns1123_labels(rest) if dot else None


def _port(n) -> str | None:
    return None if 1 <= n <= 65535 else f"port number {n} must be in the range 1..65535"


def _port_name(name: str) -> str | None:
    return None if name and len(name) <= 63 and _DNS1123_LABEL.match(name) else f"invalid port name: {name}"


def _labels(v: Checks, labels: dict, path: str) -> None:
    for k, val in labels.items():
        m = _TAG_KEY.match(k)
        if m is None or (m.group(1) and len(m.group(1)) - 1 > 253) or len(m.group(2)) > 63:
            v.error(_k(path, k), f"invalid tag key: {k!r}")
        if not _LABEL_VALUE.match(val) or len(val) > 63:
            v.error(_k(path, k), f"invalid tag value: {val!r}")


def _duration(v: Checks, d, path: str) -> None:
    if d is None:
        return
    nanos = round(d.seconds * 1e9)
    if nanos < 1_000_000:
        v.error(path, "duration must be greater than 1ms")
    elif nanos % 1_000_000:
        v.error(path, "only durations to ms precision are supported")


def _string_match(v: Checks, sm, path: str, *, allow_empty_prefix: bool = False) -> None:
    if sm is None:
        return
    set_ = [k for k in ("exact", "prefix", "regex") if getattr(sm, k) is not None]
    if len(set_) > 1:  # a protobuf oneof: Istio's decoder refuses the second one
        v.error(path, f"only one of exact, prefix, regex may be set, got {', '.join(set_)}")
        return
    if sm.prefix is not None and sm.prefix == "" and not allow_empty_prefix:
        v.error(f"{path}.prefix", "prefix string match should not be empty")
    if sm.regex is not None:
        _regex(v, sm.regex, f"{path}.regex")


def _regex(v: Checks, pattern: str, path: str) -> None:
    if pattern == "":
        v.error(path, "regex string match should not be empty")
        return
    if len(pattern) > 1024:
        v.error(path, "regex is too large, max length allowed is 1024")
        return
    try:
        compile_re2(pattern)
    except ValueError as e:
        v.error(path, f"invalid regex '{pattern}': {e}")


def header_value_problem(value: str) -> str | None:
    """Why Envoy would refuse this header value (control characters, a stray `%`), or None."""
    if _HEADER_VALUE_BAD.search(value):
        return f"header value configuration {value!r} is invalid"
    i, n = 0, len(value)
    while i < n:
        if value[i] == "%":
            if i + 1 >= n:
                return "invalid header configuration. Un-escaped %"
            if value[i + 1] == "%":
                i += 2
                continue
            end = value.find("%", i + 1)
            if end < 0:
                return f"invalid header configuration. Un-terminated variable expression {value!r}"
            i = end + 1
            continue
        i += 1
    return None


def _export_to(v: Checks, export_to, namespace: str, path: str, *, service_entry=False,
               selector=False) -> None:
    if not export_to:
        return
    seen = set()
    for i, e in enumerate(export_to):
        key = namespace if e == "." else e
        if key in seen:
            v.error(f"{path}[{i}]", f"duplicate entries in exportTo: . and current namespace {namespace}"
                    if key != e else f"duplicate entries in exportTo for entry {e}")
            continue
        if e == "~" and not service_entry:
            v.error(f"{path}[{i}]", "exportTo ~ (no one) is only allowed for ServiceEntry")
            continue
        if e not in ("*", "~") and not (len(key) <= 63 and _DNS1123_LABEL.match(key)):
            v.error(f"{path}[{i}]", f"only . or * or a valid DNS 1123 label is allowed as exportTo entry, got {e!r}")
            continue
        seen.add(key)
    if selector and seen:
        if namespace in seen:
            if len(seen) > 1:
                v.error(path, "destination rule with workload selector cannot have multiple entries in exportTo")
        else:
            v.error(path, "destination rule with workload selector cannot have exportTo beyond current namespace")
    if "*" in seen and len(export_to) > 1:
        v.error(path, "cannot have both public (*) and non-public exportTo values for a resource")
    if "~" in seen and len(export_to) > 1:
        v.error(path, "cannot export service entry to no one (~) and someone")


# ------------------------------------------------------------------------------------------------
# VirtualService


def _gateway_names(v: Checks, names, path: str) -> None:
    for i, g in enumerate(names):
        p = f"{path}[{i}]"
        ns, slash, name = g.partition("/")
        if not slash:
            if "." in g:
                parts = g.split(".")
                v.warn(p, f"using legacy gatewayName format {g!r}; prefer the <namespace>/<name> "
                          f"format: {parts[1]}/{parts[0]!r}")
            problem = check_fqdn(g)
            if problem:
                v.error(p, problem)
            continue
        if not ns or not name:
            v.error(p, "config namespace and gateway name cannot be empty")
        if not _DNS1123_LABEL.match(ns or "-"):
            v.error(p, f"invalid value for namespace: {ns!r}")
        if not _DNS1123_LABEL.match(name or "-"):
            v.error(p, f"invalid value for gateway name: {name!r}")


def _header_ops(v: Checks, headers, path: str) -> None:
    if headers is None:
        return
    for side in ("request", "response"):
        ops = getattr(headers, side)
        if ops is None:
            continue
        sp = f"{path}.{side}"
        for verb in ("set", "add"):
            for name, value in getattr(ops, verb).items():
                hp = _k(f"{sp}.{verb}", name)
                low = name.lower()
                if not name:
                    v.error(hp, "header name cannot be empty")
                elif side == "request":
                    if (low.startswith(":") or low == "host") and low not in (":authority", "host"):
                        v.error(hp, f'invalid header {name!r}: header cannot have ":" prefix')
                elif low == "host":
                    v.error(hp, f"invalid header {name!r}: cannot set Host header")
                elif low.startswith(":"):
                    v.error(hp, f'invalid header {name!r}: header cannot have ":" prefix')
                problem = header_value_problem(value)
                if problem:
                    v.error(hp, problem)
        for i, name in enumerate(ops.remove):
            hp = f"{sp}.remove[{i}]"
            if not name:
                v.error(hp, "header name cannot be empty")
            elif name.lower() == "host":
                v.error(hp, f"invalid header {name!r}: cannot set Host header")
            elif name.startswith(":"):
                v.error(hp, f'invalid header {name!r}: header cannot have ":" prefix')


def _destination(v: Checks, d, path: str) -> None:
    if d is None:
        return
    if d.host == "*":
        v.error(f"{path}.host", f"invalid destination host {d.host}")
    else:
        problem = check_wildcard_domain(d.host)
        if problem:
            v.error(f"{path}.host", problem)
    if d.subset is not None:
        if not d.subset:
            v.error(f"{path}.subset", "subset name cannot be empty")
        elif not _DNS1123_LABEL.match(d.subset):
            v.error(f"{path}.subset", f"subset name is invalid: {d.subset}")
    if d.port is not None:
        problem = _port(d.port.number or 0)
        if problem:
            v.error(f"{path}.port.number", problem)


def _authority_once(v: Checks, h: istio.HTTPRoute, path: str) -> None:
    current = h.rewrite.authority if h.rewrite is not None and h.rewrite.authority else ""
    req = h.headers.request if h.headers is not None else None
    if req is None:
        return
    for verb in ("set", "add"):
        for k, val in getattr(req, verb).items():
            if k.lower() not in (":authority", "host"):
                continue
            if current:
                v.error(f"{path}.headers.request.{verb}",
                        f"authority header cannot be set multiple times: have {current!r}, attempting to set {val!r}")
            current = val


def _http_route(v: Checks, h: istio.HTTPRoute, path: str, delegate: bool) -> None:
    root = not delegate and h.delegate is not None
    if root:
        if h.redirect is not None:
            v.error(f"{path}.redirect", f"root HTTP route {h.name or ''} must not specify redirect".replace("  ", " "))
        if h.route:
            v.error(f"{path}.route", f"root HTTP route {h.name or ''} must not specify route".replace("  ", " "))
    else:
        if delegate and h.delegate is not None:
            v.error(f"{path}.delegate", "delegate HTTP route cannot contain delegate")
        if h.redirect is not None:
            if h.route:
                v.error(path, "HTTP route cannot contain both route and redirect")
            if h.fault is not None:
                v.error(path, "HTTP route cannot contain both fault and redirect")
            if h.rewrite is not None:
                v.error(path, "HTTP route rule cannot contain both rewrite and redirect")
            if h.direct_response is not None:
                v.error(path, "HTTP route rule cannot contain both direct_response and redirect")
        elif h.direct_response is not None:
            if h.route:
                v.error(path, "HTTP route cannot contain both route and direct_response")
            if h.fault is not None:
                v.error(path, "HTTP route cannot contain both fault and direct_response")
            if h.rewrite is not None:
                v.error(path, "HTTP route rule cannot contain both rewrite and direct_response")
        elif not h.route:
            v.error(path, "HTTP route, redirect or direct_response is required")
    if h.mirror is not None and h.mirrors:
        v.error(path, "HTTP route cannot contain both mirror and mirrors")
    for j, m in enumerate(h.match):
        mp = f"{path}.match[{j}]"
        for attr, name in (("headers", "headers"), ("without_headers", "withoutHeaders")):
            for hname, sm in getattr(m, attr).items():
                hp = _k(f"{mp}.{name}", hname)
                if not hname:
                    v.error(hp, "header name cannot be empty")
                elif not (is_claim(hname) or hname in _PSEUDO_HEADERS or _HEADER_NAME.match(hname)):
                    v.error(hp, f"invalid header name {hname!r}")
                if not (name == "withoutHeaders" and sm.regex == "*"):
                    _string_match(v, sm, hp)
        _string_match(v, m.uri, f"{mp}.uri", allow_empty_prefix=True)
        for attr in ("scheme", "method", "authority"):
            _string_match(v, getattr(m, attr), f"{mp}.{attr}")
        for qname, sm in m.query_params.items():
            _string_match(v, sm, _k(f"{mp}.queryParams", qname))
        if m.port:
            problem = _port(m.port)
            if problem:
                v.error(f"{mp}.port", problem)
        _labels(v, m.source_labels, f"{mp}.sourceLabels")
        _gateway_names(v, m.gateways, f"{mp}.gateways")
        if m.source_namespace and not _DNS1123_LABEL.match(m.source_namespace):
            v.error(f"{mp}.sourceNamespace", f"sourceNamespace match {m.source_namespace} is invalid")
    _header_ops(v, h.headers, f"{path}.headers")
    if h.cors_policy is not None:
        c = h.cors_policy
        cp = f"{path}.corsPolicy"
        for i, o in enumerate(c.allow_origins):
            op = f"{cp}.allowOrigins[{i}]"
            if not (o.exact or o.prefix or o.regex):
                v.error(op, "'' is not a valid match type for CORS allow origins")
            elif o.regex is not None:
                _regex(v, o.regex, f"{op}.regex")
        for i, meth in enumerate(c.allow_methods):
            if meth not in _CORS_METHODS:
                v.error(f"{cp}.allowMethods[{i}]", f"{meth!r} is not a supported HTTP method")
        for attr, name in (("allow_headers", "allowHeaders"), ("expose_headers", "exposeHeaders")):
            for i, hname in enumerate(getattr(c, attr)):
                if not hname:
                    v.error(f"{cp}.{name}[{i}]", "header name cannot be empty")
                elif hname != "*" and not _HEADER_NAME.match(hname):
                    v.error(f"{cp}.{name}[{i}]", f"header name {hname} is not a valid header name")
        if c.max_age is not None:
            _duration(v, c.max_age, f"{cp}.maxAge")
            if round(c.max_age.seconds * 1e9) % 1_000_000_000:
                v.error(f"{cp}.maxAge", "max_age duration is accurate only to seconds precision")
    if h.fault is not None and h.fault.abort is None and h.fault.delay is None:
        v.error(f"{path}.fault", "HTTP fault injection must have an abort and/or a delay")
    if h.mirror_percent is not None:
        if h.mirror_percent > 100:
            v.error(f"{path}.mirror_percent", f"mirror_percent must have a max value of 100 (it has {h.mirror_percent})")
        v.warn(f"{path}.mirror_percent", 'using deprecated setting "mirrorPercent", use "mirrorPercentage" instead')
    _destination(v, h.mirror, f"{path}.mirror")
    for i, mp in enumerate(h.mirrors):
        _destination(v, mp.destination, f"{path}.mirrors[{i}].destination")
    r = h.redirect
    if r is not None:
        rp = f"{path}.redirect"
        if r.uri and r.prefix_rewrite:
            v.error(rp, "redirect may only specify one of uri or prefix_rewrite")
        if r.prefix_rewrite:
            for j, m in enumerate(h.match):
                if m.uri is not None and m.uri.prefix is None:
                    v.error(rp, "redirect prefix_rewrite requires all URI matches to use prefix match type")
                    break
        if not (r.uri or r.prefix_rewrite or r.authority or r.port or r.derive_port or r.scheme):
            v.error(rp, "redirect must specify URI, authority, scheme, or port")
        if r.redirect_code and not _REDIRECT_CODES_MIN <= r.redirect_code <= _REDIRECT_CODES_MAX:
            v.error(f"{rp}.redirectCode", f"{r.redirect_code} is not a valid redirect code, must be 3xx")
        if r.scheme and r.scheme not in ("http", "https"):
            v.error(f"{rp}.scheme", 'invalid redirect scheme, must be "http" or "https"')
        if r.port:
            problem = _port(r.port)
            if problem:
                v.error(f"{rp}.port", problem)
        if r.port and r.derive_port:
            v.error(rp, "only one of port or derivePort may be set")
    dr = h.direct_response
    if dr is not None:
        dp = f"{path}.directResponse"
        if dr.body is not None:
            if dr.body.string is not None and dr.body.bytes_ is not None:
                v.error(f"{dp}.body", "only one of string or bytes may be set")
            if dr.body.bytes_ is not None:
                try:
                    base64.b64decode(dr.body.bytes_, validate=True)
                except ValueError:
                    v.error(f"{dp}.body.bytes", "invalid base64")
            size = len((dr.body.string or "").encode()) + len(dr.body.bytes_ or "") * 3 // 4
            if size > 1024 * 1024:
                v.error(f"{dp}.body", "large direct_responses may impact control plane performance, must be less than 1MB")
            elif size > 100 * 1024:
                v.warn(f"{dp}.body", "large direct_responses may impact control plane performance")
        if not 200 <= dr.status <= 600:
            v.error(f"{dp}.status", f"HTTP status {dr.status} is not in range 200-599")
    rw = h.rewrite
    if rw is not None:
        wp = f"{path}.rewrite"
        if rw.uri and rw.uri_regex_rewrite is not None:
            v.error(wp, "rewrite may only contain one of URI or UriRegexRewrite")
        if not rw.uri and rw.uri_regex_rewrite is None and not rw.authority:
            v.error(wp, "rewrite must specify at least one of URI, UriRegexRewrite, or authority. "
                        "Only one of URI or UriRegexRewrite may be specified")
        rr = rw.uri_regex_rewrite
        if rr is not None:
            if not rr.match or not rr.rewrite:
                v.error(f"{wp}.uriRegexRewrite", "UriRegexRewrite requires both Rewrite and Match fields to be specified")
            else:
                _regex(v, rr.match, f"{wp}.uriRegexRewrite.match")
    _authority_once(v, h, path)
    total = 0
    for i, rd in enumerate(h.route):
        rp = f"{path}.route[{i}]"
        _header_ops(v, rd.headers, f"{rp}.headers")
        _destination(v, rd.destination, f"{rp}.destination")
        total += rd.weight or 0
    if len(h.route) > 1 and total == 0:
        v.error(f"{path}.route", "total destination weight = 0")
    if h.timeout is not None:
        _duration(v, h.timeout, f"{path}.timeout")


def check_virtual_service(vs: istio.VirtualService, namespace: str) -> Checks:
    v = Checks()
    delegate = not vs.hosts
    if delegate:
        if vs.gateways:
            v.error("spec.gateways", "delegate virtual service must have no gateways specified")
        if vs.tls:
            v.error("spec.tls", "delegate virtual service must have no tls route specified")
        if vs.tcp:
            v.error("spec.tcp", "delegate virtual service must have no tcp route specified")
    applies_to_gateway = any(g != "mesh" for g in vs.gateways)
    if vs.gateways:
        _gateway_names(v, [g for g in vs.gateways if g != "mesh"], "spec.gateways")
    applies_to_mesh = not applies_to_gateway
    if not applies_to_gateway:
        for i, h in enumerate(vs.http):
            for j, m in enumerate(h.match):
                for attr, name in (("headers", "headers"), ("without_headers", "withoutHeaders")):
                    for key in getattr(m, attr):
                        if is_claim(key):
                            v.error(_k(f"spec.http[{i}].match[{j}].{name}", key),
                                    f"JWT claim based routing (key: {key}) is only supported for gateway, "
                                    f"found no gateways: {list(vs.gateways)}")
    all_valid = True
    for i, host in enumerate(vs.hosts):
        problem = check_wildcard_domain(host)
        if problem:
            if not is_ip(host):
                v.error(f"spec.hosts[{i}]", problem)
                all_valid = False
        elif applies_to_mesh and host == "*":
            v.error(f"spec.hosts[{i}]", "wildcard host * is not allowed for virtual services bound to the mesh gateway")
            all_valid = False
    if all_valid:
        for i in range(len(vs.hosts)):
            for j in range(i + 1, len(vs.hosts)):
                if _hosts_match(vs.hosts[i].lower(), vs.hosts[j].lower()):
                    v.error(f"spec.hosts[{j}]", f"duplicate hosts in virtual service: {vs.hosts[i]} & {vs.hosts[j]}")
    if not vs.http and not vs.tcp and not vs.tls:
        v.error("spec", "http, tcp or tls must be provided in virtual service")
    for i, h in enumerate(vs.http):
        _http_route(v, h, f"spec.http[{i}]", delegate)
    _export_to(v, vs.export_to, namespace, "spec.exportTo")
    return v


def _hosts_match(a: str, b: str) -> bool:
    """Istio's host.Name.Matches: equal, or one wildcard covers the other."""
    if a == b:
        return True
    for x, y in ((a, b), (b, a)):
        if x == "*":
            return True
        if x.startswith("*") and y.endswith(x[1:]):
            return True
    return False


# ------------------------------------------------------------------------------------------------
# DestinationRule


def _is_prime(x: int) -> bool:
    if x != 0 and x < 4:
        return True
    if x & 1 == 0:
        return False
    f = 3
    while f * f <= x:
        if x % f == 0:
            return False
        f += 2
    return True


def _localities(v: Checks, localities, path: str) -> bool:
    seen: dict = {}
    for loc in localities:
        n = loc.count("*")
        if n and (n > 1 or not loc.endswith("*")):
            v.error(path, f"locality {loc} wildcard '*' number can not exceed 1 and must be in the end")
            return False
        if "*" in seen:
            v.error(path, f"locality {loc} overlap with previous specified ones")
            return False
        items = loc.split("/", 2)
        if any(not x for x in items):
            v.error(path, f"locality {loc} must not contain empty region/zone/subzone info")
            return False
        region = items[0]
        if len(items) == 1:
            if region in seen:
                v.error(path, f"locality {loc} overlap with previous specified ones")
                return False
            seen[region] = {"*": {"*": True}}
        elif len(items) == 2:
            zones = seen.get(region)
            if zones is not None and ("*" in zones or items[1] in zones):
                v.error(path, f"locality {loc} overlap with previous specified ones")
                return False
            seen.setdefault(region, {})[items[1]] = {"*": True}
        else:
            zones = seen.get(region)
            if zones is not None and "*" in zones:
                v.error(path, f"locality {loc} overlap with previous specified ones")
                return False
            subs = (zones or {}).get(items[1])
            if subs is not None and (subs.get("*") or subs.get(items[2])):
                v.error(path, f"locality {loc} overlap with previous specified ones")
                return False
            seen.setdefault(region, {}).setdefault(items[1], {})[items[2]] = True
    return True


_TOPOLOGY = ("topology.kubernetes.io/region", "topology.kubernetes.io/zone", "topology.istio.io/subzone")


def _load_balancer(v: Checks, lb, outlier, path: str) -> None:
    if lb is None:
        return
    ch = lb.consistent_hash
    if ch is not None:
        if ch.http_cookie is not None:
            names = set()
            for i, a in enumerate(ch.http_cookie.attributes):
                if not a.name:
                    v.error(f"{path}.consistentHash.httpCookie.attributes[{i}].name", "cookie attribute name cannot be empty")
                elif a.name in names:
                    v.error(f"{path}.consistentHash.httpCookie.attributes[{i}].name", f"duplicate cookie attribute name: {a.name}")
                names.add(a.name)
        if ch.minimum_ring_size:
            v.warn(f"{path}.consistentHash.minimumRingSize",
                   "consistent hash MinimumRingSize is deprecated, use ConsistentHashLB's RingHash configuration instead")
            if ch.ring_hash is not None or ch.maglev is not None:
                v.error(f"{path}.consistentHash", "only one of MinimumRingSize or Maglev/Ringhash can be specified")
        if ch.maglev is not None:
            size = ch.maglev.table_size or 0
            mp = f"{path}.consistentHash.maglev.tableSize"
            if size == 0:
                v.error(mp, "tableSize must be set for maglev")
            if size >= 5000011:
                v.error(mp, "tableSize must be less than 5000011 for maglev")
            if not _is_prime(size):
                v.error(mp, "tableSize must be a prime number for maglev")
    if lb.locality_lb_setting is not None and lb.zone_aware_lb_setting is not None:
        v.error(path, "only one of localityLbSetting and zoneAwareLbSetting can be set")
    loc = lb.locality_lb_setting
    if loc is not None:
        lp = f"{path}.localityLbSetting"
        if loc.distribute and loc.failover:
            v.error(lp, "can not simultaneously specify 'distribute' and 'failover'")
        else:
            ok = True
            if loc.failover and loc.failover_priority:
                for label in loc.failover_priority:
                    if label in _TOPOLOGY:
                        v.error(f"{lp}.failoverPriority",
                                f"can not simultaneously set 'failover' and topology label '{label}' in 'failover_priority'")
                        ok = False
                        break
            for i, d in enumerate(loc.distribute if ok else ()):
                total = 0
                for to, w in d.to.items():
                    if w <= 0 or w > 100:
                        v.error(f"{lp}.distribute[{i}].to", "locality weight must be in range [1, 100]")
                        ok = False
                        break
                    total += w
                if not ok:
                    break
                if total != 100:
                    v.error(f"{lp}.distribute[{i}].to", f"total locality weight {total} != 100")
                    ok = False
                    break
                if not _localities(v, list(d.to), f"{lp}.distribute[{i}].to"):
                    ok = False
                    break
            if ok:
                _localities(v, [d.from_ or "" for d in loc.distribute], f"{lp}.distribute")
                if (loc.failover or loc.failover_priority) and outlier is None:
                    v.warn(lp, "outlier detection policy must be provided for failover")
                for i, f in enumerate(loc.failover):
                    fp = f"{lp}.failover[{i}]"
                    src, dst = f.from_ or "", f.to or ""
                    if src == dst:
                        v.error(fp, "locality lb failover settings must specify different regions")
                    if "/" in src or "/" in dst:
                        v.error(fp, "locality lb failover only specify region")
                    if "*" in src or "*" in dst:
                        v.error(fp, "locality lb failover region should not contain '*' wildcard")
    w = lb.warmup
    if w is not None:
        wp = f"{path}.warmup"
        if w.duration is None:
            v.error(f"{wp}.duration", "duration is required")
        else:
            _duration(v, w.duration, f"{wp}.duration")
        if w.minimum_percent is not None and w.minimum_percent > 100:
            v.error(f"{wp}.minimumPercent", "minimumPercent value should be less than or equal to 100")
        if w.minimum_percent is not None and w.minimum_percent < 0:
            v.error(f"{wp}.minimumPercent", "minimumPercent value should be greater than or equal to 0")
        if w.aggression is not None and w.aggression <= 0:
            v.error(f"{wp}.aggression", "aggression should be greater than 0")
    if lb.warmup_duration_secs is not None:
        _duration(v, lb.warmup_duration_secs, f"{path}.warmupDurationSecs")


def _connection_pool(v: Checks, cp, path: str) -> None:
    if cp is None:
        return
    if cp.http is None and cp.tcp is None:
        v.error(path, "connection pool must have at least one field")
        return
    h = cp.http
    if h is not None:
        hp = f"{path}.http"
        for attr, name, what in (("http1_max_pending_requests", "http1MaxPendingRequests", "http1 max pending requests"),
                                 ("http2_max_requests", "http2MaxRequests", "http2 max requests"),
                                 ("max_requests_per_connection", "maxRequestsPerConnection", "max requests per connection"),
                                 ("max_retries", "maxRetries", "max retries"),
                                 ("max_concurrent_streams", "maxConcurrentStreams", "max concurrent streams")):
            val = getattr(h, attr)
            if val is not None and val < 0:
                v.error(f"{hp}.{name}", f"{what} must be non-negative")
        _duration(v, h.idle_timeout, f"{hp}.idleTimeout")
        if h.h2_upgrade_policy == "UPGRADE" and h.use_client_protocol:
            v.error(hp, "use client protocol must not be true when H2UpgradePolicy is UPGRADE")
        ka = h.http2_keep_alive
        if ka is not None:
            if ka.interval is None:
                v.error(f"{hp}.http2KeepAlive.interval", "http2 keepalive interval is required")
            else:
                _duration(v, ka.interval, f"{hp}.http2KeepAlive.interval")
            if ka.timeout is None:
                v.error(f"{hp}.http2KeepAlive.timeout", "http2 keepalive timeout is required")
            else:
                _duration(v, ka.timeout, f"{hp}.http2KeepAlive.timeout")
    t = cp.tcp
    if t is not None:
        tp = f"{path}.tcp"
        if t.max_connections is not None and t.max_connections < 0:
            v.error(f"{tp}.maxConnections", "max connections must be non-negative")
        _duration(v, t.connect_timeout, f"{tp}.connectTimeout")
        _duration(v, t.max_connection_duration, f"{tp}.maxConnectionDuration")
        if t.idle_timeout is not None and round(t.idle_timeout.seconds * 1000) != 0:
            _duration(v, t.idle_timeout, f"{tp}.idleTimeout")
        if t.tcp_keepalive is not None:
            _duration(v, t.tcp_keepalive.time, f"{tp}.tcpKeepalive.time")
            _duration(v, t.tcp_keepalive.interval, f"{tp}.tcpKeepalive.interval")


def _outlier(v: Checks, od, path: str) -> None:
    if od is None:
        return
    _duration(v, od.base_ejection_time, f"{path}.baseEjectionTime")
    _duration(v, od.interval, f"{path}.interval")
    if od.consecutive_local_origin_failures and not od.split_external_local_origin_errors:
        v.error(f"{path}.consecutiveLocalOriginFailures",
                "outlier detection consecutive local origin failures is specified, but split external "
                "local origin errors is set to false")
    for attr, name in (("max_ejection_percent", "maxEjectionPercent"), ("min_health_percent", "minHealthPercent")):
        val = getattr(od, attr)
        if val is not None and not 0 <= val <= 100:
            v.error(f"{path}.{name}", f"percentage {val} is not in range 0..100")


def _tls(v: Checks, tls, path: str) -> None:
    if tls is None:
        return
    mode = tls.mode or "DISABLE"
    if tls.insecure_skip_verify:
        if mode == "SIMPLE" and (tls.ca_certificates or tls.credential_name or tls.subject_alt_names):
            v.error(path, "cannot specify CaCertificates or CredentialName or SubjectAltNames when "
                          "InsecureSkipVerify is set true")
        if mode == "MUTUAL" and (tls.ca_certificates or tls.subject_alt_names):
            v.error(path, "cannot specify CaCertificates or SubjectAltNames when InsecureSkipVerify is set true")
    if mode in ("SIMPLE", "MUTUAL") and tls.credential_name:
        if tls.client_certificate or tls.ca_certificates or tls.private_key or tls.ca_crl:
            v.error(path, "cannot specify client certificates or CA certificate or CA CRL If credentialName is set")
        return
    if mode == "MUTUAL":
        if not tls.client_certificate:
            v.error(f"{path}.clientCertificate", "client certificate required for mutual tls")
        if not tls.private_key:
            v.error(f"{path}.privateKey", "private key required for mutual tls")


def _policy_parts(v: Checks, p, path: str) -> None:
    _outlier(v, p.outlier_detection, f"{path}.outlierDetection")
    _connection_pool(v, p.connection_pool, f"{path}.connectionPool")
    _load_balancer(v, p.load_balancer, p.outlier_detection, f"{path}.loadBalancer")
    _tls(v, p.tls, f"{path}.tls")


def _traffic_policy(v: Checks, tp, path: str) -> None:
    if tp is None:
        return
    if (tp.outlier_detection is None and tp.connection_pool is None and tp.load_balancer is None
            and tp.tls is None and not tp.port_level_settings and tp.tunnel is None
            and tp.proxy_protocol is None and tp.retry_budget is None):
        v.error(path, "traffic policy must have at least one field")
        return
    if tp.tunnel is not None and tp.proxy_protocol is not None:
        v.error(path, "tunnel and proxyProtocol must not be set together")
        return
    _policy_parts(v, tp, path)
    for i, pls in enumerate(tp.port_level_settings):
        pp = f"{path}.portLevelSettings[{i}]"
        if pls.port is None:
            v.error(f"{pp}.port", "portTrafficPolicy must have valid port")
        if (pls.outlier_detection is None and pls.connection_pool is None and pls.load_balancer is None
                and pls.tls is None):
            v.error(pp, "port traffic policy must have at least one field")
        else:
            _policy_parts(v, pls, pp)


def check_destination_rule(dr: istio.DestinationRule, namespace: str) -> Checks:
    v = Checks()
    problem = check_wildcard_domain(dr.host)
    if problem:
        v.error("spec.host", problem)
    _traffic_policy(v, dr.traffic_policy, "spec.trafficPolicy")
    names = set()
    for i, s in enumerate(dr.subsets):
        sp = f"spec.subsets[{i}]"
        if s.name in names:
            v.error(f"{sp}.name", f"duplicate subset names: {s.name}")
        names.add(s.name)
        if not s.name:
            v.error(f"{sp}.name", "subset name cannot be empty")
        elif not _DNS1123_LABEL.match(s.name):
            v.error(f"{sp}.name", f"subset name is invalid: {s.name}")
        _labels(v, s.labels, f"{sp}.labels")
        _traffic_policy(v, s.traffic_policy, f"{sp}.trafficPolicy")
    _export_to(v, dr.export_to, namespace, "spec.exportTo", selector=dr.workload_selector is not None)
    ws = dr.workload_selector
    if ws is not None:
        for k, val in ws.match_labels.items():
            if not k:
                v.error("spec.workloadSelector.matchLabels", f"empty key is not supported in selector: {k}={val!r}")
            if "*" in k or "*" in val:
                v.error(_k("spec.workloadSelector.matchLabels", k), f"wildcard is not supported in selector: {k}={val!r}")
        if not ws.match_labels:
            v.warn("spec.workloadSelector", "workload selector specified without labels")
    return v


# ------------------------------------------------------------------------------------------------
# ServiceEntry / WorkloadEntry


def _unix_address(addr: str) -> str | None:
    if not addr:
        return "unix address must not be empty"
    if addr.startswith("@"):
        return None
    if not posixpath.isabs(addr) or addr.endswith("/"):
        return f"{addr} is not an absolute path to a file"
    return None


def _workload_entry(v: Checks, we, path: str, service_ports, allow_fqdn: bool) -> None:
    addr = we.address or ""
    if not addr:
        if not we.network:
            v.error(f"{path}.address", "address is required")
            return
        v.warn(f"{path}.address", f"address is unset with network {we.network!r}")
    unix = addr.startswith("unix://")
    if unix:
        problem = _unix_address(addr[len("unix://"):])
        if problem:
            v.error(f"{path}.address", problem)
        if we.ports:
            v.error(f"{path}.ports", f"unix endpoint {addr} must not include ports")
    elif addr and not is_ip(addr):
        if not allow_fqdn:
            v.error(f"{path}.address", f"endpoint address {addr!r} is not a valid IP address")
        elif check_fqdn(addr):
            v.error(f"{path}.address", f"endpoint address {addr!r} is not a valid FQDN or an IP address")
    for name, port in we.ports.items():
        pp = _k(f"{path}.ports", name)
        if service_ports is not None and name not in service_ports:
            v.error(pp, f"endpoint port {port} is not defined by the service entry")
        problem = _port_name(name)
        if problem:
            v.error(pp, problem)
        problem = _port(port)
        if problem:
            v.error(pp, problem)
    _labels(v, we.labels, f"{path}.labels")
    if unix and service_ports is not None and len(service_ports) != 1:
        v.error(path, "exactly 1 service port required for unix endpoints")


def check_workload_entry(we: istio.WorkloadEntry) -> Checks:
    v = Checks()
    _workload_entry(v, we, "spec", None, True)
    return v


def check_service_entry(se: istio.ServiceEntry, namespace: str) -> Checks:
    v = Checks()
    ws = se.workload_selector
    if ws is not None:
        for k, val in ws.labels.items():
            if not k:
                v.error("spec.workloadSelector.labels", f"empty key is not supported in selector: {k}={val!r}")
            if "*" in k or "*" in val:
                v.error(_k("spec.workloadSelector.labels", k), f"wildcard is not supported in selector: {k}={val!r}")
        if not ws.labels:
            v.warn("spec.workloadSelector", "service entry: workload selector specified without labels, "
                                            "will be applied to all services in namespace")
    if ws is not None and se.endpoints:
        v.error("spec", "only one of WorkloadSelector or Endpoints is allowed in Service Entry")
    resolution = se.resolution or "NONE"
    if not se.hosts:
        v.error("spec.hosts", "service entry must have at least one host")
    for i, host in enumerate(se.hosts):
        hp = f"spec.hosts[{i}]"
        if host == "*":
            v.error(hp, f"invalid host {host}")
            continue
        problem = check_wildcard_domain(host)
        if problem:
            v.error(hp, problem)
        elif resolution != "DYNAMIC_DNS" and "*" in host and not host.startswith("*."):
            v.warn(hp, f"partial wildcard {host!r} not allowed")
    cidr = False
    for i, a in enumerate(se.addresses):
        if a.count("/") == 1:
            cidr = True
            try:
                ipaddress.ip_network(a, strict=False)
            except ValueError:
                v.error(f"spec.addresses[{i}]", f"{a} is not a valid CIDR block")
        elif not is_ip(a):
            v.error(f"spec.addresses[{i}]", f"{a} is not a valid IP")
    if cidr and resolution not in ("NONE", "STATIC"):
        v.error("spec.addresses", "CIDR addresses are allowed only for NONE/STATIC resolution types")
    names: set = set()
    numbers: set = set()
    for i, p in enumerate(se.ports):
        pp = f"spec.ports[{i}]"
        if p.name in names:
            v.error(f"{pp}.name", f"service entry port name {p.name!r} already defined")
        names.add(p.name)
        if p.number in numbers:
            v.error(f"{pp}.number", f"service entry port {p.number} already defined")
        numbers.add(p.number)
        if p.target_port:
            problem = _port(p.target_port)
            if problem:
                v.error(f"{pp}.targetPort", problem)
        problem = _port_name(p.name or "")
        if problem:
            v.error(f"{pp}.name", problem)
        if p.protocol and p.protocol.lower() not in PROTOCOLS:
            v.error(f"{pp}.protocol", f"unsupported protocol: {p.protocol}")
    if resolution == "NONE":
        if se.endpoints:
            v.error("spec.endpoints", "no endpoints should be provided for resolution type none")
        if ws is not None:
            v.warn("spec.workloadSelector", "workloadSelector should not be set when resolution mode is NONE")
    elif resolution == "STATIC":
        for i, ep in enumerate(se.endpoints):
            _workload_entry(v, ep, f"spec.endpoints[{i}]", names, False)
    elif resolution in ("DNS", "DNS_ROUND_ROBIN"):
        if not se.endpoints:
            for i, host in enumerate(se.hosts):
                problem = check_fqdn(host)
                if problem:
                    v.error(f"spec.hosts[{i}]", f"hosts must be FQDN or contain only prefix wildcards if no "
                                                f"endpoints are provided for resolution mode {resolution}, {problem}")
                    break
        if resolution == "DNS_ROUND_ROBIN" and len(se.endpoints) > 1:
            v.error("spec.endpoints", f"there must only be 0 or 1 endpoint for resolution mode {resolution}")
        for i, ep in enumerate(se.endpoints):
            ep_path = f"spec.endpoints[{i}]"
            addr = ep.address or ""
            if not is_ip(addr) and check_fqdn(addr):
                v.error(f"{ep_path}.address", f"endpoint address {addr!r} is not a valid FQDN or an IP address")
            _labels(v, ep.labels, f"{ep_path}.labels")
            for name, port in ep.ports.items():
                pp = _k(f"{ep_path}.ports", name)
                if name not in names:
                    v.error(pp, f"endpoint port {port} is not defined by the service entry")
                problem = _port_name(name) or _port(port)
                if problem:
                    v.error(pp, problem)
    elif resolution == "DYNAMIC_DNS":
        for i, host in enumerate(se.hosts):
            if not host.startswith("*"):
                v.error(f"spec.hosts[{i}]", f"host must be wildcarded for resolution mode {resolution}")
        if se.addresses:
            v.error("spec.addresses", f"addresses cannot be set for resolution type {resolution}. HTTP route "
                                      "domains will only be generated from the hosts field values")
        if se.endpoints:
            v.error("spec.endpoints", f"endpoints cannot be set for resolution type {resolution}. Destination "
                                      "IP address determined from hosts field values")
        for i, p in enumerate(se.ports):
            if (p.protocol or "").lower() not in ("http", "tls", "grpc", "http2"):
                v.error(f"spec.ports[{i}].protocol", "only HTTP, TLS, GRPC, and HTTP2 protocols are supported "
                                                     f"for resolution type {resolution}")
        if se.location not in ("MESH_EXTERNAL", "MESH_INTERNAL"):
            v.error("spec.location", f"location must be MESH_EXTERNAL or MESH_INTERNAL for resolution type {resolution}")
    if resolution != "NONE" and len(se.hosts) > 1:
        for p in se.ports:
            proto = (p.protocol or "").lower()
            if proto not in ("http", "http2", "grpc", "grpc-web", "http_proxy", "https", "tls"):
                v.error("spec.hosts", "multiple hosts provided with non-HTTP, non-TLS ports")
                break
    _export_to(v, se.export_to, namespace, "spec.exportTo", service_entry=True)
    return v
