"""Envoy-style plain-text `/stats` from the shared-memory segment (T1: reads cells, no I/O).

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
    C_CX_ACTIVE,
    C_RQ_ACTIVE,
    C_RQ_PENDING,
    C_RQ_RETRY_ACTIVE,
    CLUSTER_FIELDS,
    H_STATE,
    OUTLIER_STATS,
    WORKER_CLUSTER_COUNTERS,
)

__all__ = ["StatsCluster", "cluster_stats", "render_stats"]

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

