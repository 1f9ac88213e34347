"""VirtualServices -> route pieces with compiled matchers and actions (config time only).

Rules of this module:
- Istio's validator runs first (meshcore.config.validate). Short names are expanded as Istio's
  ResolveVirtualServiceShortnames does (hosts, destinations, mirrors; meshcore.config.names).
- Delegates (Istio's mergeHTTPRoutes): a root route `delegate: {name, namespace}` is replaced by
  the host-less delegate's routes, each with the root's match merged in (a delegate match that
  conflicts with every root match drops that delegate route) and the root's rewrite, timeout,
  retries, fault, mirror, corsPolicy, headers and directResponse filling what the delegate leaves
  unset. A missing or unexported delegate drops the root route, with a warning.
- Config-time selectors, as Istio applies them to a sidecar (TranslateRoute / sourceMatchHTTP):
  `gateways` must name `mesh` (VirtualService level and match level), `sourceLabels` must be a
  subset of this workload's `--labels`, `sourceNamespace` must be its `--namespace`; a match entry
  that fails is not part of this proxy's routes. `port` keeps an entry only on that service port.
- Each match entry becomes one piece; pieces of one http[] entry share its actions. Named match
  entries name their piece `<route>.<match>` (Envoy route name).
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field

import msgspec

from meshcore.config import istio
from meshcore.config.names import fqdn, visible
from meshcore.config.report import Doc, Report, key
from meshcore.config.validate import check_virtual_service, is_claim
from meshcore.policy.fault import fault_policy_from_istio
from meshcore.policy.mirror import mirror_policies_from_istio
from meshcore.policy.retry import retry_policy_from_istio
from meshcore.routing.actions import (Cors, DirectResponse, HeaderEdits, Redirect, Stage,
                                      re2_substitution)
from meshcore.routing.matchers import (ClaimMatch, Exact, HeaderMatch, PathMatch, Prefix, Present,
                                       PseudoHeaderMatch, QueryMatch, Regex, RequestMatch)

__all__ = ["Piece", "HttpRoute", "VsInfo", "Workload", "compile_virtual_services",
           "header_stage", "resolve_shortnames", "redirect_for"]

_LEGACY_HTTP_FIELDS = (
    ("websocket_upgrade", "websocketUpgrade"), ("append_headers", "appendHeaders"),
    ("remove_response_headers", "removeResponseHeaders"), ("append_response_headers", "appendResponseHeaders"),
    ("remove_request_headers", "removeRequestHeaders"), ("append_request_headers", "appendRequestHeaders"),
)
_LEGACY_DEST_FIELDS = (
    ("remove_response_headers", "removeResponseHeaders"), ("append_response_headers", "appendResponseHeaders"),
    ("remove_request_headers", "removeRequestHeaders"), ("append_request_headers", "appendRequestHeaders"),
)
_PSEUDO = {":path": b":path", ":method": b":method", ":authority": b":authority", ":scheme": b":scheme"}


@dataclass(frozen=True)
class Workload:
    """Who this proxy is, for config-time selectors: `--namespace` and `--labels`."""

    namespace: str = "default"
    labels: tuple = ()  # sorted (key, value) pairs

    def has_labels(self, want: dict) -> bool:
        mine = dict(self.labels)
        return all(mine.get(k) == v for k, v in want.items())


@dataclass
class Piece:
    """One match entry of an http[] route (or the implicit catch-all)."""

    name: str  # Envoy route name
    match: RequestMatch
    port: int | None  # match.port: only on this service port
    prefix: tuple  # (matched prefix or None for exact/regex, ignore_case): what prefix rewrites replace


@dataclass
class HttpRoute:
    """An http[] entry with matchers and actions compiled, destinations still unresolved."""

    pieces: list
    dests: tuple  # ((istio.Destination, weight, path, (req Stage, resp Stage, authority)), ...)
    timeout: float
    retry: object
    fault: object
    mirrors: tuple
    path: str
    retries: object
    route_ops: tuple = (Stage(), Stage(), "")  # route-level (request Stage, response Stage, authority)
    rewrite: object = None  # istio.HTTPRewrite or None
    redirect: object = None  # istio.HTTPRedirect or None
    direct: object = None  # DirectResponse or None
    cors: object = None  # Cors or None
    weighted: bool = False  # several destinations listed: Envoy weighted_clusters (even if one is left)

    @property
    def names(self):
        return tuple(p.name for p in self.pieces)


@dataclass
class VsInfo:
    doc: Doc
    routes: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Short names and delegates


def _expand_dest(d: istio.Destination | None, ns: str):
    return None if d is None else msgspec.structs.replace(d, host=fqdn(d.host, ns))


def resolve_shortnames(vs: istio.VirtualService, ns: str) -> istio.VirtualService:
    """Istio's ResolveVirtualServiceShortnames: hosts, route destinations and mirrors."""
    http = []
    for h in vs.http:
        route = tuple(msgspec.structs.replace(rd, destination=_expand_dest(rd.destination, ns)) for rd in h.route)
        mirrors = tuple(msgspec.structs.replace(m, destination=_expand_dest(m.destination, ns)) for m in h.mirrors)
        http.append(msgspec.structs.replace(h, route=route, mirror=_expand_dest(h.mirror, ns), mirrors=mirrors))
    return msgspec.structs.replace(vs, hosts=tuple(fqdn(x, ns) for x in vs.hosts), http=tuple(http))


