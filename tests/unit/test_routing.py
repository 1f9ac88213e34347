"""Request routing (meshcore.routing.{matchers,table}); no sockets, a tiny fake request head."""
from __future__ import annotations

import collections
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.config.compile import compile_sources
from meshcore.errors import ConfigError
from meshcore.config.policy import RoutePolicy, Snapshot, VirtualHostPolicy, WeightedCluster
from meshcore.routing.matchers import (
    Exact,
    HeaderMatch,
    PathMatch,
    Prefix,
    Present,
    Regex,
    RequestMatch,
    RequestView,
    compile_re2,
)
from meshcore.routing.table import RouteTable, find_route, find_vhost, pick_destination, split_authority


class Head:
    """Minimal request head: method, origin-form path, lowercase header lookup."""

    def __init__(self, path=b"/", method=b"GET", headers=None, host=b"web"):
        self.method = method
        self.path = path
        self.host = host
        self._h = {k.lower(): v for k, v in (headers or {}).items()}

    def get(self, name):
        return self._h.get(name)


SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web}
spec:
  hosts: [web, api.example.com, x.api.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}, {number: 8080, name: http-alt, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.1}]
---
"""


def table(http_yaml: str, hosts=("web",), extra: str = "") -> Snapshot:
    """A snapshot whose VirtualService `vs` has the given `http:` list; route i is named r<i>."""
    hosts_s = ", ".join(f'"{h}"' for h in hosts)
    body = textwrap.indent(textwrap.dedent(http_yaml), "  ")
    text = SE + f"""\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: vs}}
