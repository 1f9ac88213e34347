"""Per-worker state of one cluster: pool bookkeeping, balancer, and its shared-memory rows.

Built from an immutable `ClusterPolicy` plus the slots the supervisor assigned; rebuilt only when
either changes on reload, so a reload that leaves a cluster alone keeps its warm connections.
Outlier state and breaker gauges live in shared memory (all workers see them at once); request
and connection counters go to this worker's own stats row.
"""
from __future__ import annotations

import math
import random
import time

import trio

from meshcore.config.policy import ClusterPolicy
from meshcore.policy.classify import Kind
from meshcore.shm import layout as L
from meshcore.upstream import breaker, outlier
from meshcore.upstream.balancer import make_cluster_balancer
from meshcore.upstream.outcome import outcome_from_classified
from meshcore.upstream.pool import PoolBook
from meshcore.upstream.ring import pick_excluding

MAX_IDLE_PER_ENDPOINT = 64
PENDING_POLL = 0.02  # a pending request re-checks the shared connection limit this often

_STATUS_CLASS = {1: L.W_INDEX["upstream_rq_1xx"], 2: L.W_INDEX["upstream_rq_2xx"],
                 3: L.W_INDEX["upstream_rq_3xx"], 4: L.W_INDEX["upstream_rq_4xx"],
                 5: L.W_INDEX["upstream_rq_5xx"]}
_FAILURE_STAT = {Kind.CONNECT_FAILURE: L.W_UPSTREAM_CX_CONNECT_FAIL,
                 Kind.CONNECT_TIMEOUT: L.W_UPSTREAM_CX_CONNECT_TIMEOUT,
                 Kind.PER_TRY_TIMEOUT: L.W_UPSTREAM_RQ_PER_TRY_TIMEOUT,
                 Kind.RESET_BEFORE_RESPONSE: L.W_UPSTREAM_RQ_RX_RESET}


def now_ms() -> int:
    """Milliseconds on CLOCK_MONOTONIC: one clock for every process sharing the segment."""
    return int(time.monotonic() * 1000)


