"""DNS answers for `resolution: DNS` / `DNS_ROUND_ROBIN`, kept fresh as Envoy's DNS refresh does.

`DnsCache.lookup` is what the config compiler resolves names with: the last good answer when one is
known, else a lookup now. `DnsCache.refresh(names)` looks every name up again (the supervisor calls
it every `--dns-refresh-rate` seconds, Istio's default 60 s, off the event loop) and says which
answers changed; the supervisor then recompiles and pushes a new Snapshot. A failed or empty lookup
keeps the last good addresses, as Envoy keeps a STRICT_DNS cluster's hosts on resolution failure.

The resolver is injectable (`resolver(name, port) -> [ip, ...]`, raising OSError on failure), so
tests never resolve real names.
"""
from __future__ import annotations

from typing import Callable, Iterable

__all__ = ["DEFAULT_REFRESH_RATE", "DnsCache", "system_resolver"]

DEFAULT_REFRESH_RATE = 60.0  # seconds; Istio's MeshConfig dnsRefreshRate default

Resolver = Callable[[str, int], list]


def system_resolver(name: str, port: int) -> list[str]:
    """Every IPv4/IPv6 address of `name`, in getaddrinfo order, without duplicates."""
    import socket  # only here: DNS resolution is the one place config touches the network

    out: list[str] = []
    for fam, _, _, _, sa in socket.getaddrinfo(name, port, type=socket.SOCK_STREAM):
        if fam in (socket.AF_INET, socket.AF_INET6) and sa[0] not in out:
            out.append(sa[0])
    return out


class DnsCache:
    """Last good addresses per name."""

    def __init__(self, resolver: Resolver | None = None):
        self.resolver = resolver or system_resolver
        self.addresses: dict[str, tuple[str, ...]] = {}

    def lookup(self, name: str, port: int) -> list[str]:
        """The cached answer for `name`, or a fresh lookup (cached when it succeeds with addresses).
        Raises OSError when there is no cached answer and the lookup fails."""
        cached = self.addresses.get(name)
        if cached is not None:
            return list(cached)
        ips = tuple(self.resolver(name, port))
        if ips:
            self.addresses[name] = ips
        return list(ips)

    def refresh(self, names: Iterable[tuple[str, int]]) -> list[str]:
        """Look `names` up again; returns the names whose addresses changed (failures keep the
        last good addresses and change nothing)."""
        changed = []
        for name, port in dict.fromkeys(names):
            try:
                ips = tuple(self.resolver(name, port))
            except OSError:
                continue
            if not ips:
                continue
            if self.addresses.get(name) != ips:
                self.addresses[name] = ips
                changed.append(name)
        return changed

    def answers(self) -> tuple:
        """Every cached answer, sorted: part of a Snapshot's config hash."""
        return tuple(sorted(self.addresses.items()))
