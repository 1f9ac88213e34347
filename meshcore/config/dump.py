"""A readable JSON view of a Snapshot, for the admin `/config_dump` and `meshcore dump-config`.

Not Envoy's config_dump schema: one object with the virtual hosts (their domains, routes with
matchers described, weighted destinations, timeouts), the clusters with their endpoints, and the
compile warnings. Keys are stable and sorted where order carries no meaning.
"""
from __future__ import annotations

import orjson

from meshcore.config.policy import ClusterPolicy, Snapshot, VirtualHostPolicy

__all__ = ["snapshot_to_dict", "snapshot_to_json"]


def _destination(d) -> dict:
    out = {"cluster": d.cluster, "weight": d.weight}
    if getattr(d, "rewrite", None) is not None:
        out["rewrite"] = d.rewrite.describe()
    if getattr(d, "request_headers", None) is not None:
        out["request_headers"] = d.request_headers.describe()
    if getattr(d, "response_headers", None) is not None:
        out["response_headers"] = d.response_headers.describe()
    return out


def _route(r) -> dict:
    out = {
        "name": r.name,
        "match": [m.describe() if hasattr(m, "describe") else repr(m) for m in r.matches],
        "route": [_destination(d) for d in r.destinations],
        "total_weight": r.total_weight,
        "timeout": r.timeout,
    }
    if getattr(r, "direct", None) is not None:
        out.update(r.direct.describe())
    if getattr(r, "cors", None) is not None:
        out.update(r.cors.describe())
    return out


def _cluster(c: ClusterPolicy) -> dict:
    return {
        "name": c.name,
        "service_host": c.service_host,
        "port": c.port,
        "subset": c.subset,
        "lb_policy": c.lb,
        "connect_timeout": c.connect_timeout,
        "idle_timeout": c.idle_timeout,
        "max_requests_per_connection": c.max_requests_per_connection,
        "discovery": c.discovery,
        "tls": c.tls.describe() if c.tls is not None else None,
        "slow_start": ({"window": c.slow_start.window, "aggression": c.slow_start.aggression,
                        "min_weight_percent": c.slow_start.min_weight_percent}
                       if c.slow_start is not None else None),
        "locality_lb": ({"priority": list(c.locality_lb.priority),
                         "locality_weight": list(c.locality_lb.group_weight)}
                        if c.locality_lb is not None else None),
        "endpoints": [
            {
                "address": e.address,
                "port": e.port,
                "weight": e.weight,
                "labels": dict(e.labels),
                "key": e.key,
                "locality": e.locality,
            }
            for e in c.endpoints
        ],
    }


def snapshot_to_dict(snapshot: Snapshot) -> dict:
    """The dump as plain Python data (what `snapshot_to_json` serialises)."""
    domains: dict[int, list[str]] = {}
    order: list[VirtualHostPolicy] = []
    for key, vh in snapshot.vhosts.items():
        lst = domains.get(id(vh))
        if lst is None:
            lst = domains[id(vh)] = []
            order.append(vh)
        lst.append(key)
    return {
        "generation": snapshot.generation,
        "config_hash": snapshot.config_hash,
        "virtual_hosts": [
            {"name": vh.name, "domains": sorted(domains[id(vh)]), "routes": [_route(r) for r in vh.routes]}
            for vh in order
        ],
        "clusters": [_cluster(c) for _, c in sorted(snapshot.clusters.items())],
        "warnings": list(snapshot.warnings),
    } | _sidecar(snapshot)


def _sidecar(snapshot: Snapshot) -> dict:
    """Sidecar mode only: what a captured connection's original destination selects."""
    if getattr(snapshot, "sidecar", None) is None:
        return {}
    from meshcore.config.sidecar import describe
    return {"sidecar": describe(snapshot.sidecar)}


def snapshot_to_json(snapshot: Snapshot) -> bytes:
    """The dump as indented JSON bytes."""
    return orjson.dumps(snapshot_to_dict(snapshot), option=orjson.OPT_INDENT_2)