def _sm_conflict(root, leaf) -> bool:
    if root is None or leaf is None:
        return False
    if root.regex and (leaf.regex or leaf.prefix or leaf.exact):
        return True
    if leaf.regex and (root.regex or root.prefix or root.exact):
        return True
    if root.exact:
        return bool(leaf.prefix) or leaf.exact != root.exact
    if root.prefix:
        if leaf.prefix:
            return not leaf.prefix.startswith(root.prefix)
        if leaf.exact:
            return not leaf.exact.startswith(root.prefix)
    return True


def _match_conflict(root: istio.HTTPMatchRequest, leaf: istio.HTTPMatchRequest) -> bool:
    for attr in ("uri", "scheme", "method", "authority"):
        if _sm_conflict(getattr(root, attr), getattr(leaf, attr)):
            return True
    for attr in ("headers", "without_headers", "query_params"):
        r = getattr(root, attr)
        for k, v in getattr(leaf, attr).items():
            if _sm_conflict(r.get(k), v):
                return True
    if bool(root.ignore_uri_case) != bool(leaf.ignore_uri_case):
        return True
    if root.port and leaf.port and root.port != leaf.port:
        return True
    if root.source_namespace and leaf.source_namespace != root.source_namespace:
        return True
    for k, v in leaf.source_labels.items():
        if k in root.source_labels and root.source_labels[k] != v:
            return True
    if root.gateways and leaf.gateways:
        if len(root.gateways) < len(leaf.gateways) or not set(leaf.gateways) <= set(root.gateways):
            return True
    return False


def _joined(a: str | None, b: str | None) -> str | None:
    if not b:
        return a
    return f"{a}-{b}" if a else b


def _merge_match(root: istio.HTTPMatchRequest, leaf: istio.HTTPMatchRequest) -> istio.HTTPMatchRequest:
    r = msgspec.structs.replace
    return r(leaf,
             name=_joined(root.name, leaf.name),
             uri=leaf.uri if leaf.uri is not None else root.uri,
             scheme=leaf.scheme if leaf.scheme is not None else root.scheme,
             method=leaf.method if leaf.method is not None else root.method,
             authority=leaf.authority if leaf.authority is not None else root.authority,
             headers={**root.headers, **leaf.headers},
             without_headers={**root.without_headers, **leaf.without_headers},
             query_params={**root.query_params, **leaf.query_params},
             port=leaf.port or root.port,
             source_labels={**root.source_labels, **leaf.source_labels},
             source_namespace=leaf.source_namespace or root.source_namespace,
             gateways=leaf.gateways or root.gateways,
             stat_prefix=leaf.stat_prefix or root.stat_prefix)


