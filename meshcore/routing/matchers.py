"""Pre-compiled request matchers for Istio `HTTPMatchRequest` (semantics.md §1.2-1.9).

Rules of this module:
- Sans-IO and pure: no trio, socket, time or os. Everything is built once, at config compile time,
  into small slotted objects holding bytes and compiled `re` patterns; matching only reads them.
  Every object here pickles, so a `Snapshot` can be sent to worker processes.
- Values are compared as bytes, raw: header values as received, the path as received (Istio's
  path normalisation is the proxy's job, before routing), query values not percent-decoded.
- A request is seen through a `RequestView`, created at most once per request by
  `meshcore.routing.table.find_route`; it splits the path from the query string and parses the
  query parameters lazily, on first use, and caches both.
- Regexes follow Envoy's `safe_regex` (RE2): always a FULL match. RE2-only syntax that Python's `re`
  lacks is translated (`\\z`, POSIX classes); constructs RE2 rejects (look-around, backreferences)
  are rejected here too, so a config that Envoy would refuse is refused.
"""
from __future__ import annotations

import re
import warnings

__all__ = [
    "RequestView",
    "Exact",
    "Prefix",
    "Regex",
    "Present",
    "Never",
    "PathMatch",
    "HeaderMatch",
    "QueryMatch",
    "PseudoHeaderMatch",
    "request_scheme",
    "ClaimMatch",
    "RequestMatch",
    "compile_re2",
]

_QMARK = 0x3F  # b"?"


class RequestView:
    """Per-request cache over a request head: path without query, lowercase path, query params.

    `head` needs `.method: bytes`, `.path: bytes` (origin-form, with `?query`) and
    `.get(name: bytes) -> bytes | None` (name lowercase). `authority` is the request's Host /
    :authority as received (not lowercased), or None.
    """

    __slots__ = ("head", "authority", "_path", "_lower", "_query")

    def __init__(self, head, authority):
        self.head = head
        self.authority = authority
        self._path = None
        self._lower = None
        self._query = None

    def path_only(self) -> bytes:
        """The path without the query string (split once, cached)."""
        p = self._path
        if p is None:
            full = self.head.path
            i = full.find(b"?")
            p = self._path = full if i < 0 else full[:i]
        return p

    def lower_path(self) -> bytes:
        """The full path (query included) in ASCII lowercase (cached); for ignoreUriCase."""
        p = self._lower
        if p is None:
            p = self._lower = self.head.path.lower()
        return p

    def query_params(self) -> dict:
        """`{name: value}` of the query string, FIRST occurrence of each name, raw bytes (cached).

        `?a` (no `=`) gives `a: b""`. Empty segments (`&&`) are skipped.
        """
        q = self._query
        if q is None:
            q = self._query = {}
            full = self.head.path
            i = full.find(b"?")
            if i >= 0:
                for part in full[i + 1 :].split(b"&"):
                    if not part:
                        continue
                    k, _, v = part.partition(b"=")
                    if k not in q:
                        q[k] = v
        return q


# ------------------------------------------------------------------------------------------------
# Value matchers: test(value: bytes) -> bool


class Exact:
    __slots__ = ("value",)

    def __init__(self, value: bytes):
        self.value = value

    def test(self, v: bytes) -> bool:
        return v == self.value

    def describe(self) -> dict:
        return {"exact": self.value.decode("utf-8", "replace")}

    def __reduce__(self):
        return (Exact, (self.value,))


class Prefix:
    __slots__ = ("value",)

    def __init__(self, value: bytes):
        self.value = value

    def test(self, v: bytes) -> bool:
        return v.startswith(self.value)

    def describe(self) -> dict:
        return {"prefix": self.value.decode("utf-8", "replace")}

    def __reduce__(self):
        return (Prefix, (self.value,))


class Regex:
    """Full match of an RE2-style pattern (compiled with `compile_re2`)."""

    __slots__ = ("source", "_fullmatch")

    def __init__(self, source: str):
        self.source = source
        self._fullmatch = compile_re2(source).fullmatch

    def test(self, v: bytes) -> bool:
        return self._fullmatch(v) is not None

    def describe(self) -> dict:
        return {"regex": self.source}

    def __reduce__(self):
        return (Regex, (self.source,))


