"""Route actions other than forwarding: redirect, direct response, rewrite, header edits, CORS.

Rules of this module:
- Sans-IO and pure (no trio, socket, time, os). Each action is compiled once from Istio config
  (meshcore.config.compile) into a small immutable object that holds ready bytes; the request path
  calls one method per action and gets bytes (or a LocalReply) back. Everything here pickles.
- Semantics are Envoy 1.40's as Istio configures it (semantics.md §1.29-1.32, Envoy's
  Http::Utility::newUri / processRequestHost for redirects, RouteEntryImplBase::finalizePathHeader
  for rewrites, HeaderParser::evaluateHeaders for header edits, the CORS filter for corsPolicy).
- `head` is a parsed request head: `.method`, `.path` (origin-form with query), `.host`,
  `.get(lowercase name) -> bytes | None`.
"""
from __future__ import annotations

import re

from meshcore.local_reply import LocalReply
from meshcore.routing.matchers import compile_re2, request_scheme

__all__ = ["HeaderEdits", "Stage", "DirectResponse", "Redirect", "Rewrite", "Cors", "re2_substitution",
           "local_response", "response_edits", "upstream_request",
           "DIRECT_RESPONSE_DETAILS", "CORS_DETAILS"]

DIRECT_RESPONSE_DETAILS = "direct_response"
CORS_DETAILS = "cors_response"


# ------------------------------------------------------------------------------------------------
# Header edits


class Stage:
    """One Envoy HeaderParser (HeaderParser::evaluateHeaders): remove the `removes` names, then
    apply every overwriting op in order, then every appending op in order.

    `ops`: (lowercase name, ready `name: value` line without CRLF, overwrite). overwrite is
    OVERWRITE_IF_EXISTS_OR_ADD (Istio `set`: every existing line of that name goes, one new line is
    appended), otherwise APPEND_IF_EXISTS_OR_ADD (Istio `add`: one more line, on HTTP/1.1 a second
    header line, never a comma-joined value). Because overwrites come first, an `add` of a name
    that a `set` also names keeps both lines, as Envoy does.
    """

    __slots__ = ("removes", "ops", "overwrites", "appends")

    def __init__(self, removes=(), ops=()):
        self.removes = frozenset(removes)
        self.ops = tuple(ops)
        self.overwrites = tuple((n, line) for n, line, ow in self.ops if ow)
        self.appends = tuple((n, line) for n, line, ow in self.ops if not ow)

    def touches(self) -> frozenset:
        return self.removes | {n for n, _ in self.overwrites}

    def __eq__(self, other):
        return isinstance(other, Stage) and (self.removes, self.ops) == (other.removes, other.ops)

    def __hash__(self):
        return hash((self.removes, self.ops))

    def __reduce__(self):
        return (Stage, (tuple(sorted(self.removes)), self.ops))


class HeaderEdits:
    """Request or response header edits of a route (and of the picked destination), in the order
    Envoy evaluates them: each Stage in turn.

    `apply(block)` edits a header block (`name: value\\r\\n` lines, names lowercase as the parser
    gives them) and returns the new block. `lines()` is what the edits produce on an empty block:
    the extra lines of a local reply.
    """

    __slots__ = ("stages", "_touched", "_appended", "_lines")

    def __init__(self, stages):
        self.stages = tuple(s for s in stages if s.removes or s.ops)
        touched = frozenset()
        for s in self.stages:
            touched |= s.touches()
        self._touched = touched
        self._lines = self._apply_lines([])
        # When no existing line is touched, the edits only append (the common case).
        self._appended = self._lines

    def __bool__(self):
        return bool(self.stages)

    def __eq__(self, other):
        return isinstance(other, HeaderEdits) and self.stages == other.stages

    def __hash__(self):
        return hash(self.stages)

    def __reduce__(self):
        return (HeaderEdits, (self.stages,))

    def _apply_lines(self, lines: list) -> bytes:
        for s in self.stages:
            if s.removes:
                lines = [x for x in lines if x[0] not in s.removes]
            for name, line in s.overwrites:
                lines = [x for x in lines if x[0] != name]
                lines.append((name, line))
            lines.extend(s.appends)
        return b"".join(line + b"\r\n" for _, line in lines)

    def apply(self, block: bytes) -> bytes:
        if not block:
            return self._lines
        raw = block.split(b"\r\n")
        raw.pop()  # the block ends with CRLF
        lines = [(line[:line.find(b":")].lower(), line) for line in raw]
        touched = self._touched
        if not touched or not any(n in touched for n, _ in lines):
            return block + self._appended
        return self._apply_lines(lines)

    def lines(self) -> bytes:
        return self._lines

    def describe(self) -> list:
        return [{"remove": sorted(n.decode("latin-1") for n in s.removes),
                 "set_or_add": [(line.decode("latin-1"), "set" if ow else "add") for _, line, ow in s.ops]}
                for s in self.stages]


