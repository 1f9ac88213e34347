"""Connection-pool circuit breaking over cluster-row counters shared by all workers (sans-IO).

Rules of this module (semantics.md §2b, §5):

* Four resources per cluster, each a uint32 `Cell` of the cluster row (meshcore.shm.layout), shared
  by every worker process: `cx_active` (max_connections), `rq_pending` (max_pending_requests),
  `rq_active` (max_requests), `rq_retry_active` (max_retries). Envoy: "default" priority only.
* `try_acquire(counter, limit)`: admitted iff the counter is below `limit`; then the counter is +1.
  Implemented as a compare-and-swap loop (load, compare, CAS v -> v+1, retry on contention), so
  the limit is EXACT across workers: never more than `limit` holders, and no transient
  over-count that could make another worker refuse spuriously. Envoy itself does
  check-then-increment on a shared atomic and can overshoot slightly under races (§5.6); meshcore
  does not overshoot. The cost is a load plus a CAS (two atomics) instead of one fetch-add.
  With `limit >= UNLIMITED` (Istio's default 2^32-1) it is a single fetch-add and always admits.
* `release(counter)`: -1, clamped at zero (an unmatched release returns False instead of wrapping
  the gauge to 4 billion).
* `force_acquire(counter)`: +1 without a check, for Envoy's exception that each worker's pool may
  still open a connection to a host it has none to (§5.1: the real bound is
  max_connections + hosts x pools). The caller decides when that applies.
* Overflow handling (503 UO, `x-envoy-overloaded`, the `upstream_*_overflow` counters) belongs to
  the caller; `is_open` gives the `circuit_breakers.default.*_open` gauges.
* Holdings: each worker also counts the units it holds in its own holdings row (`held`, a
  `Cell` of meshcore.shm.layout's holdings region; single writer). A unit is counted there before
  it is taken from the shared gauge and uncounted after it is given back, so a worker killed at
  any instruction never holds more than its row says. When a worker dies the supervisor calls
  `return_holdings`, which subtracts the row from the shared gauges (clamped at zero) and zeroes
  it: the limits are exact again after any crash. (A kill between the two steps returns one unit
  too many; the zero clamp absorbs it when the real holders give theirs back, whereas the other
  order would leak a unit for good.) No lock is ever held, so nothing can deadlock.
"""
from __future__ import annotations

from dataclasses import dataclass

from meshcore.shm.layout import C_CX_ACTIVE, C_RQ_ACTIVE, C_RQ_PENDING, C_RQ_RETRY_ACTIVE

__all__ = ["UNLIMITED", "BreakerLimits", "DEFAULT_LIMITS", "try_acquire", "release",
           "force_acquire", "is_open", "breaker_limits_from_istio", "return_holdings",
           "GAUGE_OFFSETS", "return_worker_holdings"]

UNLIMITED = 4294967295  # Istio writes 2^32-1 for every threshold it does not set


@dataclass(frozen=True, slots=True)
class BreakerLimits:
    max_connections: int = UNLIMITED
    max_pending_requests: int = UNLIMITED
    max_requests: int = UNLIMITED
    max_retries: int = UNLIMITED


DEFAULT_LIMITS = BreakerLimits()


def try_acquire(counter, limit: int, held=None) -> bool:
    """Take one unit of `counter` (a layout.Cell) if fewer than `limit` are held; `held` is this
    worker's holdings cell for the same gauge (None: not tracked)."""
    if held is not None:
        held.cells.fetch_add32(held.off, 1)
    c = counter.cells
    off = counter.off
    if limit >= UNLIMITED:
        c.fetch_add32(off, 1)
        return True
    v = c.load32(off)
    while v < limit:
        if c.cas32(off, v, v + 1):
            return True
        v = c.load32(off)
    if held is not None:
        _decrement(held.cells, held.off)
    return False


def release(counter, held=None) -> bool:
    """Give one unit back; False (and no change) if the counter was already zero."""
    c = counter.cells
    off = counter.off
    returned = _decrement(c, off)
    if held is not None:
        _decrement(held.cells, held.off)
    return returned


def force_acquire(counter, held=None) -> None:
    """Take one unit regardless of the limit (see the module rules)."""
    if held is not None:
        held.cells.fetch_add32(held.off, 1)
    counter.cells.fetch_add32(counter.off, 1)


def _decrement(cells, off: int) -> bool:
    if cells.fetch_add32(off, -1) == 0:  # unmatched: undo the wrap
        cells.fetch_add32(off, 1)
        return False
    return True


# The four breaker gauges, as byte offsets shared by a cluster row and a holdings row.
GAUGE_OFFSETS = (C_CX_ACTIVE, C_RQ_PENDING, C_RQ_ACTIVE, C_RQ_RETRY_ACTIVE)


def return_holdings(cells, cluster_off: int, holdings_off: int) -> tuple[int, int, int, int]:
    """A dead worker's units go back: subtract its holdings row from the cluster row's gauges
    (never below zero) and zero the row. Returns what it held, in GAUGE_OFFSETS order
    (cx_active, rq_pending, rq_active, rq_retry_active). Only for a worker that is not running."""
    held = []
    for g in GAUGE_OFFSETS:
        n = cells.load32(holdings_off + g)
        if n:
            gauge = cluster_off + g
            v = cells.load32(gauge)
            while not cells.cas32(gauge, v, v - n if v > n else 0):
                v = cells.load32(gauge)
            cells.store32(holdings_off + g, 0)
        held.append(n)
    return tuple(held)


def return_worker_holdings(cells, layout, worker: int) -> dict[int, tuple[int, int, int, int]]:
    """`return_holdings` for every cluster slot of a dead `worker` (a slot's cluster may have
    left the config while the worker still held units of it). Returns {slot: held} for the
    slots where it held anything."""
    out = {}
    for slot in range(layout.max_clusters):
        held = return_holdings(cells, layout.cluster_off(slot), layout.holdings_off(worker, slot))
        if any(held):
            out[slot] = held
    return out


def is_open(counter, limit: int) -> bool:
    """Envoy's `*_open` gauge: the resource is at (or above) its limit."""
    return counter.cells.load32(counter.off) >= limit


def _limit(value) -> int:
    # 0 (and, defensively, negative) means unset in a DestinationRule int field
    if value is None or value <= 0:
        return UNLIMITED
    return min(int(value), UNLIMITED)


def breaker_limits_from_istio(connection_pool) -> BreakerLimits:
    """`connectionPool` (meshcore.config.istio.ConnectionPoolSettings or None) -> BreakerLimits.

    tcp.maxConnections -> max_connections; http.http1MaxPendingRequests -> max_pending_requests;
    http.http2MaxRequests -> max_requests (HTTP/1.1 too); http.maxRetries -> max_retries.
    Unset or 0 -> 2^32-1 (Istio's default, breaking disabled), in 1.4 and current.
    """
    if connection_pool is None:
        return DEFAULT_LIMITS
    tcp = getattr(connection_pool, "tcp", None)
    http = getattr(connection_pool, "http", None)
    return BreakerLimits(
        max_connections=_limit(getattr(tcp, "max_connections", None)),
        max_pending_requests=_limit(getattr(http, "http1_max_pending_requests", None)),
        max_requests=_limit(getattr(http, "http2_max_requests", None)),
        max_retries=_limit(getattr(http, "max_retries", None)),
    )
