"""A readable JSON view of a Snapshot, for the admin `/config_dump` and `meshcore dump-config`.

Not Envoy's config_dump schema: one object with the virtual hosts (their domains, routes with
matchers described, weighted destinations, timeouts), the clusters with their endpoints, and the
compile warnings. Keys are stable and sorted where order carries no meaning.
"""
from __future__ import annotations

import orjson

from meshcore.config.policy import ClusterPolicy, Snapshot, VirtualHostPolicy

__all__ = ["snapshot_to_dict", "snapshot_to_json"]


def _route(r) -> dict:
    return {
        "name": r.name,
        "match": [m.describe() if hasattr(m, "describe") else repr(m) for m in r.matches],
        "route": [{"cluster": d.cluster, "weight": d.weight} for d in r.destinations],
        "total_weight": r.total_weight,
        "timeout": r.timeout,
    }


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
        "endpoints": [
            {
                "address": e.address,
                "port": e.port,
                "weight": e.weight,
                "labels": dict(e.labels),
                "key": e.key,
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
    }


def snapshot_to_json(snapshot: Snapshot) -> bytes:
    """The dump as indented JSON bytes."""
    return orjson.dumps(snapshot_to_dict(snapshot), option=orjson.OPT_INDENT_2)
