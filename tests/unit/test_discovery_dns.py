"""Request-derived endpoints (meshcore.config.discovery) and DNS refresh (meshcore.config.dns, the
supervisor's periodic re-resolution). Resolvers are injected: no name is ever really resolved."""
from __future__ import annotations

import textwrap

import trio

from meshcore.config.compile import compile_sources
from meshcore.config.discovery import needs_request_target, request_endpoints, request_target
from meshcore.config.dns import DnsCache
from meshcore.config.policy import (ANY_PORT, DISCOVERY_DNS, DISCOVERY_DYNAMIC_DNS, DISCOVERY_LOGICAL_DNS,
                                    DISCOVERY_ORIGINAL_DST, DISCOVERY_STATIC)
from meshcore.supervisor import Supervisor


def compile_text(text: str, **kw):
    kw.setdefault("resolver", lambda name, port: ["192.0.2.1"])
    return compile_sources({"mesh.yaml": textwrap.dedent(text).encode()}, **kw)


SERVICES = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: none}
spec: {hosts: [none.example.com, "*.wild.example.com"], ports: [{number: 8080, name: http, protocol: HTTP}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dyn}
spec:
  hosts: ["*.dyn.example.com"]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DYNAMIC_DNS
  location: MESH_EXTERNAL
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: anyport}
spec: {hosts: [any.example.com], resolution: STATIC, endpoints: [{address: 10.1.0.1}, {address: "fd00::1"}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dns}
spec:
  hosts: [dns.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
  endpoints: [{address: a.backend.example.com}, {address: 10.9.9.9}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: rr}
spec: {hosts: [rr.example.com], ports: [{number: 80, name: http, protocol: HTTP}], resolution: DNS_ROUND_ROBIN}
"""


def test_discovery_kinds_per_resolution():
    s = compile_text(SERVICES, resolver=lambda name, port: {"a.backend.example.com": ["10.0.0.1", "10.0.0.2"],
                                                             "rr.example.com": ["10.3.0.1", "10.3.0.2"]}[name])
    c = s.clusters
    assert c["outbound|8080||none.example.com"].discovery == DISCOVERY_ORIGINAL_DST
    assert c["outbound|8080||none.example.com"].endpoints == ()
    assert c["outbound|8080||*.wild.example.com"].discovery == DISCOVERY_ORIGINAL_DST
    assert c["outbound|80||*.dyn.example.com"].discovery == DISCOVERY_DYNAMIC_DNS
    assert c[f"outbound|{ANY_PORT}||any.example.com"].discovery == DISCOVERY_STATIC
    assert [(e.address, e.port) for e in c["outbound|80||dns.example.com"].endpoints] == [
        ("10.0.0.1", 80), ("10.0.0.2", 80), ("10.9.9.9", 80)]
    assert c["outbound|80||dns.example.com"].discovery == DISCOVERY_DNS
    assert [e.address for e in c["outbound|80||rr.example.com"].endpoints] == ["10.3.0.1"]
    assert c["outbound|80||rr.example.com"].discovery == DISCOVERY_LOGICAL_DNS
    assert set(s.dns_names) == {("a.backend.example.com", 80), ("rr.example.com", 80)}
    assert s.warnings == ()


def test_wildcard_hosts_route_most_specific_first():
    from meshcore.routing.table import find_vhost
    s = compile_text(SERVICES + """\
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: deeper}
spec: {hosts: ["*.x.wild.example.com"], ports: [{number: 8080, name: http, protocol: HTTP}]}
""")
    assert find_vhost(s, b"a.wild.example.com:8080").name == "*.wild.example.com:8080"
    assert find_vhost(s, b"b.x.wild.example.com:8080").name == "*.x.wild.example.com:8080"
    assert find_vhost(s, b"wild.example.com:8080") is None  # a wildcard needs a label before it
    assert find_vhost(s, b"any.example.com:7777").name == "any.example.com"  # every port


def test_request_target_in_explicit_mode():
    s = compile_text(SERVICES)
    none = s.clusters["outbound|8080||none.example.com"]
    assert needs_request_target(none)
    assert request_target(none, b"none.example.com") == ("none.example.com", 8080)  # the service port
    assert request_target(none, b"None.Example.com:9000") == ("none.example.com", 9000)
    assert request_target(none, b"[::1]:81") == ("::1", 81)
    assert request_target(none, b"127.0.0.1:70000") is None
    assert request_target(none, None) is None
    eps = request_endpoints(none, b"none.example.com:81", ["10.0.0.5", "fd00::5"])
    assert [(e.address, e.port, e.key) for e in eps] == [("10.0.0.5", 81, "10.0.0.5:81"),
                                                         ("fd00::5", 81, "[fd00::5]:81")]
    assert request_endpoints(none, b"127.0.0.1:81") == request_endpoints(none, b"127.0.0.1:81", None)
    assert [e.address for e in request_endpoints(none, b"127.0.0.1:81")] == ["127.0.0.1"]
    assert request_endpoints(none, b"unresolvable.example.com", []) == ()  # no address: 503 UH
    dyn = s.clusters["outbound|80||*.dyn.example.com"]
    assert request_target(dyn, b"api.dyn.example.com") == ("api.dyn.example.com", 80)
    anyport = s.clusters[f"outbound|{ANY_PORT}||any.example.com"]
    assert needs_request_target(anyport)
    assert [(e.address, e.port, e.key) for e in request_endpoints(anyport, b"any.example.com:8443")] == [
        ("10.1.0.1", 8443, "10.1.0.1:8443"), ("fd00::1", 8443, "[fd00::1]:8443")]
    assert [e.port for e in request_endpoints(anyport, b"any.example.com")] == [80, 80]
    static = s.clusters["outbound|80||dns.example.com"]
    assert not needs_request_target(static)


def test_dns_cache_keeps_the_last_good_answer():
    answers = {"a": ["10.0.0.1"]}

    def resolver(name, port):
        v = answers[name]
        if isinstance(v, Exception):
            raise v
        return v

    cache = DnsCache(resolver)
    assert cache.lookup("a", 80) == ["10.0.0.1"]
    answers["a"] = ["10.0.0.2", "10.0.0.3"]
    assert cache.lookup("a", 80) == ["10.0.0.1"]  # compile reuses the cached answer
    assert cache.refresh([("a", 80), ("a", 80)]) == ["a"]
    assert cache.lookup("a", 80) == ["10.0.0.2", "10.0.0.3"]
    assert cache.refresh([("a", 80)]) == []  # unchanged
    answers["a"] = OSError(-2, "Name or service not known")
    assert cache.refresh([("a", 80)]) == []  # failure: the last good addresses stay
    answers["a"] = []
    assert cache.refresh([("a", 80)]) == []  # an empty answer too
    assert cache.lookup("a", 80) == ["10.0.0.2", "10.0.0.3"]


DNS_CONFIG = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dns}
spec:
  hosts: [headless.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
"""


def test_supervisor_refresh_recompiles_when_addresses_change(tmp_path):
    (tmp_path / "mesh.yaml").write_text(DNS_CONFIG)
    answers = {"headless.example.com": ["10.0.0.1"]}
    lookups = []

    def resolver(name, port):
        lookups.append(name)
        v = answers[name]
        if isinstance(v, Exception):
            raise v
        return list(v)

    sup = Supervisor([str(tmp_path)], ("127.0.0.1", 0), ("127.0.0.1", 0), 1, {"dns_refresh_rate": 60.0},
                     resolver=resolver)
    try:
        sup.sources, sup.snapshot, sup.slots = sup.load()
        sup.generation = sup.snapshot.generation
        cluster = "outbound|80||headless.example.com"

        def addresses():
            return [e.address for e in sup.snapshot.clusters[cluster].endpoints]

        assert addresses() == ["10.0.0.1"]
        first_hash = sup.snapshot.config_hash
        assert not trio.run(sup.refresh_dns)  # same answer: nothing to push
        answers["headless.example.com"] = ["10.0.0.1", "10.0.0.7"]
        assert trio.run(sup.refresh_dns)
        assert addresses() == ["10.0.0.1", "10.0.0.7"]
        assert sup.generation == 2 and sup.snapshot.config_hash != first_hash
        answers["headless.example.com"] = OSError(-3, "Temporary failure in name resolution")
        assert not trio.run(sup.refresh_dns)
        assert addresses() == ["10.0.0.1", "10.0.0.7"]  # last good addresses kept
        assert sup.generation == 2
        # a reload for another reason (files changed) reuses the cached answer, no new lookup
        n = len(lookups)
        (tmp_path / "mesh.yaml").write_text(DNS_CONFIG + "# edited\n")
        assert sup.reload("test")
        assert len(lookups) == n and addresses() == ["10.0.0.1", "10.0.0.7"]
    finally:
        sup.segment.unlink()
        sup.segment.close()
