"""ServiceEntry and WorkloadEntry -> the service registry (hosts, ports, endpoints, discovery).

Rules of this module (config time only):
- Istio's validator runs first (meshcore.config.validate); what it rejects is an error here too.
- `resolution` decides the cluster's discovery kind (meshcore.config.policy DISCOVERY_*): STATIC
  lists IP endpoints; DNS resolves every endpoint address (or each host when there are no
  endpoints) to all its addresses, DNS_ROUND_ROBIN to its first; NONE (also when unset) forwards
  to the original destination and DYNAMIC_DNS to the request's host, so neither has endpoints.
- A ServiceEntry without ports binds its hosts on every port (ClusterPolicy.port ANY_PORT): its
  endpoints take the port of the request.
- Hosts are taken literally (lowercased), wildcards included (`*.example.com`: most specific wins
  when routing). A short host (`reviews`) also answers to the Kubernetes name it stands in for
  (meshcore.config.names.ServiceNames).
- Several ServiceEntries naming one host merge: ports (first declaration wins) and endpoints add up.
- exportTo hides a ServiceEntry from a proxy in another namespace (one warning).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from meshcore.config import istio
from meshcore.config.names import ServiceNames, visible
from meshcore.config.policy import (ANY_PORT, DISCOVERY_DNS, DISCOVERY_DYNAMIC_DNS,
                                    DISCOVERY_LOGICAL_DNS, DISCOVERY_ORIGINAL_DST, DISCOVERY_STATIC,
                                    Endpoint)
from meshcore.config.report import Doc, Report
from meshcore.config.validate import check_service_entry, check_workload_entry, is_ip

__all__ = ["Port", "Service", "compile_service_entries", "endpoint_key", "DISCOVERY_BY_RESOLUTION"]

DISCOVERY_BY_RESOLUTION = {
    "STATIC": DISCOVERY_STATIC,
    "DNS": DISCOVERY_DNS,
    "DNS_ROUND_ROBIN": DISCOVERY_LOGICAL_DNS,
    "NONE": DISCOVERY_ORIGINAL_DST,
    "DYNAMIC_DNS": DISCOVERY_DYNAMIC_DNS,
}
_HTTP_PROTOCOLS = {"", "HTTP", "HTTP2", "GRPC", "GRPC-WEB", "HTTP_PROXY"}

Lookup = Callable[[str, int], list]  # (name, port) -> [ip, ...]; raises OSError on failure


@dataclass
class Port:
    number: int
    name: str
    protocol: str
    target_port: int = 0


@dataclass
class Service:
    host: str
    namespace: str
    discovery: str
    doc: Doc
    ports: dict = field(default_factory=dict)  # number -> Port, first declaration wins; {} = every port
    endpoints: dict = field(default_factory=dict)  # number (ANY_PORT when portless) -> list[Endpoint]

    @property
    def port_numbers(self) -> list[int]:
        return list(self.ports) or [ANY_PORT]


def endpoint_key(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _resolve(name: str, port: int, lookup: Lookup, rep: Report, label: str, path: str) -> list[str]:
    try:
        ips = list(lookup(name, port))
    except OSError as e:
        rep.warn(label, path, f"DNS lookup of {name!r} failed ({e.strerror or e}); no endpoints")
        return []
    if not ips:
        rep.warn(label, path, f"DNS lookup of {name!r} returned no addresses; no endpoints")
    return ips


def compile_service_entries(se_docs: list[Doc], we_docs: list[Doc], rep: Report, lookup: Lookup,
                            proxy_namespace: str) -> tuple[dict[str, Service], ServiceNames]:
    """The registry: lowercase host -> Service, and the Kubernetes names of short hosts."""
    for wdoc in we_docs:
        rep.checks(wdoc.label, check_workload_entry(wdoc.obj.spec))
    services: dict[str, Service] = {}
    names = ServiceNames()
    for doc in se_docs:
        se: istio.ServiceEntry = doc.obj.spec
        label = doc.label
        if not rep.checks(label, check_service_entry(se, doc.namespace)):
            continue
        if not visible(se.export_to, doc.namespace, proxy_namespace):
            rep.warn(label, "spec.exportTo", f"not exported to namespace {proxy_namespace!r} (this proxy's "
                                             f"--namespace); ignored")
            continue
        resolution = se.resolution or "NONE"
        discovery = DISCOVERY_BY_RESOLUTION[resolution]
        hosts = [h.lower() for h in se.hosts]
        ports: list[Port] = []
        for i, p in enumerate(se.ports):
            proto = (p.protocol or "").upper()
            if proto not in _HTTP_PROTOCOLS:
                rep.warn(label, f"spec.ports[{i}].protocol",
                         f"protocol {p.protocol} is not supported (HTTP/1.1 only); port ignored")
                continue
            if proto in ("HTTP2", "GRPC", "GRPC-WEB"):
                rep.warn(label, f"spec.ports[{i}].protocol", f"protocol {p.protocol} is proxied as HTTP/1.1")
            ports.append(Port(p.number, p.name or "", proto or "HTTP", p.target_port or 0))
        if se.ports and not ports:
            continue  # every port is of a protocol meshcore does not proxy
        # (WorkloadEntry-like spec, label for problems, path prefix for problems)
        sources: list = [(ep, label, f"spec.endpoints[{i}]") for i, ep in enumerate(se.endpoints)]
        if se.workload_selector is not None and discovery not in (DISCOVERY_ORIGINAL_DST, DISCOVERY_DYNAMIC_DNS):
            want = se.workload_selector.labels
            for wdoc in we_docs:
                if wdoc.namespace != doc.namespace:
                    continue
                we = wdoc.obj.spec
                if all(we.labels.get(k) == v for k, v in want.items()):
                    sources.append((we, wdoc.label, "spec"))
        lookup_port = ports[0].number if ports else 80
        resolved: list = []  # (spec, [ips])
        for ep, elabel, epath in sources:
            addr = ep.address or ""
            if not addr:
                if ep.network:  # reached through that network's gateway, which meshcore has not
                    rep.warn(elabel, f"{epath}.address", f"endpoint on network {ep.network!r} without an "
                                                         "address is not reachable from here; ignored")
                continue
            if addr.startswith("unix://"):
                rep.warn(elabel, f"{epath}.address", "unix domain socket endpoints are not supported; ignored")
                continue
            if is_ip(addr):
                resolved.append((ep, [addr]))
            elif discovery == DISCOVERY_STATIC:
                # Istio's validator lets a WorkloadEntry name a host; a STATIC ServiceEntry cannot use it
                rep.error(elabel, f"{epath}.address", f"address {addr!r} is not an IP address (resolution STATIC)")
            else:
                resolved.append((ep, _resolve(addr, lookup_port, lookup, rep, elabel, f"{epath}.address")))
        per_host: dict[str, list] = {}
        if discovery in (DISCOVERY_DNS, DISCOVERY_LOGICAL_DNS) and not sources:
            # No endpoints: every host resolves to itself (semantics §12.2).
            for h in hosts:
                per_host[h] = [(istio.WorkloadEntry(address=h),
                                _resolve(h, lookup_port, lookup, rep, label, "spec.hosts"))]
        for h in hosts:
            svc = services.get(h)
            if svc is None:
                svc = services[h] = Service(h, doc.namespace, discovery, doc)
                names.add(h, doc.namespace)
            elif svc.discovery != discovery:
                rep.warn(label, "spec.resolution",
                         f"host {h!r} is already defined with resolution of {svc.doc.label}; its endpoints "
                         "are added to that service")
            host_sources = per_host.get(h, resolved)
            for port in ports or [Port(ANY_PORT, "", "HTTP")]:
                if port.number != ANY_PORT:
                    svc.ports.setdefault(port.number, port)
                eps = svc.endpoints.setdefault(port.number, [])
                for ep, ips in host_sources:
                    if discovery == DISCOVERY_LOGICAL_DNS:
                        ips = ips[:1]
                    if port.number == ANY_PORT:
                        target = ANY_PORT  # the request's port, per request
                    else:
                        target = ep.ports.get(port.name) or port.target_port or port.number
                    weight = ep.weight or 1
                    lbls = tuple(sorted(ep.labels.items()))
                    for ip in ips:
                        eps.append(Endpoint(ip, target, weight, lbls, endpoint_key(ip, target),
                                            ep.locality or ""))
    return services, names