spec:
  hosts: [{hosts_s}]
  http:
{body}"""
    if extra:
        text += "---\n" + textwrap.dedent(extra)
    return compile_sources({"r.yaml": text.encode()})


def one(match_yaml: str) -> Snapshot:
    """Route `hit` guarded by the given match list, then a catch-all `miss`."""
    return table(f"""\
    - name: hit
      match: {match_yaml}
      route: [{{destination: {{host: web}}}}]
    - name: miss
      route: [{{destination: {{host: web}}}}]
    """)


def routed(s: Snapshot, path=b"/", method=b"GET", headers=None, authority=b"web"):
    r = find_route(s, authority, Head(path, method, headers, authority))
    return None if r is None else r.name


def hit(s, *a, **kw) -> bool:
    name = routed(s, *a, **kw)
    assert name in ("hit", "miss")
    return name == "hit"


# ================================================================================================
# uri


def test_uri_exact_ignores_query_string():
    s = one("[{uri: {exact: /exact}}]")
    assert hit(s, b"/exact")
    assert hit(s, b"/exact?x=1")
    assert hit(s, b"/exact?")
    assert not hit(s, b"/exact/")
    assert not hit(s, b"/exactly")
    assert not hit(s, b"/Exact")
    assert not hit(s, b"/exac")


def test_uri_prefix_is_a_plain_character_prefix():
    s = one("[{uri: {prefix: /foo}}]")
    assert hit(s, b"/foo")
    assert hit(s, b"/foobar")
    assert hit(s, b"/foo/bar?q=1")
    assert hit(s, b"/foo?x")
    assert not hit(s, b"/fo")
    assert not hit(s, b"/fo?o")
    assert not hit(s, b"/bar/foo")


def test_uri_with_question_mark_never_matches():
    s = one("[{uri: {exact: /a?b}}, {uri: {prefix: /c?}}]")
    assert not hit(s, b"/a?b")
    assert not hit(s, b"/c?d")


def test_uri_regex_is_a_full_match_of_the_path_without_query():
    s = one('[{uri: {regex: "/re+x"}}]')
    assert hit(s, b"/reeex")
    assert hit(s, b"/reeex?z=1")
    assert hit(s, b"/rex?anything=/more")
    assert not hit(s, b"/reex/more")
    assert not hit(s, b"/xreex")
    assert not hit(s, b"/REEX")


def test_ignore_uri_case_affects_exact_and_prefix_not_regex():
    s = one("[{uri: {exact: /Exact}, ignoreUriCase: true}, {uri: {prefix: /PRE}, ignoreUriCase: true}, "
            '{uri: {regex: "/rx"}, ignoreUriCase: true}]')
    assert hit(s, b"/exact")
    assert hit(s, b"/EXACT?Q=1")
    assert not hit(s, b"/exact/")
    assert hit(s, b"/prefix")
    assert hit(s, b"/PrEfIx")
    assert hit(s, b"/rx")
    assert not hit(s, b"/RX")


def test_empty_uri_match_means_prefix_slash():
    s = one("[{uri: {}}]")
    assert hit(s, b"/anything")
    assert routed(s, b"*") is None  # neither route: the catch-all is prefix "/" too


# ================================================================================================
# headers / withoutHeaders / method / authority


def test_header_exact_prefix_regex():
    s = one('[{headers: {x-e: {exact: v}}}, {headers: {x-p: {prefix: ab}}}, {headers: {x-r: {regex: "ab"}}}]')
    assert hit(s, headers={b"x-e": b"v"})
    assert not hit(s, headers={b"x-e": b"vv"})
    assert not hit(s, headers={b"x-e": b""})
    assert hit(s, headers={b"x-p": b"abc"})
    assert not hit(s, headers={b"x-p": b"xab"})
    assert hit(s, headers={b"x-r": b"ab"})
    assert not hit(s, headers={b"x-r": b"xaby"})  # full match
    assert not hit(s, headers={b"x-r": b"abab"})
    assert not hit(s)


def test_header_presence():
    s = one("[{headers: {x-present: {}}}]")
    assert hit(s, headers={b"x-present": b"anything"})
    assert hit(s, headers={b"x-present": b""})  # empty value counts as present
    assert not hit(s)
    assert not hit(s, headers={b"x-other": b"1"})


def test_header_regex_star_is_rejected_as_istio_does():
    # Istio translates `regex: "*"` to a presence match, but its validator compiles the regex
    # (RE2 rejects a leading `*`) for `headers`; only `withoutHeaders` skips that check.
    with pytest.raises(ConfigError) as ei:
        one('[{headers: {x-present: {regex: "*"}}}]')
    assert "spec.http[0].match[0].headers.x-present.regex: invalid regex '*'" in str(ei.value)
    s = one('[{withoutHeaders: {x-present: {regex: "*"}}}]')
    assert hit(s) and not hit(s, headers={b"x-present": b""})


def test_header_names_are_lowercased():
    s = one("[{headers: {X-Mixed: {exact: v}}}]")
    assert hit(s, headers={b"x-mixed": b"v"})


def test_headers_are_anded_within_a_match_entry():
    s = one("[{headers: {a: {exact: '1'}, b: {exact: '2'}}, method: {exact: POST}}]")
    assert hit(s, method=b"POST", headers={b"a": b"1", b"b": b"2"})
    assert not hit(s, method=b"GET", headers={b"a": b"1", b"b": b"2"})
    assert not hit(s, method=b"POST", headers={b"a": b"1"})
    assert not hit(s, method=b"POST", headers={b"a": b"1", b"b": b"3"})


def test_without_headers_inverts():
    s = one("[{withoutHeaders: {x-env: {exact: prod}}}]")
    assert hit(s)  # missing header = empty value, which is not "prod"
    assert hit(s, headers={b"x-env": b"dev"})
    assert not hit(s, headers={b"x-env": b"prod"})


def test_without_headers_presence_means_absent():
    s = one("[{withoutHeaders: {x-debug: {}}}]")
    assert hit(s)
    assert not hit(s, headers={b"x-debug": b""})
    assert not hit(s, headers={b"x-debug": b"1"})


def test_without_headers_missing_header_is_the_empty_value():
    s = one('[{withoutHeaders: {x: {regex: ".*"}}}]')
    assert not hit(s)  # "" matches .*, inverted -> no match
    assert not hit(s, headers={b"x": b"abc"})
    s2 = one('[{withoutHeaders: {x: {prefix: a}}}]')
    assert hit(s2)
    assert hit(s2, headers={b"x": b"ba"})
    assert not hit(s2, headers={b"x": b"ab"})


def test_method_match():
    s = one('[{method: {exact: GET}}, {method: {regex: "P(UT|ATCH)"}}]')
    assert hit(s, method=b"GET")
    assert hit(s, method=b"PUT")
    assert hit(s, method=b"PATCH")
    assert not hit(s, method=b"POST")
    assert not hit(s, method=b"get")


def test_authority_match_uses_raw_authority():
    s = one('[{authority: {prefix: "web:"}}, {authority: {exact: WEB}}]')
    assert hit(s, authority=b"web:80")
    assert hit(s, authority=b"WEB")  # the vhost lookup lowercases; the authority matcher does not
    assert not hit(s, authority=b"web")


def test_uri_scheme_method_authority_in_headers_are_plain_header_names():
    # Current Istio passes every `headers` key to Envoy as a header name: `method` is a header
    # called "method", not the request method (`:method` is the pseudo-header).
    s = one("[{headers: {method: {exact: POST}}}]")
    assert not hit(s, method=b"POST")
    assert hit(s, method=b"GET", headers={b"method": b"POST"})
    assert s.warnings == ()


def test_pseudo_header_names_match_the_request_line_and_host():
    s = one('[{headers: {":path": {prefix: "/a?"}, ":method": {exact: PUT}, ":authority": {exact: web}}}]')
    assert hit(s, b"/a?x=1", method=b"PUT")
    assert not hit(s, b"/a", method=b"PUT")  # :path includes the query
    assert not hit(s, b"/a?x=1", method=b"GET")
    s = one('[{withoutHeaders: {":method": {exact: GET}}}]')
    assert hit(s, method=b"PUT") and not hit(s, method=b"GET")


def test_scheme_match_is_http_on_a_plaintext_listener():
    s = one("[{scheme: {exact: http}, uri: {prefix: /s}}, {scheme: {exact: https}}]")
    assert hit(s, b"/s")
    assert not hit(s, b"/other")


# ================================================================================================
# queryParams


def test_query_params_first_occurrence_raw_presence_regex():
    s = one('[{queryParams: {a: {exact: "1"}}}, {queryParams: {p: {}}}, {queryParams: {r: {regex: "[0-9]+"}}}, '
            "{queryParams: {pre: {prefix: ab}}}]")
    assert hit(s, b"/?a=1")
    assert hit(s, b"/x?b=2&a=1&a=2")
    assert not hit(s, b"/?a=2&a=1")  # only the first occurrence counts
    assert not hit(s, b"/?a=%31")  # raw, not percent-decoded
    assert not hit(s, b"/?a=1x")
    assert not hit(s, b"/a=1")
    assert not hit(s, b"/?A=1")
    assert hit(s, b"/?p")  # presence, no value
    assert hit(s, b"/?p=")
    assert hit(s, b"/?&&p=x")
    assert not hit(s, b"/?pp=1")
    assert hit(s, b"/?r=123")
    assert not hit(s, b"/?r=12a")  # full match
    assert hit(s, b"/?pre=abc")
    assert not hit(s, b"/?pre=xab")


def test_query_exact_empty_value():
    s = one('[{queryParams: {e: {exact: ""}}}]')
    assert hit(s, b"/?e")
    assert hit(s, b"/?e=")
    assert not hit(s, b"/?e=1")
    assert not hit(s, b"/")


# ================================================================================================
# order, OR, AND


def test_first_match_wins_in_declared_order():
    s = table("""\
    - name: specific
      match: [{uri: {prefix: /api/v2}}]
      route: [{destination: {host: web}}]
    - name: general
      match: [{uri: {prefix: /api}}]
      route: [{destination: {host: web}}]
    - name: shadowed
      match: [{uri: {prefix: /api/v2/x}}]
      route: [{destination: {host: web}}]
    """)
    assert routed(s, b"/api/v2/x") == "specific"
    assert routed(s, b"/api/v1") == "general"
    assert routed(s, b"/other") is None  # vhost exists, no route -> 404 NR


def test_match_entries_are_ored():
    s = one("[{uri: {prefix: /a}}, {headers: {x: {exact: '1'}}}, {method: {exact: DELETE}}]")
    assert hit(s, b"/a")
    assert hit(s, b"/z", headers={b"x": b"1"})
    assert hit(s, b"/z", method=b"DELETE")
    assert not hit(s, b"/z")


def test_route_without_match_matches_everything():
    s = table("""\
    - name: all
      route: [{destination: {host: web}}]
    """)
    assert routed(s, b"/") == "all"
    assert routed(s, b"/deep/path?q") == "all"


# ================================================================================================
# virtual hosts (authority)


def test_authority_with_and_without_port():
    s = table("""\
    - name: r
      route: [{destination: {host: web}}]
    """)
    assert find_vhost(s, b"web").name == "web:80"
    assert find_vhost(s, b"web:80").name == "web:80"
    assert find_vhost(s, b"web:8080").name == "web:8080"
    assert find_vhost(s, b"WEB:8080").name == "web:8080"
    assert find_vhost(s, b"Web").name == "web:80"
    assert find_vhost(s, b"web:9999").name == "web:80"  # unknown port -> bare host
    assert find_vhost(s, b"nope") is None
    assert find_vhost(s, b"nope:80") is None
    assert find_vhost(s, None) is None
    assert find_vhost(s, b"") is None
    r80 = find_route(s, b"web", Head())
    r8080 = find_route(s, b"web:8080", Head())
    assert r80.destinations[0].cluster == "outbound|80||web"
    assert r8080.destinations[0].cluster == "outbound|8080||web"


def test_no_vhost_means_none():
    s = table("""\
    - route: [{destination: {host: web}}]
    """)
    assert find_route(s, b"unknown.host", Head()) is None
    assert find_route(s, None, Head()) is None


def test_service_without_virtual_service_gets_default_route():
    s = table("""\
    - route: [{destination: {host: web}}]
    """, hosts=("other",))
    r = find_route(s, b"web", Head(b"/x"))
    assert (r.name, r.destinations[0].cluster, r.timeout) == ("default", "outbound|80||web", 0.0)
    assert find_route(s, b"web", Head(b"*")) is None  # prefix "/" like Istio's default route


def test_wildcard_hosts():
    s = table("""\
    - name: wild
      route: [{destination: {host: web}}]
    """, hosts=("*.example.com",), extra="""\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: deeper}
    spec:
      hosts: ["*.api.example.com"]
      http: [{name: deeper, route: [{destination: {host: web}}]}]
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: star}
    spec:
      hosts: ["*"]
      gateways: [mesh, edge-gateway]  # Istio allows `*` only with a gateway besides the mesh
      http: [{name: star, route: [{destination: {host: web}}]}]
    """)
    # service hosts: exact service vhosts, VirtualService chosen by most specific wildcard
    assert routed(s, authority=b"api.example.com") == "wild"
    assert routed(s, authority=b"x.api.example.com:8080") == "deeper"
    assert routed(s, authority=b"web") == "star"
    # hosts without a service: matched by suffix, most specific first, with or without port
    assert routed(s, authority=b"other.example.com") == "wild"
    assert routed(s, authority=b"Other.Example.com:80") == "wild"
    assert routed(s, authority=b"y.api.example.com") == "deeper"
    assert routed(s, authority=b"a.b.api.example.com:1234") == "deeper"
    assert routed(s, authority=b"example.com") == "star"  # *.example.com needs a label before it
    assert routed(s, authority=b"anything.else") == "star"
    assert find_vhost(s, b"x.example.com").name == "*.example.com:80"


def test_wildcard_without_catch_all_misses():
    s = table("""\
    - name: wild
      route: [{destination: {host: web}}]
    """, hosts=("*.example.com",))
    assert routed(s, authority=b"example.com") is None
    assert routed(s, authority=b"a.example.org") is None
    assert routed(s, authority=b"a.example.com") == "wild"


@pytest.mark.parametrize("authority,expected", [
    (b"host", (b"host", None)), (b"host:80", (b"host", b"80")), (b"[::1]:8080", (b"[::1]", b"8080")),
    (b"[::1]", (b"[::1]", None)), (b"host:", (b"host:", None)), (b"::1", (b"::1", None)),
    (b"h:x", (b"h:x", None)),
])
def test_split_authority(authority, expected):
    assert split_authority(authority) == expected


def test_hand_made_snapshot_builds_its_table_once():
    route = RoutePolicy(name="r", matches=(), destinations=(WeightedCluster("c", 100),), total_weight=100)
    vh = VirtualHostPolicy(name="h:80", routes=(route,))
    s = Snapshot(generation=1, config_hash="x", vhosts={"h": vh, "h:80": vh, "*.w.io": vh}, clusters={})
    assert s.route_table is None
    assert find_route(s, b"h", Head()) is route  # empty matches: matches every request
    t = s.route_table
    assert isinstance(t, RouteTable)
    assert find_route(s, b"a.w.io:1", Head()) is route
    assert s.route_table is t


def test_routing_works_after_pickling():
    s = one('[{uri: {regex: "/r[0-9]+"}, headers: {x: {prefix: a}}, queryParams: {q: {}}}]')
    s2 = pickle.loads(pickle.dumps(s))
    assert hit(s2, b"/r12?q", headers={b"x": b"ab"})
    assert not hit(s2, b"/r12?q", headers={b"x": b"b"})


# ================================================================================================
# weighted destinations


def split(weights):
    dests = tuple(WeightedCluster(f"c{i}", w) for i, w in enumerate(weights))
    return RoutePolicy(name="r", destinations=dests, total_weight=sum(weights))


def test_pick_destination_80_20_over_10000():
    r = split([80, 20])
    counts = collections.Counter(pick_destination(r, rnd) for rnd in range(10_000))
    assert counts == {"c0": 8000, "c1": 2000}
    assert pick_destination(r, 79) == "c0"
    assert pick_destination(r, 80) == "c1"
    assert pick_destination(r, 99) == "c1"
    assert pick_destination(r, 100) == "c0"


def test_pick_destination_order_and_non_100_totals():
    r = split([10, 20, 70])
    assert [pick_destination(r, x) for x in (0, 9, 10, 29, 30, 99)] == ["c0", "c0", "c1", "c1", "c2", "c2"]
    r3 = split([3, 1])
    counts = collections.Counter(pick_destination(r3, rnd) for rnd in range(4000))
    assert counts == {"c0": 3000, "c1": 1000}
    assert pick_destination(r3, 2**64 + 3) == "c1"


def test_pick_destination_single_and_none():
    assert pick_destination(split([100]), 12345) == "c0"
    assert pick_destination(RoutePolicy(name="x"), 5) == ""


def test_weighted_route_from_demo_config():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from meshcore.config.load import read_sources

    s = compile_sources(read_sources([os.path.join(root, "examples", "demo")]))
    r = find_route(s, b"split-service", Head(b"/"))
    counts = collections.Counter(pick_destination(r, rnd) for rnd in range(10_000))
    assert counts == {"outbound|80|v1|split-service": 8000, "outbound|80|v2|split-service": 2000}
    assert find_route(s, b"myweb-service:80", Head(b"/x?y")).destinations[0].cluster == "outbound|80|v1|myweb-service"


# ================================================================================================
# matcher internals


def test_request_view_splits_once():
    class CountingHead(Head):
        reads = 0

        @property
        def path(self):
            CountingHead.reads += 1
            return self._path

        @path.setter
        def path(self, v):
            self._path = v

    h = CountingHead(b"/a/b?x=1&y=2&x=3")
    v = RequestView(h, b"web")
    p1 = v.path_only()
    p2 = v.path_only()
    assert p1 == b"/a/b" and p1 is p2
    q1 = v.query_params()
    assert q1 == {b"x": b"1", b"y": b"2"} and v.query_params() is q1
    reads = CountingHead.reads
    v.path_only(), v.query_params()
    assert CountingHead.reads == reads


def test_path_without_query_is_not_copied():
    p = b"/no/query"
    assert RequestView(Head(p), None).path_only() is p


@pytest.mark.parametrize("pattern,yes,no", [
    (r"a\z", [b"a"], [b"ab"]),
    ("[[:digit:]]+", [b"123"], [b"12a"]),
    ("[^[:alpha:]_]+", [b"12-"], [b"a", b"_"]),
    ("[]a]+", [b"]a]"], [b"b"]),
    (r"[\d]x", [b"1x"], [b"xx"]),
    ("(?<year>[0-9]{4})", [b"2024"], [b"24"]),
    ("(?i)abc", [b"ABC"], [b"abd"]),
])
def test_re2_translation(pattern, yes, no):
    rx = Regex(pattern)
    assert all(rx.test(v) for v in yes)
    assert not any(rx.test(v) for v in no)


@pytest.mark.parametrize("pattern", ["a(?=b)", "a(?!b)", "(?<=a)b", "(?<!a)b", r"(a)\1", "(?P<n>a)(?P=n)",
                                     r"\pL", "a++", "(?>a)", "[[:nope:]]", "(", "[a"])
def test_re2_rejects(pattern):
    with pytest.raises(ValueError):
        compile_re2(pattern)


def test_header_match_objects_directly():
    h = Head(headers={b"x": b"val"})
    assert HeaderMatch(b"x", Exact(b"val")).test(h)
    assert not HeaderMatch(b"x", Exact(b"val"), invert=True).test(h)
    assert HeaderMatch(b"y", Prefix(b"v"), invert=True).test(h)
    assert not HeaderMatch(b"y", Present()).test(h)
    assert HeaderMatch(b"y", Present(), invert=True).test(h)
    m = RequestMatch("n", PathMatch("prefix", b"/"), headers=[HeaderMatch(b"x", Regex("v.l"))])
    assert m.matches(h, RequestView(h, None))
    assert m.describe() == {"name": "n", "path": {"prefix": "/"}, "headers": [{"name": "x", "regex": "v.l"}]}


_seg = st.text(alphabet="abAB/?=&.", max_size=12)


@settings(max_examples=300, deadline=None)
@given(value=_seg, path=_seg, kind=st.sampled_from(["exact", "prefix"]), ignore=st.booleans())
def test_path_match_equals_reference_split_semantics(value, path, kind, ignore):
    """The split-free exact/prefix test equals 'compare with the path stripped of its query'."""
    v, p = value.encode(), path.encode()
    pm = PathMatch(kind, v, ignore)
    h = Head(p)
    got = pm.test(h, RequestView(h, None))
    stripped = p.split(b"?", 1)[0]
    if ignore:
        stripped, v = stripped.lower(), v.lower()
    want = stripped == v if kind == "exact" else stripped.startswith(v)
    assert got == want


def test_routing_modules_import_no_io():
    code = ("import sys; import meshcore.routing.table, meshcore.routing.matchers; "
            "bad = [m for m in ('trio', 'socket', 'asyncio', 'selectors') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_request_view_only_when_needed():
    s = one("[{uri: {prefix: /p}, method: {exact: GET}, headers: {x: {exact: '1'}}}]")
    (m,) = find_vhost(s, b"web").routes[0].matches
    assert m.needs_view is False
    assert m.matches(Head(b"/p", headers={b"x": b"1"}), None)
    for match in ('{uri: {regex: "/p"}}', "{uri: {prefix: /p}, ignoreUriCase: true}", "{queryParams: {q: {}}}",
                  "{authority: {exact: web}}"):
        (m,) = find_vhost(one(f"[{match}]"), b"web").routes[0].matches
        assert m.needs_view is True, match
