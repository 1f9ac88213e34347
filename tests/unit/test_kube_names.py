"""Kubernetes naming as Istio applies it to a sidecar: short names, namespaces, alternative domains,
exportTo, DestinationRule lookup order and workloadSelector (meshcore.config.names and the
compiler), plus `check --strict`, `--namespace`, `--labels` on the command line."""
from __future__ import annotations

import os
import textwrap

import pytest

from meshcore.cli import main
from meshcore.config.compile import compile_sources
from meshcore.config.load import read_sources
from meshcore.config.names import alt_domains, fqdn, visible
from meshcore.routing.table import find_route, find_vhost

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOOKINFO = os.path.join(ROOT, "tests", "data", "istio-corpus", "istio", "samples", "bookinfo", "networking")


def compile_text(text, **kw):
    kw.setdefault("resolver", lambda n, p: [])
    return compile_sources({"k.yaml": textwrap.dedent(text).encode()}, **kw)


class Head:
    def __init__(self, path=b"/", host=b""):
        self.path, self.method, self.host = path, b"GET", host

    def get(self, name):
        return None


def test_fqdn_is_istios_short_name_expansion():
    assert fqdn("reviews", "prod") == "reviews.prod.svc.cluster.local"
    assert fqdn("Reviews", "prod") == "reviews.prod.svc.cluster.local"
    assert fqdn("reviews.prod", "x") == "reviews.prod"  # a dot: taken as written, as Istio does
    assert fqdn("*", "x") == "*" and fqdn("10.0.0.1", "x") == "10.0.0.1" and fqdn("::1", "x") == "::1"
    assert fqdn("*.example.com", "x") == "*.example.com"


def test_alt_domains_and_visibility():
    assert alt_domains("reviews.prod.svc.cluster.local", "prod") == ("reviews", "reviews.prod", "reviews.prod.svc")
    assert alt_domains("reviews.prod.svc.cluster.local", "default") == ("reviews.prod", "reviews.prod.svc")
    assert alt_domains("reviews.example.com", "default") == ()
    assert visible((), "a", "b") and visible(("*",), "a", "b") and visible(("b",), "a", "b")
    assert visible((".",), "a", "a") and not visible((".",), "a", "b") and not visible(("~",), "a", "a")


SERVICE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews.default.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}}
  - {address: 10.0.0.3, labels: {version: v3}}
"""


def test_bookinfo_short_names_bind_the_kubernetes_service(tmp_path):
    (tmp_path / "se.yaml").write_text(SERVICE)
    s = compile_sources(read_sources([str(tmp_path / "se.yaml"),
                                      os.path.join(BOOKINFO, "destination-rule-all.yaml"),
                                      os.path.join(BOOKINFO, "virtual-service-reviews-90-10.yaml")]))
    host = "reviews.default.svc.cluster.local"
    r = find_route(s, b"reviews:9080", Head())
    assert r.name == "reviews"
    assert [(d.cluster, d.weight) for d in r.destinations] == [(f"outbound|9080|v1|{host}", 90),
                                                               (f"outbound|9080|v2|{host}", 10)]
    assert [e.address for e in s.clusters[f"outbound|9080|v2|{host}"].endpoints] == ["10.0.0.2"]
    for authority in (b"reviews", b"reviews.default", b"reviews.default.svc", b"reviews.default.svc.cluster.local:9080"):
        assert find_route(s, authority, Head()) is r
    # DestinationRules for hosts without a ServiceEntry (productpage ...) are simply unused
    assert not [w for w in s.warnings if "reviews" in w]


def test_namespace_of_documents_and_of_the_proxy():
    text = SERVICE.replace("namespace: default", "namespace: prod").replace("reviews.default.", "reviews.prod.") + """\
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews}}]}]
"""
    # the VirtualService names no namespace: --namespace prod makes `reviews` the prod service
    s = compile_text(text, namespace="prod")
    assert find_route(s, b"reviews", Head()).name == "reviews"
    assert s.warnings == ()
    # in namespace default the same VirtualService means reviews.default...: no such service
    s = compile_text(text)
    assert any("host 'reviews.default.svc.cluster.local' has no ServiceEntry" in w for w in s.warnings)
    assert find_vhost(s, b"reviews") is not None  # its own virtual host, with the short alias
    assert find_vhost(s, b"reviews.prod:9080") is not None  # another namespace: name.ns only
    assert find_route(s, b"reviews.prod", Head()).name == "default"


def test_short_service_entry_host_stands_for_its_kubernetes_name():
    s = compile_text("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: web, namespace: shop}
    spec: {hosts: [web], ports: [{number: 80, name: http, protocol: HTTP}], resolution: STATIC,
           endpoints: [{address: 10.0.0.9}]}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: web, namespace: shop}
    spec: {hosts: [web.shop.svc.cluster.local], http: [{timeout: 2s, route: [{destination: {host: web}}]}]}
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: web, namespace: shop}
    spec: {host: web, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
    """, namespace="shop")
    r = find_route(s, b"web", Head())
    assert r.timeout == 2.0 and r.destinations[0].cluster == "outbound|80||web"
    assert s.clusters["outbound|80||web"].lb == "RANDOM"
    assert find_route(s, b"web.shop.svc.cluster.local:80", Head()) is r


