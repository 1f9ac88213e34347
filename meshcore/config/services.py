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
- Sidecar mode (`sidecar=True`, meshcore.config.sidecar): ports of a TCP-family protocol (TCP, TLS,
  HTTPS, MONGO, MYSQL, REDIS) are kept as `tcp_ports` (proxied as byte streams, chosen by the
  connection's original destination) instead of being ignored; `addresses` (VIPs, CIDRs) are
  kept; a ServiceEntry shaped as a Kubernetes Service (`addresses` set, every host
  `name.ns.svc.cluster.local`) takes an undeclared port protocol from the port name as Istio's
  Kubernetes registry does (`http-web` -> HTTP, `tcp-db` -> TCP, 3306 -> TCP).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Callable

from meshcore.config import istio
from meshcore.config.names import ServiceNames, is_kube_fqdn, visible
from meshcore.config.policy import (ANY_PORT, DISCOVERY_DNS, DISCOVERY_DYNAMIC_DNS,
                                    DISCOVERY_LOGICAL_DNS, DISCOVERY_ORIGINAL_DST, DISCOVERY_STATIC,
                                    Endpoint)
from meshcore.config.report import Doc, Report
from meshcore.config.validate import check_service_entry, check_workload_entry, is_ip

__all__ = ["Port", "Service", "compile_service_entries", "endpoint_key", "kube_protocol",
           "DISCOVERY_BY_RESOLUTION", "TCP_PROTOCOLS"]

DISCOVERY_BY_RESOLUTION = {
    "STATIC": DISCOVERY_STATIC,
    "DNS": DISCOVERY_DNS,
    "DNS_ROUND_ROBIN": DISCOVERY_LOGICAL_DNS,
    "NONE": DISCOVERY_ORIGINAL_DST,
    "DYNAMIC_DNS": DISCOVERY_DYNAMIC_DNS,
}
_HTTP_PROTOCOLS = {"", "HTTP", "HTTP2", "GRPC", "GRPC-WEB", "HTTP_PROXY"}
# proxied as byte streams in sidecar mode (Istio: tcp_proxy, or TLS passthrough by SNI)
TCP_PROTOCOLS = {"TCP", "TLS", "HTTPS", "MONGO", "MYSQL", "REDIS"}
# Istio's Kubernetes registry: an undeclared protocol on these ports is TCP (ConvertProtocol)
_WELL_KNOWN_TCP_PORTS = {25, 53, 3306, 27017}

Lookup = Callable[[str, int], list]  # (name, port) -> [ip, ...]; raises OSError on failure


@dataclass
class Port:
    number: int
    name: str
    protocol: str  # HTTP-family ("HTTP" when undeclared) or, in sidecar mode, TCP-family
    target_port: int = 0
    declared: str = ""  # the protocol as written (uppercase); "" when undeclared (Istio sniffs)


@dataclass
class Service:
    host: str
    namespace: str
    discovery: str
    doc: Doc
    ports: dict = field(default_factory=dict)  # number -> Port, first declaration wins; {} = every port
    endpoints: dict = field(default_factory=dict)  # number (ANY_PORT when portless) -> list[Endpoint]
    # sidecar mode only (see module doc): TCP-family ports, VIPs/CIDRs as written (normalised),
    # Kubernetes-Service shape, and the workloadSelector labels of each ServiceEntry declaring it
    tcp_ports: dict = field(default_factory=dict)  # number -> Port
    addresses: list = field(default_factory=list)
    kube: bool = False
    selectors: list = field(default_factory=list)

    @property
    def port_numbers(self) -> list[int]:
        """HTTP ports; [ANY_PORT] for a ServiceEntry without ports (a TCP-only one has none)."""
        return list(self.ports) or ([] if self.tcp_ports else [ANY_PORT])


def kube_protocol(number: int, name: str) -> str:
    """Istio's Kubernetes port protocol (pkg/config/kube ConvertProtocol) for an undeclared
    protocol: the port name's prefix before `-` (`http-web`, `grpc-web-x`), else TCP on a
    well-known non-HTTP port, else "" (Istio sniffs)."""
    low = name.lower()
    if low.startswith("grpc-web"):
        return "GRPC-WEB"
    prefix = low.split("-", 1)[0].upper()
    if prefix and (prefix in _HTTP_PROTOCOLS or prefix in TCP_PROTOCOLS or prefix == "UDP"):
        return prefix
    return "TCP" if number in _WELL_KNOWN_TCP_PORTS else ""


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
                            proxy_namespace: str, sidecar: bool = False
                            ) -> tuple[dict[str, Service], ServiceNames]:
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
        kube = bool(sidecar and se.addresses and all(is_kube_fqdn(h) for h in hosts))
        ports: list[Port] = []
        tcp_ports: list[Port] = []
        for i, p in enumerate(se.ports):
            proto = (p.protocol or "").upper()
            if kube and not proto:
                proto = kube_protocol(p.number, p.name or "")
            if sidecar and proto in TCP_PROTOCOLS:
                tcp_ports.append(Port(p.number, p.name or "", "TCP", p.target_port or 0, proto))
                continue
            if proto not in _HTTP_PROTOCOLS:
                why = ("UDP is not captured (the iptables rules redirect TCP only)"
                       if sidecar and proto == "UDP" else
                       f"protocol {p.protocol or proto} is not supported (HTTP/1.1 only)")
                rep.warn(label, f"spec.ports[{i}].protocol", f"{why}; port ignored")
                continue
            if proto in ("HTTP2", "GRPC", "GRPC-WEB"):
                rep.warn(label, f"spec.ports[{i}].protocol", f"protocol {p.protocol or proto} is proxied as HTTP/1.1")
            ports.append(Port(p.number, p.name or "", proto or "HTTP", p.target_port or 0, proto))
        if se.ports and not ports and not tcp_ports:
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
        lookup_port = (ports + tcp_ports)[0].number if ports or tcp_ports else 80
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
            if sidecar:
                for a in se.addresses:
                    a = _normalise_address(a)
                    if a not in svc.addresses:
                        svc.addresses.append(a)
                svc.kube = svc.kube or kube
                if se.workload_selector is not None:
                    svc.selectors.append(dict(se.workload_selector.labels))
            host_sources = per_host.get(h, resolved)
            declared = [(p, False) for p in ports] + [(p, True) for p in tcp_ports]
            for port, is_tcp in declared or [(Port(ANY_PORT, "", "HTTP"), False)]:
                if port.number in svc.ports or port.number in svc.tcp_ports:
                    pass  # first declaration wins
                elif is_tcp:
                    svc.tcp_ports[port.number] = port
                elif port.number != ANY_PORT:
                    svc.ports[port.number] = port
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


def _normalise_address(text: str) -> str:
    """A VIP as its canonical text (`10.0.0.1`, `fd00::1`), a CIDR as its network (`10.0.0.0/16`)."""
    if "/" in text:
        return str(ipaddress.ip_network(text, strict=False))
    return str(ipaddress.ip_address(text))
