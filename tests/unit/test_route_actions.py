"""Route actions as pure objects (meshcore.routing.actions), compiled from Istio YAML, without
sockets. Envoy's observable behaviour is checked in tests/integration/test_envoy_route_actions.py;
these pin the edge cases and the compile-time shape."""
from __future__ import annotations

import pickle
import textwrap

import pytest

from meshcore.config.compile import compile_sources
from meshcore.errors import ConfigError
from meshcore.routing.actions import (Cors, HeaderEdits, Redirect, Rewrite, Stage, local_response,
                                      re2_substitution, response_edits, upstream_request)
from meshcore.routing.matchers import Exact, Prefix
from meshcore.routing.table import find_route, pick_weighted


class Head:
    def __init__(self, path=b"/", method=b"GET", host=b"web", headers=None):
        self.path, self.method, self.host = path, method, host
        self._h = {k.lower(): v for k, v in (headers or {}).items()}

    def get(self, name):
        return self._h.get(name)


SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web}
spec:
  hosts: [web.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}, {number: 8080, name: alt, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.1}]
---
"""


def snap(http: str, **kw):
    text = SE + "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n" \
        "  hosts: [web.example.com]\n  http:\n" + textwrap.indent(textwrap.dedent(http), "  ")
    return compile_sources({"vs.yaml": text.encode()}, resolver=lambda n, p: [], **kw)


def route(s, path=b"/", host=b"web.example.com", **kw):
    return find_route(s, host, Head(path, host=host, **kw))


# ------------------------------------------------------------------------------------------------
# Header edits


def _line(n, v):
    return (n, n + b": " + v)


def test_header_stage_removes_then_overwrites_then_appends():
    st = Stage([b"x-gone"], [(b"x-a", b"x-a: set", True), (b"x-a", b"x-a: add", False),
                             (b"x-b", b"x-b: add", False)])
    e = HeaderEdits([st])
    block = b"x-a: client\r\nx-gone: 1\r\nx-keep: k\r\nx-b: client\r\n"
    assert e.apply(block) == b"x-keep: k\r\nx-b: client\r\nx-a: set\r\nx-a: add\r\nx-b: add\r\n"
    assert e.apply(b"") == e.lines() == b"x-a: set\r\nx-a: add\r\nx-b: add\r\n"
    # nothing touched: only appended (no parsing of the block's order)
    assert e.apply(b"x-other: 1\r\n") == b"x-other: 1\r\nx-a: set\r\nx-a: add\r\nx-b: add\r\n"


def test_header_stages_apply_in_order_weighted_first():
    dest = Stage([], [(b"x-over", b"x-over: dest", True)])
    route_level = Stage([], [(b"x-over", b"x-over: route", True)])
    assert HeaderEdits([dest, route_level]).apply(b"x-over: c\r\n") == b"x-over: route\r\n"
    assert not HeaderEdits([Stage(), Stage()])
    assert pickle.loads(pickle.dumps(HeaderEdits([dest]))) == HeaderEdits([dest])


def test_compiled_header_edits_single_and_weighted():
    s = snap("""\
    - match: [{uri: {prefix: /one}}]
      headers:
        request: {set: {X-Set: a, ":authority": ignored.example}, add: {x-add: b}, remove: [x-r]}
        response: {set: {x-resp: r, x-empty: ""}, remove: [x-up]}
      route:
      - destination: {host: web.example.com}
        headers: {request: {set: {x-add: d}}, response: {add: {x-resp: d}}}
    - route:
      - destination: {host: web.example.com}
        weight: 60
        headers: {request: {set: {x-w: d60}}}
      - destination: {host: web.example.com, port: {number: 8080}}
        weight: 40
    """)
    r = route(s, b"/one")
    (wc,) = r.destinations
    assert wc.rewrite.authority == b"ignored.example"  # set wins over add; host/:path not edited
    (st,) = wc.request_headers.stages
    assert st.removes == {b"x-r"}
    assert st.ops == ((b"x-set", b"x-set: a", True), (b"x-add", b"x-add: b", False), (b"x-add", b"x-add: d", True))
    (rst,) = wc.response_headers.stages
    assert rst.ops == ((b"x-resp", b"x-resp: r", True), (b"x-resp", b"x-resp: d", False))  # empty value dropped
    r2 = route(s, b"/two")
    assert [(d.cluster, d.weight) for d in r2.destinations] == [("outbound|80||web.example.com", 60),
                                                               ("outbound|8080||web.example.com", 40)]
    assert [st.ops for st in r2.destinations[0].request_headers.stages] == [((b"x-w", b"x-w: d60", True),)]
    assert r2.destinations[1].request_headers is None
    assert pick_weighted(r2, 59).weight == 60 and pick_weighted(r2, 60).weight == 40


def test_header_value_command_operators():
    s = snap("""\
    - headers: {request: {set: {x-pct: "50%%", x-dyn: "%DOWNSTREAM_REMOTE_ADDRESS%"}}}
      route: [{destination: {host: web.example.com}}]
    """)
    (wc,) = route(s).destinations
    assert wc.request_headers.stages[0].ops == ((b"x-pct", b"x-pct: 50%", True),)
    assert any("command operator %DOWNSTREAM_REMOTE_ADDRESS% in a header value is not implemented" in w
               for w in s.warnings)
    with pytest.raises(ConfigError) as ei:
        snap("""\
        - headers: {request: {set: {x-bad: "100%"}, add: {":path": x}}, response: {set: {host: y}}}
          route: [{destination: {host: web.example.com}}]
        """)
    assert ei.value.problems == [
        'vs.yaml: VirtualService vs: spec.http[0].headers.request.set.x-bad: invalid header configuration. Un-escaped %',
        "vs.yaml: VirtualService vs: spec.http[0].headers.request.add[\":path\"]: invalid header ':path': header "
        "cannot have \":\" prefix",
        "vs.yaml: VirtualService vs: spec.http[0].headers.response.set.host: invalid header 'host': cannot set Host header",
    ]


# ------------------------------------------------------------------------------------------------
# Redirect and direct response


@pytest.mark.parametrize("redirect,path,host,proto,location", [
    (Redirect(301, path=b"/new"), b"/old?q=1", b"a.test", b"http", b"http://a.test/new?q=1"),
    (Redirect(301, path=b"/new?fixed"), b"/old?q=1", b"a.test", b"http", b"http://a.test/new?fixed"),
    (Redirect(301, scheme=b"https"), b"/p", b"a.test:80", b"http", b"https://a.test/p"),
    (Redirect(301, scheme=b"https"), b"/p", b"a.test:8080", b"http", b"https://a.test:8080/p"),
    (Redirect(301), b"/p", b"a.test:80", b"http", b"http://a.test:80/p"),
    (Redirect(301, port=b":8443"), b"/p", b"[::1]:80", b"http", b"http://[::1]:8443/p"),
    (Redirect(301, host=b"b.test"), b"/p", b"a.test:80", b"http", b"http://b.test/p"),
    (Redirect(301, scheme=b"http"), b"/p", b"a.test:443", b"https", b"http://a.test/p"),
    (Redirect(301, prefix=(b"/old/", b"/n/", False)), b"/old/x?y", b"a.test", b"http", b"http://a.test/n/x?y"),
    (Redirect(301, prefix=(b"/OLD", b"/n", True)), b"/old/x", b"a.test", b"http", b"http://a.test/n/x"),
    (Redirect(301, prefix=(b"/", b"", False)), b"/x", b"a.test", b"http", b"http://a.test/x"),
])
def test_redirect_location(redirect, path, host, proto, location):
    head = Head(path, host=host, headers={b"x-forwarded-proto": proto})
    assert redirect.location(head) == location
    reply, extra = redirect.respond(head)
    assert (reply.status, reply.body, reply.details) == (301, b"", "direct_response")
    assert extra == b"location: " + location + b"\r\n"


def test_compiled_redirects_and_direct_responses():
    s = snap("""\
    - match: [{uri: {prefix: /a}}, {uri: {prefix: /b}}]
      redirect: {prefixRewrite: /z, redirectCode: 302}
    - match: [{uri: {prefix: /d}}]
      redirect: {derivePort: FROM_REQUEST_PORT, scheme: https}
    - match: [{uri: {prefix: /e}}]
      directResponse: {status: 418, body: {string: "teapot"}}
      headers: {response: {set: {x-why: tea}}}
    """)
    # one RoutePolicy per match entry: each replaces its own prefix
    assert route(s, b"/a/1").direct.location(Head(b"/a/1", host=b"w")) == b"http://w/z/1"
    assert route(s, b"/b/1").direct.location(Head(b"/b/1", host=b"w")) == b"http://w/z/1"
    assert route(s, b"/d").direct.port == b":80"  # FROM_REQUEST_PORT on port 80, scheme https: kept
    assert route(s, b"/d", host=b"web.example.com:8080").direct.port == b":8080"
    reply, extra = local_response(route(s, b"/e"), Head(b"/e"))
    assert (reply.status, reply.body, extra) == (418, b"teapot", b"x-why: tea\r\n")
    assert local_response(route(s, b"/e"), Head(b"/e")) == route(s, b"/e").direct.respond(Head())
    assert route(s, b"/e").destinations == ()


def test_redirect_and_direct_response_validation():
    with pytest.raises(ConfigError) as ei:
        snap("""\
        - redirect: {redirectCode: 200}
        - match: [{uri: {exact: /x}}]
          redirect: {prefixRewrite: /y, uri: /z, scheme: ftp}
        - directResponse: {status: 700}
        - directResponse: {status: 200, body: {bytes: "not base64!"}}
        """)
    assert ei.value.problems == [
        "vs.yaml: VirtualService vs: spec.http[0].redirect: redirect must specify URI, authority, scheme, or port",
        "vs.yaml: VirtualService vs: spec.http[0].redirect.redirectCode: 200 is not a valid redirect code, must be 3xx",
        "vs.yaml: VirtualService vs: spec.http[1].redirect: redirect may only specify one of uri or prefix_rewrite",
        "vs.yaml: VirtualService vs: spec.http[1].redirect: redirect prefix_rewrite requires all URI matches to use "
        "prefix match type",
        'vs.yaml: VirtualService vs: spec.http[1].redirect.scheme: invalid redirect scheme, must be "http" or "https"',
        "vs.yaml: VirtualService vs: spec.http[2].directResponse.status: HTTP status 700 is not in range 200-599",
        "vs.yaml: VirtualService vs: spec.http[3].directResponse.body.bytes: invalid base64",
    ]


# ------------------------------------------------------------------------------------------------
# Rewrite


def test_rewrite_prefix_exact_regex_and_authority():
    rw = Rewrite((b"/api/", b"/v2/", False))
    assert rw.apply(b"/api/x?q=1", b"h") == (b"/v2/x?q=1", b"h", b"x-envoy-original-path: /api/x?q=1\r\n")
    assert Rewrite((None, b"/z", False)).path(b"/exact?k") == b"/z?k"
    assert Rewrite((b"/API", b"/v", True)).path(b"/api/a") == b"/v/a"
    rx = Rewrite(None, "^/re/([a-z]+)/(.*)$", re2_substitution(r"/\2/by/\1"))
    assert rx.path(b"/re/abc/d/e?x=1") == b"/d/e/by/abc?x=1"
    assert Rewrite(None, "o", re2_substitution("0")).path(b"/foo/bo?o") == b"/f00/b0?o"  # every match
    assert Rewrite(authority=b"new").apply(b"/p", b"old:80") == (b"/p", b"new", b"x-envoy-original-host: old:80\r\n")
    assert re2_substitution(r"\0-\\") == r"\g<0>-\\"
    with pytest.raises(ValueError):
        re2_substitution(r"\n")
    assert pickle.loads(pickle.dumps(rx)) == rx


def test_compiled_rewrite_per_match_entry_and_route_authority():
    s = snap("""\
    - match: [{uri: {prefix: /a/}}, {uri: {exact: /exact}}, {uri: {regex: "/r.*"}}]
      rewrite: {uri: /new/, authority: up.example.com}
      route: [{destination: {host: web.example.com}}]
    """)
    assert route(s, b"/a/x").destinations[0].rewrite.apply(b"/a/x", b"web.example.com") == (
        b"/new/x", b"up.example.com",
        b"x-envoy-original-host: web.example.com\r\nx-envoy-original-path: /a/x\r\n")
    assert route(s, b"/exact?z").destinations[0].rewrite.path(b"/exact?z") == b"/new/?z"
    assert route(s, b"/rx").destinations[0].rewrite.path(b"/rx") == b"/new/"  # regex: the whole path
    wc = route(s, b"/a/x").destinations[0]
    assert upstream_request(wc, Head(b"/a/x", host=b"web.example.com"), b"x-c: 1\r\n") == (
        b"/new/x", b"up.example.com",
        b"x-c: 1\r\nx-envoy-original-host: web.example.com\r\nx-envoy-original-path: /a/x\r\n")


# ------------------------------------------------------------------------------------------------
# CORS


def test_cors_preflight_and_response_headers():
    c = Cors([Exact(b"https://ok.test"), Prefix(b"https://pre.")], b"GET,POST", b"*", b"x-e", b"60", True, True)
    pre = Head(b"/", b"OPTIONS", headers={b"origin": b"https://pre.x", b"access-control-request-method": b"PUT",
                                           b"access-control-request-headers": b"x-1"})
    reply, extra = c.preflight(pre)
    assert (reply.status, reply.body, reply.details) == (200, b"", "cors_response")
    assert extra == (b"access-control-allow-origin: https://pre.x\r\naccess-control-allow-credentials: true\r\n"
                     b"access-control-allow-methods: GET,POST\r\naccess-control-allow-headers: x-1\r\n"
                     b"access-control-max-age: 60\r\naccess-control-expose-headers: x-e\r\n")
    bad = Head(b"/", b"OPTIONS", headers={b"origin": b"https://evil", b"access-control-request-method": b"PUT"})
    assert c.preflight(bad) is None  # forwarded (unmatchedPreflights unset = FORWARD)
    ignore = Cors([Exact(b"https://ok.test")], forward_unmatched=False)
    reply, extra = ignore.preflight(bad)
    assert (reply.status, extra) == (200, b"")
    assert c.preflight(Head(b"/", b"GET", headers={b"origin": b"https://ok.test"})) is None
    assert c.preflight(Head(b"/", b"OPTIONS", headers={b"origin": b"https://ok.test"})) is None
    edits = c.response_edits(Head(headers={b"origin": b"https://ok.test"}))
    assert edits.apply(b"access-control-allow-origin: up\r\nx: 1\r\n") == (
        b"x: 1\r\naccess-control-allow-origin: https://ok.test\r\naccess-control-allow-credentials: true\r\n"
        b"access-control-expose-headers: x-e\r\n")
    assert c.response_edits(Head(headers={b"origin": b"https://evil"})) is None
    assert Cors([Exact(b"*")]).origin_allowed(b"https://anything")  # a `*` origin allows all


def test_cors_compiled_from_istio():
    s = snap("""\
    - corsPolicy:
        allowOrigin: ["https://legacy.test"]
        allowMethods: [GET, PUT]
        maxAge: 1m
        unmatchedPreflights: IGNORE
      route: [{destination: {host: web.example.com}}]
    """)
    r = route(s)
    assert r.cors == Cors([Exact(b"https://legacy.test")], b"GET,PUT", b"", b"", b"60", False, False)
    assert any("allowOrigin: deprecated: use allowOrigins" in w for w in s.warnings)
    head = Head(headers={b"origin": b"https://legacy.test"})
    assert response_edits(r.destinations[0], r, head).apply(b"") == b"access-control-allow-origin: https://legacy.test\r\n"
    assert response_edits(r.destinations[0], r, Head()) is None
    with pytest.raises(ConfigError) as ei:
        snap("""\
        - corsPolicy: {allowOrigins: [{exact: ""}], allowMethods: [FETCH], maxAge: 1500ms}
          route: [{destination: {host: web.example.com}}]
        """)
    assert ei.value.problems == [
        "vs.yaml: VirtualService vs: spec.http[0].corsPolicy.allowOrigins[0]: '' is not a valid match type for CORS "
        "allow origins",
        "vs.yaml: VirtualService vs: spec.http[0].corsPolicy.allowMethods[0]: 'FETCH' is not a supported HTTP method",
        "vs.yaml: VirtualService vs: spec.http[0].corsPolicy.maxAge: max_age duration is accurate only to seconds precision",
    ]


# ------------------------------------------------------------------------------------------------
# Delegates


DELEGATE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: root, namespace: default}
spec:
  hosts: [web.example.com]
  http:
  - name: reviews
    match: [{uri: {prefix: /reviews}}, {uri: {prefix: /ratings}}]
    timeout: 3s
    headers: {request: {set: {x-root: "1"}}}
    delegate: {name: reviews-delegate, namespace: team}
  - route: [{destination: {host: web.example.com}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-delegate, namespace: team}
spec:
  http:
  - name: v2
    match: [{uri: {prefix: /reviews/v2}}]
    route: [{destination: {host: web.example.com, port: {number: 8080}}}]
  - match: [{uri: {prefix: /reviews/v3}}, {uri: {exact: /other}}]   # /other is under no root match:
    route: [{destination: {host: web.example.com}}]                    # the whole route is dropped
  - match: [{uri: {regex: "/re.*"}}]   # conflicts with the root's prefixes: dropped
    route: [{destination: {host: web.example.com}}]
  - route: [{destination: {host: web.example.com}}]
    timeout: 1s
"""


