"""Envoy-style plain-text `/stats` and `/clusters` from the shared-memory segment (T1: reads
cells, no I/O).

Rules of this module:

* Output: one `cluster.<name>.<stat>: <value>` line per stat, sorted by the full stat name as
  Envoy's admin `/stats` sorts them, newline-terminated.
* Worker counters (layout.WORKER_CLUSTER_COUNTERS) are summed over every worker row of the
  cluster; cluster-row gauges are printed as they are: `upstream_cx_active`,
  `upstream_rq_pending_active`, `upstream_rq_active`.
* `outlier_detection.*` lines only for clusters with outlier detection (Envoy creates those stats
  only with a detector).
* `circuit_breakers.default.{cx_open, cx_pool_open, rq_pending_open, rq_open, rq_retry_open}`:
  1 while the resource is at its limit (cx_pool_open is always 0: pools are not limited).
  `remaining_*` gauges are not printed (Istio leaves track_remaining off).
* `membership_total` / `membership_healthy` when the cluster's host slots are given
  (healthy = not ejected at `now_ms`; meshcore has no active health checking).
* Reads are atomic per cell but not a consistent snapshot across cells, as in Envoy.
"""
from __future__ import annotations

from typing import NamedTuple

from meshcore.shm.layout import (
    H_CX_ACTIVE,
    H_RQ_ACTIVE,
    C_CX_ACTIVE,
    C_RQ_ACTIVE,
    C_RQ_PENDING,
    C_RQ_RETRY_ACTIVE,
    CLUSTER_FIELDS,
    H_STATE,
    OUTLIER_STATS,
    WORKER_CLUSTER_COUNTERS,
)

__all__ = ["StatsCluster", "cluster_stats", "render_stats", "HostView", "ClusterView",
           "cluster_views", "render_clusters_text", "render_clusters_json"]

_UNLIMITED = 4294967295
_OUTLIER_OFF = {name: 4 * CLUSTER_FIELDS.index(name) for name in OUTLIER_STATS}


class StatsCluster(NamedTuple):
    name: str                      # Envoy cluster name, e.g. outbound|80||reviews.default.svc
    slot: int                      # cluster row slot
    host_slots: tuple[int, ...] = ()
    limits: object = None          # breaker.BreakerLimits or None (= unlimited)
    outlier: bool = False          # outlier detection configured


def cluster_stats(cells, layout, cluster: StatsCluster, now_ms: int = 0) -> dict[str, int]:
    """Every stat of one cluster, keyed by the name after `cluster.<name>.`."""
    out: dict[str, int] = {}
    n = len(WORKER_CLUSTER_COUNTERS)
    sums = [0] * n
    for w in range(layout.workers):
        base = layout.worker_row_off(w, cluster.slot)
        for i in range(n):
            sums[i] += cells.load64(base + 8 * i)
    out.update(zip(WORKER_CLUSTER_COUNTERS, sums))

    co = layout.cluster_off(cluster.slot)
    cx = cells.load32(co + C_CX_ACTIVE)
    pending = cells.load32(co + C_RQ_PENDING)
    active = cells.load32(co + C_RQ_ACTIVE)
    retries = cells.load32(co + C_RQ_RETRY_ACTIVE)
    out["upstream_cx_active"] = cx
    out["upstream_rq_pending_active"] = pending
    out["upstream_rq_active"] = active

    lim = cluster.limits
    cb = "circuit_breakers.default."
    out[cb + "cx_open"] = int(cx >= getattr(lim, "max_connections", _UNLIMITED))
    out[cb + "cx_pool_open"] = 0
    out[cb + "rq_pending_open"] = int(pending >= getattr(lim, "max_pending_requests", _UNLIMITED))
    out[cb + "rq_open"] = int(active >= getattr(lim, "max_requests", _UNLIMITED))
    out[cb + "rq_retry_open"] = int(retries >= getattr(lim, "max_retries", _UNLIMITED))

    if cluster.outlier:
        for name, off in _OUTLIER_OFF.items():
            out["outlier_detection." + name] = cells.load32(co + off)

    if cluster.host_slots:
        healthy = 0
        for slot in cluster.host_slots:
            until = cells.load64(layout.host_off(slot) + H_STATE)
            if until == 0 or until <= now_ms:
                healthy += 1
        out["membership_total"] = len(cluster.host_slots)
        out["membership_healthy"] = healthy
    return out


def render_stats(source, clusters, now_ms: int = 0, *, layout=None) -> str:
    """Render `/stats` text. `source`: a Segment (or anything with `.cells` and `.layout`), or a
    Cells object together with `layout=`. `clusters`: iterable of StatsCluster (or tuples)."""
    cells = getattr(source, "cells", source)
    layout = layout if layout is not None else source.layout
    lines = []
    for cl in clusters:
        cl = cl if isinstance(cl, StatsCluster) else StatsCluster(*cl)
        prefix = f"cluster.{cl.name}."
        for stat, value in cluster_stats(cells, layout, cl, now_ms).items():
            lines.append((prefix + stat, value))
    lines.sort()
    return "".join(f"{name}: {value}\n" for name, value in lines)



# ------------------------------------------------------------------------------------------------
# Admin /clusters: Envoy's text ("<cluster>::<host>::<stat>::<value>") and JSON shapes.