def test_a_service_entry_with_the_fqdn_wins_over_a_short_stand_in():
    s = compile_text("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: short}
    spec: {hosts: [web], ports: [{number: 80, name: http, protocol: HTTP}], resolution: STATIC,
           endpoints: [{address: 10.0.0.1}]}
    ---
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: full}
    spec: {hosts: [web.default.svc.cluster.local], ports: [{number: 80, name: http, protocol: HTTP}],
           resolution: STATIC, endpoints: [{address: 10.0.0.2}]}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: vs}
    spec: {hosts: [web], http: [{timeout: 1s, route: [{destination: {host: web}}]}]}
    """)
    r = find_route(s, b"web.default.svc.cluster.local", Head())
    assert r.timeout == 1.0 and r.destinations[0].cluster == "outbound|80||web.default.svc.cluster.local"
    assert find_route(s, b"web", Head()).name == "default"  # the literal short host keeps its own vhost


def test_export_to_hides_resources_from_other_namespaces():
    s = compile_text("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: private, namespace: team}
    spec: {hosts: [p.example.com], exportTo: ["."], ports: [{number: 80, name: http, protocol: HTTP}],
           resolution: STATIC, endpoints: [{address: 10.0.0.1}]}
    ---
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: public, namespace: team}
    spec: {hosts: [q.example.com], exportTo: ["*"], ports: [{number: 80, name: http, protocol: HTTP}],
           resolution: STATIC, endpoints: [{address: 10.0.0.2}]}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: vs, namespace: team}
    spec: {hosts: [q.example.com], exportTo: [team], http: [{timeout: 1s, route: [{destination: {host: q.example.com}}]}]}
    """)
    assert "outbound|80||p.example.com" not in s.clusters
    assert find_route(s, b"q.example.com", Head()).name == "default"  # the VirtualService is not ours
    assert [w.split(": ", 2)[1:] for w in s.warnings] == [
        ["ServiceEntry team/private", "spec.exportTo: not exported to namespace 'default' (this proxy's --namespace); ignored"],
        ["VirtualService team/vs", "spec.exportTo: not exported to namespace 'default' (this proxy's --namespace); ignored"],
    ]
    s = compile_text("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: private, namespace: team}
    spec: {hosts: [p.example.com], exportTo: ["."], ports: [{number: 80, name: http, protocol: HTTP}],
           resolution: STATIC, endpoints: [{address: 10.0.0.1}]}
    """, namespace="team")
    assert "outbound|80||p.example.com" in s.clusters and s.warnings == ()


DR_ORDER = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: svc, namespace: owner}
spec: {hosts: [s.example.com], ports: [{number: 80, name: http, protocol: HTTP}], resolution: STATIC,
       endpoints: [{address: 10.0.0.1, labels: {v: a}}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: root, namespace: istio-system}
spec: {host: "*.example.com", trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: owner, namespace: owner}
spec: {host: s.example.com, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mine, namespace: client}
spec: {host: s.example.com, trafficPolicy: {connectionPool: {tcp: {connectTimeout: 3s}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: selected, namespace: client}
spec:
  host: s.example.com
  workloadSelector: {matchLabels: {app: checkout}}
  trafficPolicy: {connectionPool: {tcp: {connectTimeout: 7s}}}
"""


def test_destination_rule_lookup_order_and_workload_selector():
    c = "outbound|80||s.example.com"
    # the proxy's own namespace first, then the service's, then the root namespace
    assert compile_text(DR_ORDER, namespace="client").clusters[c].connect_timeout == 3.0
    assert compile_text(DR_ORDER, namespace="client", labels={"app": "checkout"}).clusters[c].connect_timeout == 7.0
    assert compile_text(DR_ORDER, namespace="owner").clusters[c].lb == "RANDOM"
    assert compile_text(DR_ORDER, namespace="elsewhere").clusters[c].lb == "RANDOM"
    no_owner = DR_ORDER.replace("name: owner, namespace: owner}\nspec: {host: s.example.com",
                                "name: owner, namespace: owner}\nspec: {host: other.example.com")
    assert compile_text(no_owner, namespace="elsewhere").clusters[c].lb == "ROUND_ROBIN"
    s = compile_text(DR_ORDER, namespace="client", labels={"app": "web"})
    assert any("DestinationRule client/selected: spec.workloadSelector: does not select this workload "
               "(namespace 'client', --labels app=web); ignored" in w for w in s.warnings)


# ------------------------------------------------------------------------------------------------
# Command line


def test_check_strict_turns_warnings_into_errors(tmp_path, capsys):
    f = tmp_path / "gw.yaml"
    f.write_text("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec: {}\n"
                 "---\n" + SERVICE)
    assert main(["check", str(f)]) == 0
    out = capsys.readouterr()
    assert "warning: " in out.err and out.out.startswith("ok: ")
    assert main(["check", "--strict", str(f)]) == 1
    err = capsys.readouterr().err
    assert "error (--strict): " in err and "skipped: meshcore does not act on Gateway" in err
    assert err.rstrip().endswith("1 error(s) (warnings, with --strict)")


def test_check_namespace_and_labels_flags(tmp_path, capsys):
    f = tmp_path / "dr.yaml"
    f.write_text(DR_ORDER)
    assert main(["check", "--namespace", "client", "--labels", "app=checkout,tier=web", str(f)]) == 0
    err = capsys.readouterr().err
    # the rule selecting this workload wins; the namespace-wide one's trafficPolicy is reported unused
    assert "DestinationRule client/mine: spec.trafficPolicy: host 's.example.com' already has a trafficPolicy " \
           "from " in err and "DestinationRule client/selected" in err
    assert main(["check", "--strict", "--namespace", "client", str(f)]) == 1
    assert "does not select this workload" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["check", "--labels", "novalue", str(f)])