def _merge_route(root: istio.HTTPRoute, leaf: istio.HTTPRoute) -> istio.HTTPRoute | None:
    """Istio's mergeHTTPRoute; None when the delegate route's matches conflict with the root's."""
    if not root.match:
        matches = leaf.match
    elif not leaf.match:
        matches = root.match
    else:
        out = []
        for sub in leaf.match:
            found = False
            for rm in root.match:
                if _match_conflict(rm, sub):
                    continue
                out.append(_merge_match(rm, sub))
                found = True
            if not found:
                return None
        if not out:
            return None
        matches = tuple(out)
    take = lambda a: getattr(leaf, a) if getattr(leaf, a) not in (None, ()) else getattr(root, a)  # noqa: E731
    return msgspec.structs.replace(
        leaf, match=tuple(matches), name=_joined(root.name, leaf.name),
        rewrite=take("rewrite"), direct_response=take("direct_response"), timeout=take("timeout"),
        retries=take("retries"), fault=take("fault"), mirror=take("mirror"),
        mirror_percent=take("mirror_percent"), mirror_percentage=take("mirror_percentage"),
        cors_policy=take("cors_policy"), mirrors=take("mirrors"), headers=take("headers"))


# ------------------------------------------------------------------------------------------------
# Matches


def _string_match(sm: istio.StringMatch, path: str, label: str, rep: Report, *, header: bool):
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


def _applies(m: istio.HTTPMatchRequest, workload: Workload) -> bool:
    """Istio's sourceMatchHTTP for a sidecar (gateway names = {mesh})."""
    if m.gateways:
        return "mesh" in m.gateways
    if not workload.has_labels(m.source_labels):
        return False
    return not m.source_namespace or m.source_namespace == workload.namespace


def _compile_match(m: istio.HTTPMatchRequest, path: str, label: str, rep: Report):
    """(RequestMatch, prefix info) or None after reporting an error."""
    ok = True
    if m.stat_prefix:
        rep.warn(label, f"{path}.statPrefix", "meshcore keeps no per-route stats; ignored")
    pm = None
    prefix = (b"/", bool(m.ignore_uri_case))
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
            prefix = (None, False)
        else:
            kind = set_[0]
            pm = PathMatch(kind, getattr(u, kind).encode("utf-8"), bool(m.ignore_uri_case))
            prefix = (getattr(u, kind).encode("utf-8"), bool(m.ignore_uri_case)) if kind == "prefix" \
                else (None, False)
    method = authority = None
    if m.method is not None:
        method = _string_match(m.method, f"{path}.method", label, rep, header=True)
        ok = ok and method is not None
    if m.authority is not None:
        authority = _string_match(m.authority, f"{path}.authority", label, rep, header=True)
        ok = ok and authority is not None
    headers = []
    if m.scheme is not None:
        sm = _string_match(m.scheme, f"{path}.scheme", label, rep, header=True)
        ok = ok and sm is not None
        if sm is not None:
            headers.append(PseudoHeaderMatch(b":scheme", sm))
    for attr, name, invert in (("headers", "headers", False), ("without_headers", "withoutHeaders", True)):
        for hname, sm in sorted(getattr(m, attr).items()):
            hpath = key(f"{path}.{name}", hname)
            vm = _string_match(sm, hpath, label, rep, header=True)
            if vm is None:
                ok = False
                continue
            if is_claim(hname):
                headers.append(ClaimMatch(hname, invert))
            elif hname in _PSEUDO:
                headers.append(PseudoHeaderMatch(_PSEUDO[hname], vm, invert))
            else:
                headers.append(HeaderMatch(hname.lower().encode("ascii"), vm, invert))
    query = []
    for qname, sm in sorted(m.query_params.items()):
        qpath = key(f"{path}.queryParams", qname)
        vm = _string_match(sm, qpath, label, rep, header=False)
        if vm is None:
            ok = False
            continue
        query.append(QueryMatch(qname.encode("utf-8"), vm))
    if not ok:
        return None
    if pm is None:
        pm = PathMatch("prefix", b"/", False)
    return RequestMatch(m.name or "", pm, method, authority, headers, query), prefix


