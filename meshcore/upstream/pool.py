"""Per-cluster, per-worker connection pool bookkeeping (sans-IO).

Rules of this module (the compiled twin `ext/pool.pyx` follows the same ones):

* One `PoolBook` per cluster per worker process. Endpoints are indexes `0 <= ep < n_endpoints` in the
  order of the cluster's load assignment; any other index raises IndexError and changes nothing.
* Connections are opaque Python objects. The book never opens, closes or inspects them; it only
  decides which idle one to hand out and which ones the caller must close.
* Idle connections are kept per endpoint on a LIFO stack: the most recently returned (warmest)
  connection is reused first, the cold ones sink to the bottom and expire there. A connection is
  reusable while `now - returned_at < idle_timeout` (pass `math.inf` for "no idle timeout"; Envoy's
  `idle_timeout: 0` means disabled and must be mapped to inf by the caller).
* Connection accounting (`cx_active`: open connections, idle ones included):
  - the caller calls `on_open(ep)` after a successful connect and `on_close(ep)` whenever it closes a
    connection it holds: a connection it took out with `take_idle`, or one `put_idle` refused;
  - a connection the book itself removes from an idle stack (expired in `take_idle` and then
    handed out by `pop_to_close`, expired in `sweep`, or removed by `drain_all`) is already
    subtracted from `cx_active` by the book; the caller only closes it and must NOT call on_close.
* Counters never go below zero: an unmatched `on_close`/`rq_end` is clamped at 0 and counted in
  `statistics()["count_errors"]` rather than raised, so a bookkeeping slip in a `finally:` block cannot
  mask the real exception.
* `rq_start`/`rq_end` count active requests per endpoint (read by the least-request balancer).
"""
from __future__ import annotations

import operator

from meshcore import _accel

__all__ = ["PoolBook", "PoolBookPy", "PoolBookC", "DEFAULT_MAX_IDLE_PER_ENDPOINT"]

# Upper bound on idle connections kept per endpoint; beyond it a returned connection is closed.
# Envoy has no such cap (idle connections live until idle_timeout); 64 bounds the fds a worker keeps.
DEFAULT_MAX_IDLE_PER_ENDPOINT = 64


