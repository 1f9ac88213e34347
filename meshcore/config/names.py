"""Kubernetes names as Istio reads them: short-name expansion, alternative domains, exportTo.

Rules of this module (config time only, pure):
- `fqdn(host, namespace)`: Istio's ResolveShortnameToFQDN. A name without a dot (`reviews`) becomes
  `reviews.<namespace>.svc.cluster.local`; `*`, IP addresses and any name with a dot (`reviews.prod`,
  `example.com`) are kept as written. Used for VirtualService hosts and destinations, mirrors and
  DestinationRule hosts, never for ServiceEntry hosts (Istio takes those literally).
- A ServiceEntry host that is a short name (`reviews`, declared in namespace `ns`) stands in for the
  Kubernetes Service `reviews.ns.svc.cluster.local`: meshcore has no Kubernetes registry, so such a
  ServiceEntry is what a VirtualService's expanded `reviews` binds to (`ServiceNames.canonical`).
- `alt_domains(host, proxy_namespace)`: the extra request authorities Istio's sidecar accepts for a
  Kubernetes-style host (GenerateAltVirtualHosts): `name`, `name.ns`, `name.ns.svc` when the service
  is in the proxy's namespace, `name.ns`, `name.ns.svc` otherwise.
- `visible(export_to, namespace, proxy_namespace)`: Istio's exportTo: empty or `*` is everyone, `.`
  is the resource's own namespace, `~` is no one, anything else names namespaces.
"""
from __future__ import annotations

import ipaddress

__all__ = ["DOMAIN_SUFFIX", "ROOT_NAMESPACE", "fqdn", "is_kube_fqdn", "alt_domains", "visible",
           "ServiceNames"]

DOMAIN_SUFFIX = "svc.cluster.local"
ROOT_NAMESPACE = "istio-system"  # MeshConfig rootNamespace default: its DestinationRules apply everywhere


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def fqdn(host: str, namespace: str) -> str:
    """Istio's short-name expansion, lowercased (hosts compare case-insensitively)."""
    h = host.lower()
    if not h or h == "*" or "." in h or _is_ip(h):
        return h
    return f"{h}.{namespace}.{DOMAIN_SUFFIX}"


def is_kube_fqdn(host: str) -> bool:
    """`name.ns.svc.cluster.local` with a non-empty name and namespace."""
    if not host.endswith("." + DOMAIN_SUFFIX):
        return False
    parts = host[: -len(DOMAIN_SUFFIX) - 1].split(".")
    return len(parts) == 2 and all(parts)


def alt_domains(host: str, proxy_namespace: str) -> tuple[str, ...]:
    """Short forms of a Kubernetes-style host a sidecar in `proxy_namespace` also answers to."""
    if not is_kube_fqdn(host):
        return ()
    name, ns = host[: -len(DOMAIN_SUFFIX) - 1].split(".")
    if ns == proxy_namespace:
        return (name, f"{name}.{ns}", f"{name}.{ns}.svc")
    return (f"{name}.{ns}", f"{name}.{ns}.svc")


def visible(export_to, namespace: str, proxy_namespace: str) -> bool:
    """Whether a resource of `namespace` with `export_to` is seen by a proxy in `proxy_namespace`."""
    if not export_to:
        return True
    for e in export_to:
        if e == "*" or e == proxy_namespace or (e == "." and namespace == proxy_namespace):
            return True
    return False


class ServiceNames:
    """The service registry's names: literal ServiceEntry hosts plus the Kubernetes FQDN each
    short ServiceEntry host stands in for. `canonical(name)` maps a (possibly expanded) name to
    the registry host it denotes, or returns it unchanged."""

    __slots__ = ("_alias", "_hosts")

    def __init__(self):
        self._alias: dict[str, str] = {}
        self._hosts: set[str] = set()

    def add(self, host: str, namespace: str) -> None:
        self._hosts.add(host)
        if host and "." not in host and host != "*" and not _is_ip(host):
            self._alias.setdefault(f"{host}.{namespace}.{DOMAIN_SUFFIX}", host)

    def canonical(self, name: str) -> str:
        """A ServiceEntry that names the Kubernetes FQDN itself wins over a short-host stand-in."""
        if name in self._hosts:
            return name
        return self._alias.get(name, name)

    def aliases(self):
        """(kubernetes fqdn, short ServiceEntry host) pairs."""
        return self._alias.items()