class ClusterState:
    __slots__ = ("policy", "slots", "endpoints", "book", "balancer", "idle_timeout", "row",
                 "hosts", "stats", "outlier", "limits", "n", "conn_freed", "limited_cx", "table",
                 "_tables")

    def __init__(self, policy: ClusterPolicy, rng: random.Random, segment, worker: int, slots):
        self.policy = policy
        self.slots = slots
        self.endpoints = policy.endpoints
        self.n = len(policy.endpoints)
        # Istio/Envoy: an idle timeout of 0 disables it.
        self.idle_timeout = policy.idle_timeout or math.inf
        self.book = PoolBook(self.n, MAX_IDLE_PER_ENDPOINT)
        weights = [e.weight for e in policy.endpoints]
        self.table = None  # consistent hashing: the ring or Maglev table over all endpoints
        self._tables = {}  # healthy subset -> (table, endpoint index per table index)
        if policy.ring_config is not None:
            self.balancer = None
            if policy.endpoints:
                self.table = policy.ring_config.build([e.key for e in policy.endpoints], weights)
        else:
            # lb kind, plus slow start and locality priorities/weights when configured
            self.balancer = make_cluster_balancer(policy, rng) if policy.endpoints else None
        self.outlier = policy.outlier if policy.outlier is not None else outlier.DISABLED
        self.limits = policy.limits if policy.limits is not None else breaker.DEFAULT_LIMITS
        self.limited_cx = self.limits.max_connections < breaker.UNLIMITED
        cslot, hslots = slots
        self.row = segment.cluster(cslot)
        self.hosts = [segment.host(s) for s in hslots]
        self.stats = segment.worker_stats(worker, cslot)
        self.conn_freed = trio.Event()

    # === host choice ===

    def pick(self, exclude, h=None) -> int:
        """An endpoint index for the next attempt, or -1 when no host may be picked (UH).

        Ejected hosts are skipped unless the cluster is in panic; `exclude` (hosts already
        tried) is a preference, as Envoy's previous_hosts predicate is. `h` is the request's
        consistent-hash value (None: no key, a random one), used by ring/Maglev clusters.
        """
        if self.row.ejections_active.load() == 0:  # the common case: nobody ejected
            if self.table is not None:
                return self._pick_hashed(self.table, None, h, exclude)
            return self.balancer.pick(self.book, exclude)
        healthy, panic = outlier.healthy_set_or_panic(
            outlier.availability(self.hosts, now_ms()), self.outlier.healthy_panic_threshold)
        if panic:
            self.stats.inc(L.W_LB_HEALTHY_PANIC)
            if self.table is not None:
                return self._pick_hashed(self.table, None, h, exclude)
            return self.balancer.pick(self.book, exclude)
        if not healthy:
            self.stats.inc(L.W_UPSTREAM_CX_NONE_HEALTHY)
            return -1
        if self.table is not None:
            # Envoy builds the table over the healthy hosts: a key moves only while its host is
            # out, and comes back after.
            if len(healthy) == self.n:
                return self._pick_hashed(self.table, None, h, exclude)
            table, index = self._healthy_table(healthy)
            return self._pick_hashed(table, index, h, exclude)
        if len(healthy) == self.n:
            return self.balancer.pick(self.book, exclude)
        pick_healthy = getattr(self.balancer, "pick_healthy", None)
        if pick_healthy is not None:  # locality priorities: Envoy's spill-over to lower priorities
            return pick_healthy(self.book, exclude, healthy)
        ok = set(healthy)
        avoid = ok.difference(exclude) if exclude else ok
        for _ in range(2 * self.n):  # the balancer's own order, restricted to healthy hosts
            ep = self.balancer.pick(self.book, exclude)
            if ep in avoid or (ep in ok and not avoid):
                return ep
        pool = sorted(avoid or ok)
        return pool[random.getrandbits(32) % len(pool)]

    def _healthy_table(self, healthy):
        entry = self._tables.get(healthy)
        if entry is None:
            if len(self._tables) > 16:  # ejection sets churn: keep the cache small
                self._tables.clear()
            eps = self.endpoints
            entry = (self.policy.ring_config.build([eps[i].key for i in healthy],
                                                   [eps[i].weight for i in healthy]), healthy)
            self._tables[healthy] = entry
        return entry

    @staticmethod
    def _pick_hashed(table, index, h, exclude) -> int:
        if h is None:
            h = random.getrandbits(64)
        if exclude:
            if index is not None:
                exclude = {index.index(e) for e in exclude if e in index}
            i = pick_excluding(table, h, exclude)
        else:
            i = table.pick(h, 0)
        return i if index is None else index[i]

    # === breakers (limits shared by all workers) ===

    def try_request(self) -> bool:
        if breaker.try_acquire(self.row.rq_active, self.limits.max_requests):
            return True
        self.stats.inc(L.W_UPSTREAM_RQ_ACTIVE_OVERFLOW)
        return False

    def end_request(self) -> None:
        breaker.release(self.row.rq_active)

    def try_retry(self) -> bool:
        if breaker.try_acquire(self.row.rq_retry_active, self.limits.max_retries):
            return True
        return False

    def end_retry(self) -> None:
        breaker.release(self.row.rq_retry_active)

    def try_connection(self) -> bool:
        if breaker.try_acquire(self.row.cx_active, self.limits.max_connections):
            return True
        self.stats.inc(L.W_UPSTREAM_CX_OVERFLOW)
        return False

    async def wait_pending(self, ep: int, checkout):
        """Wait as a pending request for a connection to `ep`: an idle one of this worker, or
        room under the shared connection limit. Returns a pooled connection, True (open a new
        one; the limit unit is held), or None (pending overflow: reply 503 UO at once)."""
        if not breaker.try_acquire(self.row.rq_pending, self.limits.max_pending_requests):
            self.stats.inc(L.W_UPSTREAM_RQ_PENDING_OVERFLOW)
            return None
        self.stats.inc(L.W_UPSTREAM_RQ_PENDING_TOTAL)
        try:
            while True:
                with trio.move_on_after(PENDING_POLL):
                    await self.conn_freed.wait()
                conn = checkout(self, ep)
                if conn is not None:
                    return conn
                if breaker.try_acquire(self.row.cx_active, self.limits.max_connections):
                    return True
        finally:
            breaker.release(self.row.rq_pending)

    def should_close_idle(self) -> bool:
        """With requests pending anywhere and the connection limit reached, an idle connection
        would starve them (it may belong to another worker's pool): close it instead."""
        return self.limited_cx and self.row.rq_pending.load() > 0

    # === hooks from the I/O shell ===

    def on_open(self, ep: int) -> None:
        self.stats.inc(L.W_UPSTREAM_CX_TOTAL)

    def on_close(self, ep: int) -> None:
        """A connection that held a unit of the shared connection gauge closed."""
        breaker.release(self.row.cx_active)
        self._wake()

    def on_idle(self, ep: int) -> None:
        self._wake()

    def _wake(self) -> None:
        if self.limited_cx:
            self.conn_freed.set()
            self.conn_freed = trio.Event()

    def on_result(self, ep: int, outcome) -> None:
        """One attempt on endpoint `ep` ended with `outcome` (meshcore.policy.classify)."""
        stats = self.stats
        if outcome.kind is Kind.RESPONSE:
            stats.inc(L.W_UPSTREAM_RQ_TOTAL)
            stats.inc(L.W_UPSTREAM_RQ_COMPLETED)
            cls = _STATUS_CLASS.get(outcome.status // 100)
            if cls is not None:
                stats.inc(cls)
        elif outcome.kind is not Kind.OVERFLOW:
            stat = _FAILURE_STAT.get(outcome.kind)
            if stat is not None:
                stats.inc(stat)
        if self.outlier.enabled and ep >= 0:
            o = outcome_from_classified(outcome)
            if o is not None:
                outlier.on_result(self.hosts[ep], self.row, o, now_ms(), self.outlier, self.n,
                                  random.getrandbits(32) % 100)


def rebuild(old: dict[str, ClusterState], clusters: dict[str, ClusterPolicy], slots: dict,
            rng: random.Random, segment, worker: int) -> tuple[dict[str, ClusterState], list]:
    """New cluster states for a snapshot, reusing unchanged ones.

    Returns (states, idle connections of dropped or changed clusters, to be closed).
    """
    states: dict[str, ClusterState] = {}
    to_close: list = []
    for name, policy in clusters.items():
        prev = old.get(name)
        if prev is not None and prev.policy == policy and prev.slots == slots[name]:
            states[name] = prev
        else:
            states[name] = ClusterState(policy, rng, segment, worker, slots[name])
    for name, prev in old.items():
        if states.get(name) is not prev:
            to_close.extend((prev, conn) for conn in prev.book.drain_all())
    return states, to_close