class Present:
    """Presence only (`{}` or regex `*` in Istio): any value, even empty, matches."""

    __slots__ = ()

    def test(self, v: bytes) -> bool:
        return True

    def describe(self) -> dict:
        return {"present": True}

    def __reduce__(self):
        return (Present, ())


class Never:
    """Cannot match (e.g. a uri `exact`/`prefix` containing `?`, which the query-less path never has)."""

    __slots__ = ("why",)

    def __init__(self, why: str = ""):
        self.why = why

    def test(self, v: bytes) -> bool:
        return False

    def describe(self) -> dict:
        return {"never": self.why}

    def __reduce__(self):
        return (Never, (self.why,))


# ------------------------------------------------------------------------------------------------
# Request conditions


class PathMatch:
    """`uri` StringMatch against the path WITHOUT its query string (§1.4, §1.5).

    exact/prefix are tested against the full path without splitting it: `prefix` P (no `?` in P)
    matches the query-less path iff the full path starts with P; `exact` E matches iff the full path
    starts with E and is either exactly E or continues with `?`. Only regex needs the split path.
    `ignore_case` (ignoreUriCase) lowercases both sides for exact/prefix only, never for regex.
    """

    __slots__ = ("kind", "value", "ignore_case", "_regex", "_never")

    def __init__(self, kind: str, value, ignore_case: bool = False):
        # kind: "exact" | "prefix" | "regex"; value: bytes for exact/prefix, str for regex
        self.kind = kind
        self.ignore_case = bool(ignore_case) and kind != "regex"
        if kind == "regex":
            self.value = value
            self._regex = Regex(value)
        else:
            if self.ignore_case:
                value = value.lower()
            self.value = value
            self._regex = None
            if kind not in ("exact", "prefix"):
                raise ValueError(f"unknown path match kind {kind!r}")
        # The query-less path never contains '?', so such an exact/prefix can never match.
        self._never = kind != "regex" and b"?" in self.value

    def test(self, head, req: RequestView) -> bool:
        kind = self.kind
        if kind == "regex":
            return self._regex.test(req.path_only())
        if self._never:
            return False
        v = self.value
        p = req.lower_path() if self.ignore_case else head.path
        if kind == "prefix":
            return p.startswith(v)
        n = len(v)
        return p.startswith(v) and (len(p) == n or p[n] == _QMARK)

    def describe(self) -> dict:
        d = {self.kind: self.value if self.kind == "regex" else self.value.decode("utf-8", "replace")}
        if self.ignore_case:
            d["ignore_case"] = True
        return d

    def __reduce__(self):
        return (PathMatch, (self.kind, self.value, self.ignore_case))


class HeaderMatch:
    """A header condition (`headers` / `withoutHeaders`, also `method` and `authority`).

    Not inverted: the header must be present and its value must match (`Present`: presence only).
    Inverted (`withoutHeaders`, §1.7): a presence matcher matches when the header is ABSENT; any
    other matcher treats a missing header as the empty value, then inverts the result.
    """

    __slots__ = ("name", "matcher", "invert", "_missing")

    def __init__(self, name: bytes, matcher, invert: bool = False):
        self.name = name
        self.matcher = matcher
        self.invert = bool(invert)
        if isinstance(matcher, Present):
            self._missing = self.invert
        else:
            self._missing = self.invert and not matcher.test(b"")

    def test(self, head) -> bool:
        v = head.get(self.name)
        if v is None:
            return self._missing
        if self.invert:
            return not self.matcher.test(v)
        return self.matcher.test(v)

    def describe(self) -> dict:
        d = {"name": self.name.decode("latin-1")}
        d.update(self.matcher.describe())
        if self.invert:
            d["invert"] = True
        return d

    def __reduce__(self):
        return (HeaderMatch, (self.name, self.matcher, self.invert))


def request_scheme(head) -> bytes:
    """Envoy's `:scheme` of a plaintext HTTP/1.1 request: the `x-forwarded-proto` it arrived with
    when that is http or https (any case), else `http` (ConnectionManagerUtility's getScheme)."""
    xfp = head.get(b"x-forwarded-proto")
    if xfp is not None and xfp.lower() in (b"http", b"https"):
        return xfp
    return b"http"