# ------------------------------------------------------------------------------------------------
# Direct response and redirect


class DirectResponse:
    """`directResponse`: a local reply with the configured status and body (Envoy direct_response:
    `content-type: text/plain` when there is a body), plus the route's response header edits."""

    __slots__ = ("reply", "extra")

    def __init__(self, status: int, body: bytes, extra: bytes = b""):
        self.reply = LocalReply(status, body, "-", DIRECT_RESPONSE_DETAILS)
        self.extra = extra

    def respond(self, head) -> tuple[LocalReply, bytes]:
        """The reply and the extra header lines to send with it."""
        return self.reply, self.extra

    def __eq__(self, other):
        return isinstance(other, DirectResponse) and (self.reply, self.extra) == (other.reply, other.extra)

    def __hash__(self):
        return hash((self.reply, self.extra))

    def __reduce__(self):
        return (DirectResponse, (self.reply.status, self.reply.body, self.extra))

    def describe(self) -> dict:
        return {"direct_response": {"status": self.reply.status, "body_bytes": len(self.reply.body)}}


class Redirect:
    """`redirect`: Envoy's RedirectAction as Istio configures it (ApplyRedirect).

    scheme: new scheme or b"" (keep the request's); host: new authority or b"" (keep the request's,
    minus a port the new scheme/port makes wrong); port: b":<n>" or b""; path: path_redirect or b""
    (the query of the request is kept unless path has one); prefix: (matched prefix, replacement,
    ignore_case) for `prefix_rewrite`, or None. `exact_match`: the route matched an exact path, so
    prefix_rewrite replaces the whole path.
    """

    __slots__ = ("status", "scheme", "host", "port", "path", "prefix", "extra", "_path_has_query")

    def __init__(self, status: int, scheme: bytes = b"", host: bytes = b"", port: bytes = b"",
                 path: bytes = b"", prefix=None, extra: bytes = b""):
        self.status = status
        self.scheme = scheme
        self.host = host
        self.port = port
        self.path = path
        self.prefix = prefix
        self.extra = extra
        self._path_has_query = b"?" in path

    def __eq__(self, other):
        return isinstance(other, Redirect) and self.__reduce__()[1] == other.__reduce__()[1]

    def __hash__(self):
        return hash(self.__reduce__()[1])

    def __reduce__(self):
        return (Redirect, (self.status, self.scheme, self.host, self.port, self.path, self.prefix,
                           self.extra))

    def location(self, head) -> bytes:
        """The `location` of the redirect for this request."""
        request_host = head.host or b""
        forwarded_proto = head.get(b"x-forwarded-proto") or b"http"
        scheme = self.scheme or request_scheme(head)  # a scheme redirect, else the request's :scheme
        host = self.host or _request_host(request_host, scheme, self.port, forwarded_proto)
        current = head.path
        if self.path:
            if self._path_has_query:
                path = self.path
            else:
                q = current.find(b"?")
                path = self.path if q < 0 else self.path + current[q:]
        elif self.prefix is not None:
            path = _prefix_rewrite(current, *self.prefix)
        else:
            path = current
        if not path.startswith(b"/"):
            path = b"/" + path
        return scheme + b"://" + host + self.port + path

    def respond(self, head) -> tuple[LocalReply, bytes]:
        return (LocalReply(self.status, b"", "-", DIRECT_RESPONSE_DETAILS),
                b"location: " + self.location(head) + b"\r\n" + self.extra)

    def describe(self) -> dict:
        d = {"redirect": {"response_code": self.status}}
        for k in ("scheme", "host", "port", "path"):
            v = getattr(self, k)
            if v:
                d["redirect"][k] = v.decode("latin-1")
        if self.prefix is not None:
            d["redirect"]["prefix_rewrite"] = self.prefix[1].decode("latin-1")
        return d