# ------------------------------------------------------------------------------------------------
# Actions


def _header_value(value: str, label: str, path: str, rep: Report) -> bytes | None:
    """Envoy header values are format strings: `%%` is a `%`; command operators (`%VAR%`) are
    not implemented, so such a header is left out (with a warning) rather than sent literally."""
    if "%" not in value:
        return value.encode("utf-8")
    out = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "%" and value.startswith("%%", i):
            out.append("%")
            i += 2
            continue
        if c == "%":
            end = value.find("%", i + 1)
            rep.warn(label, path, f"Envoy command operator {value[i:end + 1]} in a header value is not "
                                  "implemented; header not added")
            return None
        out.append(c)
        i += 1
    return "".join(out).encode("utf-8")


def header_stage(ops: istio.HeaderOperations | None, label: str, path: str, rep: Report) -> tuple[Stage, str]:
    """Istio's TranslateHeadersOperations for one side: `set` (OVERWRITE_IF_EXISTS_OR_ADD) then
    `add` (APPEND_IF_EXISTS_OR_ADD), each sorted by name; `:`-prefixed names and `host` are not
    edited (an `:authority`/`host` in set/add is an authority rewrite instead, `set` winning).
    Returns (Stage, authority or "")."""
    if ops is None:
        return Stage(), ""
    out = []
    authority = {"set": "", "add": ""}
    for verb, overwrite in (("set", True), ("add", False)):
        for name in sorted(getattr(ops, verb)):
            value = getattr(ops, verb)[name]
            low = name.lower()
            if low in (":authority", "host"):
                authority[verb] = value
            if low.startswith(":") or low == "host":
                continue
            v = _header_value(value, label, key(f"{path}.{verb}", name), rep)
            if v is None or v == b"":  # Envoy does not add a header whose value is empty
                continue
            lname = low.encode("ascii", "replace")
            out.append((lname, lname + b": " + v, overwrite))
    removes = [n.lower().encode("ascii", "replace") for n in ops.remove
               if not (n.startswith(":") or n.lower() == "host")]
    return Stage(removes, out), authority["set"] or authority["add"]


def _headers(h: istio.Headers | None, label: str, path: str, rep: Report) -> tuple[Stage, Stage, str]:
    if h is None:
        return Stage(), Stage(), ""
    req, authority = header_stage(h.request, label, f"{path}.request", rep)
    resp, _ = header_stage(h.response, label, f"{path}.response", rep)
    return req, resp, authority


def redirect_for(r: istio.HTTPRedirect, prefix: tuple, extra: bytes, port: int) -> Redirect:
    """The Redirect of one piece on service `port` (its matched prefix is what `prefix_rewrite`
    replaces). Istio writes the listener port for derivePort FROM_REQUEST_PORT and drops :80 for
    http and :443 for https (ApplyRedirect)."""
    n = r.port or (port if r.derive_port == "FROM_REQUEST_PORT" else 0)
    scheme = r.scheme or "http"
    port_bytes = b"" if not n or (n == 80 and scheme == "http") or (n == 443 and scheme == "https") \
        else b":%d" % n
    prefix_rw = None
    if r.prefix_rewrite:
        matched, ignore_case = prefix
        prefix_rw = (matched, r.prefix_rewrite.encode("utf-8"), ignore_case)
    return Redirect(301 if not r.redirect_code else r.redirect_code, (r.scheme or "").encode(),
                    (r.authority or "").encode("utf-8"), port_bytes, (r.uri or "").encode("utf-8"),
                    prefix_rw, extra)


def _direct(dr: istio.HTTPDirectResponse, extra: bytes, label: str, path: str, rep: Report):
    body = b""
    if dr.body is not None:
        if dr.body.bytes_ is not None:
            try:
                body = base64.b64decode(dr.body.bytes_, validate=True)
            except ValueError:
                rep.error(label, f"{path}.body.bytes", "invalid base64")
                return None
        elif dr.body.string is not None:
            body = dr.body.string.encode("utf-8")
    return DirectResponse(dr.status, body, extra)