class PseudoHeaderMatch:
    """A header condition on an HTTP/2 pseudo-header name (`:path`, `:method`, `:authority`,
    `:scheme`), as Envoy evaluates it for an HTTP/1.1 request: `:path` is the full path with its
    query, `:authority` the Host, `:scheme` is request_scheme(). Same presence and inversion rules
    as HeaderMatch (also used for the `scheme` match field)."""

    __slots__ = ("name", "matcher", "invert")

    def __init__(self, name: bytes, matcher, invert: bool = False):
        if name not in (b":path", b":method", b":authority", b":scheme"):
            raise ValueError(f"unknown pseudo-header {name!r}")
        self.name = name
        self.matcher = matcher
        self.invert = bool(invert)

    def test(self, head) -> bool:
        n = self.name
        if n == b":path":
            v = head.path
        elif n == b":method":
            v = head.method
        elif n == b":authority":
            v = head.host
        else:
            v = request_scheme(head)
        if v is None:
            v = b""
        return self.matcher.test(v) != self.invert

    def describe(self) -> dict:
        d = {"name": self.name.decode("latin-1")}
        d.update(self.matcher.describe())
        if self.invert:
            d["invert"] = True
        return d

    def __reduce__(self):
        return (PseudoHeaderMatch, (self.name, self.matcher, self.invert))


class ClaimMatch:
    """A `@request.auth.claims.*` condition. meshcore does no JWT authentication, so there are no
    claims: as in Istio without a RequestAuthentication, `headers` on a claim never matches and
    `withoutHeaders` on a claim always does."""

    __slots__ = ("name", "invert")

    def __init__(self, name: str, invert: bool = False):
        self.name = name
        self.invert = bool(invert)

    def test(self, head) -> bool:
        return self.invert

    def describe(self) -> dict:
        return {"claim": self.name, "invert": self.invert, "never_authenticated": True}

    def __reduce__(self):
        return (ClaimMatch, (self.name, self.invert))


class QueryMatch:
    """A `queryParams` condition: first occurrence only, raw value; `Present` = presence."""

    __slots__ = ("name", "matcher")

    def __init__(self, name: bytes, matcher):
        self.name = name
        self.matcher = matcher

    def test(self, params: dict) -> bool:
        v = params.get(self.name)
        return v is not None and self.matcher.test(v)

    def describe(self) -> dict:
        d = {"name": self.name.decode("utf-8", "replace")}
        d.update(self.matcher.describe())
        return d

    def __reduce__(self):
        return (QueryMatch, (self.name, self.matcher))


class RequestMatch:
    """One Istio `match` entry: every condition must hold (AND)."""

    __slots__ = ("name", "path", "method", "authority", "headers", "query", "needs_view")

    def __init__(self, name="", path=None, method=None, authority=None, headers=(), query=()):
        self.name = name or ""
        self.path = path  # PathMatch | None
        self.method = method  # value matcher on head.method | None
        self.authority = authority  # value matcher on the raw authority | None
        self.headers = tuple(headers)  # HeaderMatch, ...
        self.query = tuple(query)  # QueryMatch, ...
        # False when `matches(head, None)` is safe: only case-sensitive exact/prefix uri, method and
        # header conditions, which read the head directly (no RequestView allocation needed).
        self.needs_view = bool(
            self.query
            or authority is not None
            or (path is not None and (path.kind == "regex" or path.ignore_case))
        )

    def matches(self, head, req: RequestView | None) -> bool:
        """True if every condition holds. `req` may be None when `needs_view` is False."""
        p = self.path
        if p is not None and not p.test(head, req):
            return False
        m = self.method
        if m is not None and not m.test(head.method):
            return False
        a = self.authority
        if a is not None:
            av = req.authority
            if av is None or not a.test(av):
                return False
        for h in self.headers:
            if not h.test(head):
                return False
        if self.query:
            params = req.query_params()
            for q in self.query:
                if not q.test(params):
                    return False
        return True

    def describe(self) -> dict:
        d: dict = {}
        if self.name:
            d["name"] = self.name
        if self.path is not None:
            d["path"] = self.path.describe()
        if self.method is not None:
            d["method"] = self.method.describe()
        if self.authority is not None:
            d["authority"] = self.authority.describe()
        if self.headers:
            d["headers"] = [h.describe() for h in self.headers]
        if self.query:
            d["query_params"] = [q.describe() for q in self.query]
        return d

    def __reduce__(self):
        return (RequestMatch, (self.name, self.path, self.method, self.authority, self.headers, self.query))

    def __repr__(self):
        return f"RequestMatch({self.describe()!r})"