def _request_host(request_host: bytes, new_scheme: bytes, new_port: bytes, proto: bytes) -> bytes:
    """Envoy's processRequestHost: drop the request's port when a port redirect replaces it, or
    when the scheme changes and the port was the old scheme's default."""
    if not request_host:
        return request_host
    if request_host.startswith(b"["):
        end = request_host.rfind(b"]:")
        end = end + 1 if end >= 0 else -1
    else:
        end = request_host.rfind(b":")
    if end < 0:
        return request_host
    port = request_host[end:]
    remove = bool(new_port)
    if new_scheme != proto:
        remove = remove or (proto == b"https" and port == b":443") or (proto == b"http" and port == b":80")
    return request_host[:end] if remove else request_host


def _prefix_rewrite(path: bytes, matched: bytes, replacement: bytes, ignore_case: bool) -> bytes:
    """Replace the route's matched prefix (for an exact match: the whole query-less path)."""
    if matched is None:  # an exact-path or regex route: the whole path, the query kept
        q = path.find(b"?")
        return replacement if q < 0 else replacement + path[q:]
    head = path[:len(matched)]
    if head == matched or (ignore_case and head.lower() == matched.lower()):
        return replacement + path[len(matched):]
    return path


# ------------------------------------------------------------------------------------------------
# Rewrite


class Rewrite:
    """`rewrite`: prefix_rewrite (`uri`), regex_rewrite (`uriRegexRewrite`), host_rewrite_literal
    (`authority`, also from a `:authority`/`host` header edit).

    prefix: (matched prefix or None for an exact/regex route, replacement, ignore_case) or None.
    regex: (compiled pattern, Python substitution) or None. authority: bytes or b"".
    When the path is rewritten, Envoy sends the original path (query included) upstream as
    `x-envoy-original-path`.
    """

    __slots__ = ("prefix", "regex_source", "substitution", "authority", "_regex", "_sub")

    def __init__(self, prefix=None, regex_source: str | None = None, substitution: str = "",
                 authority: bytes = b""):
        self.prefix = prefix
        self.regex_source = regex_source
        self.substitution = substitution
        self.authority = authority
        self._regex = compile_re2(regex_source) if regex_source is not None else None
        self._sub = substitution.encode("utf-8")  # Python `re.sub` syntax (see re2_substitution)

    def __eq__(self, other):
        return isinstance(other, Rewrite) and self.__reduce__()[1] == other.__reduce__()[1]

    def __hash__(self):
        return hash(self.__reduce__()[1])

    def __reduce__(self):
        return (Rewrite, (self.prefix, self.regex_source, self.substitution, self.authority))

    @property
    def rewrites_path(self) -> bool:
        return self.prefix is not None or self._regex is not None

    def path(self, path: bytes) -> bytes:
        """The rewritten path (query kept)."""
        if self.prefix is not None:
            return _prefix_rewrite(path, *self.prefix)
        if self._regex is not None:
            q = path.find(b"?")
            bare, query = (path, b"") if q < 0 else (path[:q], path[q:])
            return self._regex.sub(self._sub, bare) + query
        return path

    def apply(self, path: bytes, host: bytes) -> tuple[bytes, bytes, bytes]:
        """(new path, new host, extra header lines) for the upstream request. Envoy 1.40 sends the
        original authority as `x-envoy-original-host` when it rewrites it, and the original path
        (query included) as `x-envoy-original-path` when it rewrites that."""
        extra = b""
        if self.authority:
            extra = b"x-envoy-original-host: " + host + b"\r\n"
            host = self.authority
        if self.rewrites_path:
            extra += b"x-envoy-original-path: " + path + b"\r\n"
            path = self.path(path)
        return path, host, extra

    def describe(self) -> dict:
        d = {}
        if self.prefix is not None:
            d["prefix_rewrite"] = self.prefix[1].decode("utf-8", "replace")
        if self.regex_source is not None:
            d["regex_rewrite"] = {"pattern": self.regex_source, "substitution": self.substitution}
        if self.authority:
            d["host_rewrite_literal"] = self.authority.decode("utf-8", "replace")
        return d


