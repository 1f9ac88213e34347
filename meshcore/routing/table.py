"""Route lookup: authority -> virtual host -> first matching route -> weighted destination.

Rules of this module:
- Sans-IO and pure (no trio, socket, time, os); reads only the immutable `Snapshot`.
- Virtual host lookup (§1.1): the authority is compared lowercase; `host:port` exact first, then
  the bare host, then wildcard hosts (`*.example.com`, `*`) by suffix, most specific first, again
  `host:port` before bare. No virtual host -> None. The common case (an already-lowercase Host
  that names a known virtual host) costs one dict lookup with the raw bytes and no allocation.
- Routes are tried in declared order, first match wins (§1.2); a route's match entries are OR-ed.
  No route matches -> None (the proxy answers 404 NR).
- `pick_destination` follows §1.14: `r = rnd % total_weight`, walk the destinations in order,
  first with `r < cumulative weight`.
"""
from __future__ import annotations

from meshcore.config.policy import RoutePolicy, Snapshot, VirtualHostPolicy, WeightedCluster
from meshcore.routing.matchers import RequestView

__all__ = ["RouteTable", "find_vhost", "find_route", "pick_destination", "pick_weighted",
           "split_authority"]


def split_authority(authority: bytes) -> tuple[bytes, bytes | None]:
    """`b"host:80"` -> `(b"host", b"80")`; `b"[::1]:80"` -> `(b"[::1]", b"80")`; no port -> None."""
    if authority.startswith(b"["):
        end = authority.find(b"]")
        if end < 0:
            return authority, None
        host = authority[: end + 1]
        rest = authority[end + 1 :]
        if rest.startswith(b":") and rest[1:].isdigit():
            return host, rest[1:]
        return host, None
    host, sep, port = authority.rpartition(b":")
    if sep and port.isdigit() and b":" not in host:
        return host, port
    return authority, None


class RouteTable:
    """Lookup structure built once from `Snapshot.vhosts` (str keys) at compile time.

    `exact`: lowercase bytes key (`host`, `host:port`) -> virtual host.
    `wildcards`: `(suffix, {port: vhost}, bare_vhost_or_None)`, longest suffix first; the key
    `*.example.com` has suffix `.example.com`, `*` has suffix `b""` (matches every host).
    """

    __slots__ = ("exact", "wildcards")

    def __init__(self, exact: dict, wildcards: tuple):
        self.exact = exact
        self.wildcards = wildcards

    @classmethod
    def from_vhosts(cls, vhosts: dict) -> "RouteTable":
        exact: dict[bytes, VirtualHostPolicy] = {}
        wild: dict[bytes, list] = {}
        for key, vh in vhosts.items():
            k = key.lower().encode("utf-8")
            if k.startswith(b"*"):
                host, port = split_authority(k)
                entry = wild.setdefault(host[1:], [{}, None])
                if port is None:
                    entry[1] = vh
                else:
                    entry[0][port] = vh
            else:
                exact[k] = vh
        wildcards = tuple(
            (suffix, ports, bare)
            for suffix, (ports, bare) in sorted(wild.items(), key=lambda kv: len(kv[0]), reverse=True)
        )
        return cls(exact, wildcards)

    def lookup(self, authority: bytes | None) -> VirtualHostPolicy | None:
        if authority is None:
            authority = b""
        vh = self.exact.get(authority)
        if vh is not None:
            return vh
        a = authority.lower()
        if a != authority:
            vh = self.exact.get(a)
            if vh is not None:
                return vh
        host, port = split_authority(a)
        if port is not None:
            vh = self.exact.get(host)
            if vh is not None:
                return vh
        for suffix, ports, bare in self.wildcards:
            if host.endswith(suffix) and len(host) > len(suffix):
                if port is not None:
                    vh = ports.get(port)
                    if vh is not None:
                        return vh
                if bare is not None:
                    return bare
        return None

    def __reduce__(self):
        return (RouteTable, (self.exact, self.wildcards))


def _table(snapshot: Snapshot) -> RouteTable:
    t = snapshot.route_table
    if t is None:
        # A hand-built Snapshot (tests, tools): build the table once and cache it on the snapshot.
        t = RouteTable.from_vhosts(snapshot.vhosts)
        object.__setattr__(snapshot, "route_table", t)
    return t


def find_vhost(snapshot: Snapshot, authority: bytes | None) -> VirtualHostPolicy | None:
    """The virtual host for a request authority (Host header), or None."""
    t = snapshot.route_table
    if t is None:
        t = _table(snapshot)
    return t.lookup(authority)


def find_route(snapshot: Snapshot, authority: bytes | None, head) -> RoutePolicy | None:
    """The first route of the authority's virtual host that matches `head`, or None.

    `head`: `.method: bytes`, `.path: bytes` (origin-form incl. `?query`), `.get(name) -> bytes | None`
    with lowercase names. None means 404 NR (no virtual host, or no route in it matches).
    """
    t = snapshot.route_table
    if t is None:
        t = _table(snapshot)
    vh = t.exact.get(authority) if authority is not None else None
    if vh is None:
        vh = t.lookup(authority)
        if vh is None:
            return None
    req = None  # RequestView, created on the first matcher that needs one (at most once)
    for route in vh.routes:
        ms = route.matches
        if not ms:
            return route
        for m in ms:
            if req is None and m.needs_view:
                req = RequestView(head, authority)
            if m.matches(head, req):
                return route
    return None


def pick_weighted(route: RoutePolicy, rnd: int) -> WeightedCluster | None:
    """The destination for one request (cluster and its rewrite/header edits): `rnd` is a fresh
    non-negative random integer. None for a route without destinations (a local reply route)."""
    dests = route.destinations
    if len(dests) == 1:
        return dests[0]
    if not dests:
        return None
    r = rnd % route.total_weight
    acc = 0
    for d in dests:
        acc += d.weight
        if r < acc:
            return d
    return dests[-1]


def pick_destination(route: RoutePolicy, rnd: int) -> str:
    """The cluster name for one request; "" for a route without destinations."""
    wc = pick_weighted(route, rnd)
    return "" if wc is None else wc.cluster