# ------------------------------------------------------------------------------------------------
# RE2 -> Python re

_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "ascii": "\\x00-\\x7f",
    "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": "!-/:-@\\[-`{-~",
    "space": "\\t\\n\\v\\f\\r ",
    "upper": "A-Z",
    "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}


def _translate_re2(pattern: str) -> str:
    """Translate RE2 syntax into Python `re` syntax; raise ValueError for what RE2 rejects."""
    out = []
    i = 0
    n = len(pattern)
    in_class = False
    class_start = False
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                raise ValueError("trailing backslash")
            d = pattern[i + 1]
            if d in "123456789":
                raise ValueError("backreferences are not supported (RE2)")
            if d in "pP":
                raise ValueError("Unicode classes \\p / \\P are not supported")
            if in_class:
                class_start = False
            if d == "z" and not in_class:
                out.append("\\Z")
            elif d == "C":
                out.append("[\\x00-\\xff]" if not in_class else "\\x00-\\xff")
            else:
                out.append(c + d)
            i += 2
            continue
        if in_class:
            if c == "[" and pattern.startswith("[:", i):
                j = pattern.find(":]", i + 2)
                if j < 0:
                    raise ValueError("unterminated POSIX class")
                name = pattern[i + 2 : j]
                neg = name.startswith("^")
                if neg:
                    raise ValueError("negated POSIX classes are not supported")
                if name not in _POSIX_CLASSES:
                    raise ValueError(f"unknown POSIX class [:{name}:]")
                out.append(_POSIX_CLASSES[name])
                class_start = False
                i = j + 2
                continue
            if c == "[":
                out.append("\\[")  # RE2 treats a bare '[' inside a class literally
                i += 1
                continue
            if c == "]" and not class_start:
                in_class = False
            out.append(c)
            class_start = False
            i += 1
            continue
        if c == "[":
            in_class = True
            out.append(c)
            i += 1
            if i < n and pattern[i] == "^":
                out.append("^")
                i += 1
            class_start = True  # a ']' right after '[' or '[^' is literal
            continue
        if c == "(" and pattern.startswith("(?", i):
            rest = pattern[i + 2 : i + 4]
            if rest[:1] in ("=", "!") or rest in ("<=", "<!"):
                raise ValueError("look-around assertions are not supported (RE2)")
            if rest[:1] == ">":
                raise ValueError("atomic groups are not supported (RE2)")
            if pattern.startswith("(?P=", i):
                raise ValueError("backreferences are not supported (RE2)")
            if rest[:1] == "<":  # RE2's (?<name>...) is Python's (?P<name>...)
                out.append("(?P<")
                i += 3
                continue
        if c in "*+?}" and i + 1 < n and pattern[i + 1] == "+":
            raise ValueError("possessive quantifiers are not supported (RE2)")
        out.append(c)
        i += 1
    if in_class:
        raise ValueError("missing ]")
    return "".join(out)


def compile_re2(pattern: str) -> re.Pattern:
    """Compile an Istio/Envoy (RE2) regex for matching bytes. Raises ValueError with the reason."""
    try:
        translated = _translate_re2(pattern)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return re.compile(translated.encode("utf-8"))
    except re.error as e:
        raise ValueError(str(e)) from None


def matches_every_slash_path(matches) -> bool:
    """True when a route's `matches` (OR-ed) accept every request whose path starts with "/":
    no match entries at all, or one whose only condition is the case-sensitive prefix "/" (what
    Istio writes for a route without `match`). The event loop caches such routes per host."""
    if not matches:
        return True
    for m in matches:
        if (isinstance(m, RequestMatch) and m.method is None and m.authority is None
                and not m.headers and not m.query and m.path is not None
                and m.path.kind == "prefix" and m.path.value == b"/" and not m.path.ignore_case):
            return True
    return False