_RE2_GROUP = re.compile(r"\\(\d)")


def re2_substitution(rewrite: str) -> str:
    r"""RE2's `\N` group references (and `\0`, the whole match) as Python `re.sub` wants them."""
    out = []
    i = 0
    while i < len(rewrite):
        c = rewrite[i]
        if c == "\\" and i + 1 < len(rewrite):
            d = rewrite[i + 1]
            if d.isdigit():
                out.append(f"\\g<{d}>")
            elif d == "\\":
                out.append("\\\\")
            else:
                raise ValueError(f"invalid rewrite pattern {rewrite!r}: '\\{d}' (RE2 accepts \\0-\\9 and \\\\)")
            i += 2
            continue
        if c == "\\":
            raise ValueError(f"invalid rewrite pattern {rewrite!r}: trailing backslash")
        out.append(c)
        i += 1
    return "".join(out)


# ------------------------------------------------------------------------------------------------
# CORS


class Cors:
    """`corsPolicy` as Envoy's CORS filter applies it (filter order in Istio: fault, cors, router).

    origins: value matchers (meshcore.routing.matchers Exact/Prefix/Regex); an origin is allowed
    when a matcher matches it or matches `*`. allow_methods/allow_headers/expose_headers/max_age:
    the comma-joined strings Istio writes (b"" = unset). forward_unmatched: forward a preflight
    whose origin is not allowed (Istio's default; `unmatchedPreflights: IGNORE` answers it).
    """

    __slots__ = ("origins", "allow_methods", "allow_headers", "expose_headers", "max_age",
                 "allow_credentials", "forward_unmatched")

    def __init__(self, origins=(), allow_methods=b"", allow_headers=b"", expose_headers=b"",
                 max_age=b"", allow_credentials=False, forward_unmatched=True):
        self.origins = tuple(origins)
        self.allow_methods = allow_methods
        self.allow_headers = allow_headers
        self.expose_headers = expose_headers
        self.max_age = max_age
        self.allow_credentials = bool(allow_credentials)
        self.forward_unmatched = bool(forward_unmatched)

    def __reduce__(self):
        return (Cors, (self.origins, self.allow_methods, self.allow_headers, self.expose_headers,
                       self.max_age, self.allow_credentials, self.forward_unmatched))

    def _key(self):
        return (tuple(repr(o.describe()) for o in self.origins),) + self.__reduce__()[1][1:]

    def __eq__(self, other):
        return isinstance(other, Cors) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def origin_allowed(self, origin: bytes) -> bool:
        for m in self.origins:
            if m.test(b"*") or m.test(origin):
                return True
        return False

    def preflight(self, head):
        """The local answer to a CORS preflight, or None to continue (not a preflight, not a CORS
        request, or an unmatched origin that is forwarded). Returns (LocalReply, extra lines)."""
        if head.method != b"OPTIONS":
            return None
        origin = head.get(b"origin")
        if not origin:
            return None
        method = head.get(b"access-control-request-method")
        if not method:
            return None
        allowed = self.origin_allowed(origin)
        if not allowed and self.forward_unmatched:
            return None
        lines = []
        if allowed:
            lines.append(b"access-control-allow-origin: " + origin)
        if self.allow_credentials:
            lines.append(b"access-control-allow-credentials: true")
        if self.allow_methods:
            value = method if self.allow_methods == b"*" else self.allow_methods
            lines.append(b"access-control-allow-methods: " + value)
        if self.allow_headers:
            value = (head.get(b"access-control-request-headers") or b"") if self.allow_headers == b"*" \
                else self.allow_headers
            lines.append(b"access-control-allow-headers: " + value)
        if self.max_age:
            lines.append(b"access-control-max-age: " + self.max_age)
        if allowed and self.expose_headers:  # the filter's encodeHeaders runs on its own reply too
            lines.append(b"access-control-expose-headers: " + self.expose_headers)
        extra = b"".join(line + b"\r\n" for line in lines)
        return LocalReply(200, b"", "-", CORS_DETAILS), extra

    def response_edits(self, head) -> HeaderEdits | None:
        """Headers the filter sets on the response of an actual (non-preflight) CORS request whose
        origin is allowed; None when there is nothing to add."""
        origin = head.get(b"origin")
        if not origin or not self.origin_allowed(origin):
            return None
        ops = [(b"access-control-allow-origin", b"access-control-allow-origin: " + origin, True)]
        if self.allow_credentials:
            ops.append((b"access-control-allow-credentials", b"access-control-allow-credentials: true", True))
        if self.expose_headers:
            ops.append((b"access-control-expose-headers",
                        b"access-control-expose-headers: " + self.expose_headers, True))
        return HeaderEdits((Stage((), ops),))

    def describe(self) -> dict:
        return {"cors": {"allow_origin": [o.describe() for o in self.origins],
                         "allow_methods": self.allow_methods.decode("latin-1"),
                         "allow_headers": self.allow_headers.decode("latin-1"),
                         "expose_headers": self.expose_headers.decode("latin-1"),
                         "max_age": self.max_age.decode("latin-1"),
                         "allow_credentials": self.allow_credentials,
                         "forward_not_matching_preflights": self.forward_unmatched}}