def _cors(c: istio.CorsPolicy, label: str, path: str, rep: Report) -> Cors | None:
    origins = []
    if c.allow_origins:
        for i, sm in enumerate(c.allow_origins):
            vm = _string_match(sm, f"{path}.allowOrigins[{i}]", label, rep, header=False)
            if vm is None:
                return None
            origins.append(vm)
    else:
        origins = [Exact(o.encode("utf-8")) for o in c.allow_origin]
        if c.allow_origin:
            rep.warn(label, f"{path}.allowOrigin", "deprecated: use allowOrigins")
    max_age = b""
    if c.max_age is not None:
        max_age = str(int(c.max_age.seconds)).encode()
    return Cors(origins, ",".join(c.allow_methods).encode(), ",".join(c.allow_headers).encode(),
                ",".join(c.expose_headers).encode(), max_age, bool(c.allow_credentials),
                c.unmatched_preflights != "IGNORE")


# ------------------------------------------------------------------------------------------------
# http[] routes


def _compile_http(doc: Doc, i: int, h: istio.HTTPRoute, rep: Report, workload: Workload) -> HttpRoute | None:
    label = doc.label
    path = f"spec.http[{i}]"
    ok = True
    for attr, name in _LEGACY_HTTP_FIELDS:
        if getattr(h, attr) not in (None, (), {}):
            if attr == "websocket_upgrade":
                rep.warn(label, f"{path}.{name}", "an Istio <= 1.4 field, ignored: Istio >= 1.5 lets "
                                                  "every route carry WebSocket upgrades")
            else:
                rep.warn(label, f"{path}.{name}", "removed in Istio 1.5 (use headers); ignored")
    pieces = []
    base = h.name or doc.name
    for j, m in enumerate(h.match):
        compiled = _compile_match(m, f"{path}.match[{j}]", label, rep)
        if compiled is None:
            ok = False
            continue
        if not _applies(m, workload):
            continue
        rm, prefix = compiled
        pieces.append(Piece(f"{base}.{m.name}" if m.name else base, rm, m.port or None, prefix))
    if not h.match:
        pieces.append(Piece(base, RequestMatch("", PathMatch("prefix", b"/", False)), None, (b"/", False)))
    dests = []
    for j, rd in enumerate(h.route):
        dpath = f"{path}.route[{j}]"
        for attr, name in _LEGACY_DEST_FIELDS:
            if getattr(rd, attr) not in (None, (), {}):
                rep.warn(label, f"{dpath}.{name}", "removed in Istio 1.5 (use headers); ignored")
        dests.append((rd.destination, rd.weight or 0, dpath, _headers(rd.headers, label, f"{dpath}.headers", rep)))
    if len(dests) > 1:
        dests = [d for d in dests if d[1] > 0]
    elif dests:
        dests = [(dests[0][0], 100, dests[0][2], dests[0][3])]
    route_ops = _headers(h.headers, label, f"{path}.headers", rep)
    direct = cors = None
    if h.direct_response is not None:
        direct = _direct(h.direct_response, HeaderEdits((route_ops[1],)).lines(), label,
                         f"{path}.directResponse", rep)
        ok = ok and direct is not None
    if h.cors_policy is not None:
        cors = _cors(h.cors_policy, label, f"{path}.corsPolicy", rep)
        ok = ok and cors is not None
    if h.rewrite is not None and h.rewrite.uri_regex_rewrite is not None:
        try:
            re2_substitution(h.rewrite.uri_regex_rewrite.rewrite or "")
        except ValueError as e:
            rep.error(label, f"{path}.rewrite.uriRegexRewrite.rewrite", str(e))
            ok = False
    if not ok:
        return None
    timeout = h.timeout.seconds if h.timeout is not None else 0.0
    retry, warns = retry_policy_from_istio(h.retries, False)
    for f, msg in warns:
        rep.warn(label, f"{path}.retries.{f}" if f else f"{path}.retries", msg)
    fault, warns = fault_policy_from_istio(h.fault)
    for f, msg in warns:
        rep.warn(label, f"{path}.fault.{f}" if f else f"{path}.fault", msg)
    mirrors, warns = mirror_policies_from_istio(h, doc.obj.metadata.annotations)
    for f, msg in warns:
        where = f if f.startswith("metadata.") else (f"{path}.{f}" if f else path)
        rep.warn(label, where, msg)
    return HttpRoute(pieces, tuple(dests), timeout, retry, fault, mirrors, path, h.retries,
                     route_ops, h.rewrite, h.redirect, direct, cors, len(h.route) > 1)