class PoolBookPy:
    """Pure-Python pool bookkeeping; the reference implementation and fallback of `PoolBookC`."""

    __slots__ = ("_n", "_max_idle", "_conns", "_stamps", "_cx", "_rq", "_to_close", "_count_errors")

    def __init__(self, n_endpoints: int, max_idle_per_endpoint: int = DEFAULT_MAX_IDLE_PER_ENDPOINT):
        n_endpoints = operator.index(n_endpoints)
        max_idle_per_endpoint = operator.index(max_idle_per_endpoint)
        if n_endpoints < 0:
            raise ValueError(f"n_endpoints must be >= 0, got {n_endpoints}")
        if max_idle_per_endpoint < 0:
            raise ValueError(f"max_idle_per_endpoint must be >= 0, got {max_idle_per_endpoint}")
        self._n = n_endpoints
        self._max_idle = max_idle_per_endpoint
        self._conns = [[] for _ in range(n_endpoints)]   # per-endpoint LIFO stack of idle conns
        self._stamps = [[] for _ in range(n_endpoints)]  # parallel stack: returned_at of each
        self._cx = [0] * n_endpoints
        self._rq = [0] * n_endpoints
        self._to_close = []
        self._count_errors = 0

    def _bad(self, ep):
        return IndexError(f"endpoint index {ep!r} out of range for a pool of {self._n} endpoints")

    @property
    def n_endpoints(self) -> int:
        return self._n

    @property
    def max_idle_per_endpoint(self) -> int:
        return self._max_idle

    # --- idle connections ---------------------------------------------------------------------

    def take_idle(self, ep, now, idle_timeout):
        """Pop the warmest reusable idle connection of `ep`, or None.

        Expired connections met on the way are removed, un-counted from cx_active and queued for
        `pop_to_close()`.
        """
        if not 0 <= ep < self._n:
            raise self._bad(ep)
        conns = self._conns[ep]
        if not conns:
            return None
        stamps = self._stamps[ep]
        while conns:
            conn = conns.pop()
            if now - stamps.pop() < idle_timeout:
                return conn
            self._to_close.append(conn)
            self._dec_cx(ep)
        return None

    def put_idle(self, ep, conn, now) -> bool:
        """Return a reusable connection. False when `ep` already holds the maximum number of idle
        connections: the book did not take it; the caller closes it and calls on_close(ep)."""
        if not 0 <= ep < self._n:
            raise self._bad(ep)
        conns = self._conns[ep]
        if len(conns) >= self._max_idle:
            return False
        conns.append(conn)
        self._stamps[ep].append(now)
        return True

    def pop_to_close(self) -> list:
        """Connections queued for closing by take_idle (already un-counted); clears the queue."""
        out = self._to_close
        if not out:
            return []
        self._to_close = []
        return out

    def sweep(self, now, idle_timeout) -> list:
        """Remove and return every expired idle connection, plus any still queued by take_idle.

        The returned connections are already un-counted from cx_active.
        """
        out = self._to_close
        self._to_close = []
        for ep in range(self._n):
            conns = self._conns[ep]
            if not conns:
                continue
            stamps = self._stamps[ep]
            keep = 0
            for i in range(len(conns)):
                if now - stamps[i] < idle_timeout:
                    conns[keep] = conns[i]
                    stamps[keep] = stamps[i]
                    keep += 1
                else:
                    out.append(conns[i])
                    self._dec_cx(ep)
            del conns[keep:]
            del stamps[keep:]
        return out

    def drain_all(self) -> list:
        """Remove and return every connection the book holds (idle ones and any still queued for
        closing); they are already un-counted from cx_active. For shutdown and config swaps."""
        out = self._to_close
        self._to_close = []
        for ep in range(self._n):
            conns = self._conns[ep]
            if conns:
                out.extend(conns)
                k = len(conns)
                if self._cx[ep] >= k:
                    self._cx[ep] -= k
                else:
                    self._count_errors += k - self._cx[ep]
                    self._cx[ep] = 0
                conns.clear()
                self._stamps[ep].clear()
        return out

    def remove_idle(self, ep, conn) -> bool:
        """Take one specific idle connection out of `ep`'s stack (it turned unusable while
        pooled: the peer closed it). Un-counts it from cx_active like the other removals.
        False (book unchanged) when it is not pooled."""
        if not 0 <= ep < self._n:
            raise self._bad(ep)
        conns = self._conns[ep]
        for k in range(len(conns) - 1, -1, -1):
            if conns[k] is conn:
                del conns[k]
                del self._stamps[ep][k]
                self._dec_cx(ep)
                return True
        return False

    # --- counters -------------------------------------------------------------------------------

    def _dec_cx(self, ep):
        if self._cx[ep] > 0:
            self._cx[ep] -= 1
        else:
            self._count_errors += 1

    def on_open(self, ep) -> None:
        if not 0 <= ep < self._n:
            raise self._bad(ep)
        self._cx[ep] += 1

    def on_close(self, ep) -> None:
        if not 0 <= ep < self._n:
            raise self._bad(ep)
        self._dec_cx(ep)

    def cx_active(self, ep) -> int:
        if not 0 <= ep < self._n:
            raise self._bad(ep)
        return self._cx[ep]

    def idle_count(self, ep) -> int:
        if not 0 <= ep < self._n:
            raise self._bad(ep)
        return len(self._conns[ep])

    def rq_start(self, ep) -> None:
        if not 0 <= ep < self._n:
            raise self._bad(ep)
        self._rq[ep] += 1

    def rq_end(self, ep) -> None:
        if not 0 <= ep < self._n:
            raise self._bad(ep)
        if self._rq[ep] > 0:
            self._rq[ep] -= 1
        else:
            self._count_errors += 1

    def rq_active(self, ep) -> int:
        if not 0 <= ep < self._n:
            raise self._bad(ep)
        return self._rq[ep]

    def statistics(self) -> dict:
        """Totals and per-endpoint lists (fresh objects; mutating them does not affect the book)."""
        idle = [len(c) for c in self._conns]
        return {
            "endpoints": self._n,
            "max_idle_per_endpoint": self._max_idle,
            "cx_active": sum(self._cx),
            "idle": sum(idle),
            "rq_active": sum(self._rq),
            "to_close": len(self._to_close),
            "count_errors": self._count_errors,
            "cx_active_per_endpoint": list(self._cx),
            "idle_per_endpoint": idle,
            "rq_active_per_endpoint": list(self._rq),
        }

    def __repr__(self):
        s = self.statistics()
        return (f"<{type(self).__name__} endpoints={s['endpoints']} cx_active={s['cx_active']} "
                f"idle={s['idle']} rq_active={s['rq_active']}>")


_compiled = _accel.load("pool")
PoolBookC = _compiled.PoolBook if _compiled is not None else None
PoolBook = PoolBookC if PoolBookC is not None else PoolBookPy