# ------------------------------------------------------------------------------------------------
# What the I/O shell calls (one call per concern; each returns ready bytes or None)


def local_response(route, head):
    """The local answer of a route for this request, or None to forward it: a CORS preflight the
    filter answers, a redirect or a direct response. Returns (LocalReply, extra header lines)."""
    cors = route.cors
    if cors is not None:
        pre = cors.preflight(head)
        if pre is not None:
            return pre
    direct = route.direct
    if direct is None:
        return None
    reply, extra = direct.respond(head)
    if head.method == b"HEAD" and reply.body:  # a response to HEAD never carries its body
        reply = reply._replace(body=b"")
    if cors is not None:
        edits = cors.response_edits(head)
        if edits is not None:
            extra = edits.apply(extra)
    return reply, extra


def upstream_request(wc, head, block: bytes) -> tuple[bytes, bytes, bytes]:
    """(path, host, header block) of the upstream request for destination `wc`: the route's
    rewrite (prefix/regex path, authority; `x-envoy-original-path` added when the path changes)
    and request header edits applied to `block` (the forwarded header lines, CRLF-terminated)."""
    path, host = head.path, head.host or b""
    edits = wc.request_headers
    if edits is not None:  # Envoy evaluates the header edits before it rewrites the path
        block = edits.apply(block)
    rw = wc.rewrite
    if rw is not None:
        path, host, extra = rw.apply(path, host)
        block += extra
    return path, host, block


def response_edits(wc, route, head) -> HeaderEdits | None:
    """The edits for the upstream response's headers: the destination's and route's response
    header edits, then what the CORS filter adds; None when there are none."""
    edits = wc.response_headers if wc is not None else None
    cors = route.cors
    if cors is None:
        return edits
    extra = cors.response_edits(head)
    if extra is None:
        return edits
    if edits is None:
        return extra
    return HeaderEdits(edits.stages + extra.stages)