def test_delegate_routes_merge_under_the_root_match():
    s = compile_sources({"d.yaml": (SE + DELEGATE).encode()}, resolver=lambda n, p: [])
    routes = s.vhosts["web.example.com:80"].routes
    assert [r.name for r in routes] == ["reviews-v2", "reviews", "root"]
    assert [m.describe()["path"] for m in routes[0].matches] == [{"prefix": "/reviews/v2"}]
    assert [m.describe()["path"] for m in routes[1].matches] == [{"prefix": "/reviews"}, {"prefix": "/ratings"}]
    assert routes[0].timeout == 3.0 and routes[1].timeout == 1.0  # the delegate's wins when set
    assert routes[0].destinations[0].cluster == "outbound|8080||web.example.com"
    assert routes[0].destinations[0].request_headers.lines() == b"x-root: 1\r\n"  # root headers inherited
    dropped = [w for w in s.warnings if "conflicts with every match" in w]
    assert [w.split(": ")[2] for w in dropped] == ["spec.http[1].match", "spec.http[2].match"]
    h = Head(b"/reviews/v2/x", host=b"web.example.com")
    assert find_route(s, b"web.example.com", h).name == "reviews-v2"
    assert find_route(s, b"web.example.com", Head(b"/other", host=b"web.example.com")).name == "root"


def test_missing_or_unexported_delegate_drops_only_that_route():
    text = SE + DELEGATE.replace("namespace: team}\nspec:\n  http:", "namespace: team}\nspec:\n  exportTo: [team]\n  http:")
    s = compile_sources({"d.yaml": text.encode()}, resolver=lambda n, p: [])
    assert [r.name for r in s.vhosts["web.example.com:80"].routes] == ["root"]
    assert any("delegate VirtualService team/reviews-delegate is not exported to namespace default" in w
               for w in s.warnings)
    with pytest.raises(ConfigError) as ei:
        compile_sources({"d.yaml": (SE + DELEGATE.replace("    delegate:", "    route: [{destination: {host: x}}]\n"
                                                           "    delegate:")).encode()})
    assert "root HTTP route reviews must not specify route" in ei.value.problems[0]