def compile_virtual_services(vs_docs: list[Doc], rep: Report, workload: Workload) -> dict[str, VsInfo]:
    """host (expanded, lowercase, possibly wildcard) -> the VirtualService bound to it."""
    delegates: dict[tuple, Doc] = {}
    roots = []
    for doc in vs_docs:
        vs: istio.VirtualService = doc.obj.spec
        if not rep.checks(doc.label, check_virtual_service(vs, doc.namespace)):
            continue
        if vs.hosts:
            roots.append(doc)
        else:
            delegates[(doc.namespace, doc.name)] = doc
    used: set = set()
    bound: dict[str, VsInfo] = {}
    for doc in roots:
        label = doc.label
        vs = resolve_shortnames(doc.obj.spec, doc.namespace)
        if not visible(vs.export_to, doc.namespace, workload.namespace):
            rep.warn(label, "spec.exportTo", f"not exported to namespace {workload.namespace!r} (this "
                                             "proxy's --namespace); ignored")
            continue
        if vs.gateways and "mesh" not in vs.gateways:
            rep.warn(label, "spec.gateways", "does not include 'mesh': applies to gateways only; ignored by the sidecar")
            continue
        if vs.tcp:
            rep.warn(label, "spec.tcp", "TCP routes are not implemented (HTTP/1.1 only); ignored")
        if vs.tls:
            rep.warn(label, "spec.tls", "TLS routes are not implemented (HTTP/1.1 only); ignored")
        http: list = []  # (route, Doc it came from, index in that doc)
        for i, h in enumerate(vs.http):
            if h.delegate is None:
                http.append((h, doc, i))
                continue
            dns = h.delegate.namespace or doc.namespace
            ddoc = delegates.get((dns, h.delegate.name or ""))
            dpath = f"spec.http[{i}].delegate"
            if ddoc is None:
                rep.warn(label, dpath, f"delegate VirtualService {dns}/{h.delegate.name} not found; route ignored")
                continue
            if not visible(ddoc.obj.spec.export_to, ddoc.namespace, doc.namespace):
                rep.warn(label, dpath, f"delegate VirtualService {dns}/{h.delegate.name} is not exported to "
                                       f"namespace {doc.namespace}; route ignored")
                continue
            used.add((dns, h.delegate.name))
            dvs = resolve_shortnames(ddoc.obj.spec, ddoc.namespace)
            for j, dh in enumerate(dvs.http):
                merged = _merge_route(h, dh)
                if merged is None:
                    rep.warn(ddoc.label, f"spec.http[{j}].match",
                             f"conflicts with every match of root route {label} spec.http[{i}]; route ignored")
                    continue
                http.append((merged, ddoc, j))
        routes = []
        ok = True
        for h, hdoc, i in http:
            r = _compile_http(hdoc, i, h, rep, workload)
            if r is None:
                ok = False
            routes.append(r)
        if not ok:
            continue
        info = VsInfo(doc, routes)
        for i, host in enumerate(vs.hosts):
            prev = bound.get(host)
            if prev is not None:
                rep.warn(label, f"spec.hosts[{i}]",
                         f"host {host!r} is already bound by {prev.doc.label}; ignored for this host")
                continue
            bound[host] = info
    for k, ddoc in delegates.items():
        if k not in used:
            rep.warn(ddoc.label, "spec.hosts", "a VirtualService without hosts is a delegate, and no root "
                                               "VirtualService delegates to this one; unused")
    return bound