class HostView(NamedTuple):
    address: str
    port: int
    weight: int
    stats: dict                    # HOST_STATS counters summed over workers
    cx_active: int
    rq_active: int
    ejection_left_ms: int          # 0: not ejected (or the ejection already expired)


class ClusterView(NamedTuple):
    name: str
    limits: tuple                  # (max_connections, max_pending, max_requests, max_retries)
    hosts: tuple


_ENVOY_HIGH_PRIORITY = (1024, 1024, 1024, 3)  # Envoy's defaults; Istio sets only "default"


def cluster_views(cells, layout, clusters, now_ms: int) -> list[ClusterView]:
    """`clusters`: (name, ClusterPolicy, (cluster slot, host slots)) triples."""
    from meshcore.metrics.recorder import host_stats  # the per-host counters live there
    out = []
    for name, policy, (_, hslots) in clusters:
        lim = policy.limits
        limits = tuple(getattr(lim, f, _UNLIMITED) for f in (
            "max_connections", "max_pending_requests", "max_requests", "max_retries"))
        hosts = []
        for ep, slot in zip(policy.endpoints, hslots):
            ho = layout.host_off(slot)
            until = cells.load64(ho + H_STATE)
            hosts.append(HostView(ep.address, ep.port, ep.weight, host_stats(cells, layout, slot),
                                  cells.load32(ho + H_CX_ACTIVE), cells.load32(ho + H_RQ_ACTIVE),
                                  max(0, until - now_ms) if until else 0))
        out.append(ClusterView(name, limits, tuple(hosts)))
    return out


def _host_key(h: HostView) -> str:
    return f"[{h.address}]:{h.port}" if ":" in h.address else f"{h.address}:{h.port}"


def render_clusters_text(views) -> str:
    lines = []
    for c in views:
        n = c.name
        lines.append(f"{n}::observability_name::{n}")
        for k in ("success_rate_average", "success_rate_ejection_threshold",
                  "local_origin_success_rate_average",
                  "local_origin_success_rate_ejection_threshold"):
            lines.append(f"{n}::outlier::{k}::-1")
        for prio, limits in (("default_priority", c.limits),
                             ("high_priority", _ENVOY_HIGH_PRIORITY)):
            for k, v in zip(("max_connections", "max_pending_requests", "max_requests",
                             "max_retries"), limits):
                lines.append(f"{n}::{prio}::{k}::{v}")
        lines.append(f"{n}::added_via_api::true")
        for h in c.hosts:
            p = f"{n}::{_host_key(h)}::"
            s = h.stats
            for k, v in (("cx_active", h.cx_active), ("cx_connect_fail", s["cx_connect_fail"]),
                         ("cx_total", s["cx_total"]), ("rq_active", h.rq_active),
                         ("rq_error", s["rq_error"]), ("rq_pending_active", 0),
                         ("rq_success", s["rq_success"]), ("rq_timeout", s["rq_timeout"]),
                         ("rq_total", s["rq_total"]), ("hostname", ""),
                         ("health_flags", "/failed_outlier_check" if h.ejection_left_ms
                          else "healthy"),
                         ("ejection_time_left_ms", h.ejection_left_ms),
                         ("weight", h.weight), ("region", ""), ("zone", ""), ("sub_zone", ""),
                         ("canary", "false"), ("priority", 0), ("success_rate", -1),
                         ("local_origin_success_rate", -1)):
                lines.append(f"{p}{k}::{v}")
    return "".join(line + "\n" for line in lines)


def _stat(name: str, value: int, gauge: bool = False) -> dict:
    d = {"name": name}
    if value:  # proto3 JSON leaves zero values out, as Envoy's output does
        d["value"] = str(value)
    if gauge:
        d["type"] = "GAUGE"
    return d


def render_clusters_json(views) -> dict:
    statuses = []
    for c in views:
        hosts = []
        for h in c.hosts:
            s = h.stats
            health = {"eds_health_status": "HEALTHY"}
            if h.ejection_left_ms:
                health["failed_outlier_check"] = True
            hosts.append({
                "address": {"socket_address": {"address": h.address, "port_value": h.port}},
                "stats": [_stat("cx_connect_fail", s["cx_connect_fail"]),
                          _stat("cx_total", s["cx_total"]), _stat("rq_error", s["rq_error"]),
                          _stat("rq_success", s["rq_success"]),
                          _stat("rq_timeout", s["rq_timeout"]), _stat("rq_total", s["rq_total"]),
                          _stat("cx_active", h.cx_active, True),
                          _stat("rq_active", h.rq_active, True),
                          _stat("rq_pending_active", 0, True)],
                "health_status": health,
                "weight": h.weight,
                "locality": {},
                # meshcore's addition: how long the outlier ejection still lasts
                "ejection_time_left_ms": h.ejection_left_ms,
            })
        mc, mp, mr, mx = c.limits
        statuses.append({
            "name": c.name,
            "observability_name": c.name,
            "added_via_api": True,
            "host_statuses": hosts,
            "circuit_breakers": {"thresholds": [
                {"max_connections": mc, "max_pending_requests": mp, "max_requests": mr,
                 "max_retries": mx},
                {"priority": "HIGH", "max_connections": 1024, "max_pending_requests": 1024,
                 "max_requests": 1024, "max_retries": 3}]},
        })
    return {"cluster_statuses": statuses}
