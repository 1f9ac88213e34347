"""Per-worker policy state of one cluster: balancer, hash tables, outlier and stats rows (sans-IO).

Built from an immutable `ClusterPolicy` plus the slots the supervisor assigned; rebuilt only when
either changes on reload (meshcore.io.dataplane), so a reload that leaves a cluster alone keeps
its warm connections. Outlier state and breaker gauges live in shared memory (all workers see
them at once); request and connection counters go to this worker's own stats row. The pool
(`book`, a PoolBook) belongs to the event loop's ClusterHandle; the least-request balancer reads
its per-endpoint active-request counts.
"""
from __future__ import annotations

import math
import random
import time

from meshcore.config.policy import ClusterPolicy
from meshcore.shm import layout as L
from meshcore.upstream import breaker, outlier
from meshcore.upstream.balancer import HOST_SELECTION_RETRY_MAX_ATTEMPTS, make_cluster_balancer
from meshcore.upstream.pool import PoolBook

MAX_IDLE_PER_ENDPOINT = 64



def now_ms() -> int:
    """Milliseconds on CLOCK_MONOTONIC: one clock for every process sharing the segment."""
    return int(time.monotonic() * 1000)


class ClusterState:
    __slots__ = ("policy", "slots", "endpoints", "book", "balancer", "idle_timeout", "row",
                 "held", "hosts", "stats", "outlier", "limits", "n", "table", "handle", "_tables")

    def __init__(self, policy: ClusterPolicy, rng: random.Random, segment, worker: int, slots,
                 book=None):
        self.policy = policy
        self.slots = slots
        self.endpoints = policy.endpoints
        self.n = len(policy.endpoints)
        # Istio/Envoy: an idle timeout of 0 disables it.
        self.idle_timeout = policy.idle_timeout or math.inf
        self.book = book if book is not None else PoolBook(self.n, MAX_IDLE_PER_ENDPOINT)
        self.handle = None  # the event loop's ClusterHandle (set by meshcore.io.dataplane)
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
        cslot, hslots = slots
        self.row = segment.cluster(cslot)
        self.held = segment.holdings(worker, cslot)  # this worker's units of the row's gauges
        self.hosts = [segment.host(s) for s in hslots]
        self.stats = segment.worker_stats(worker, cslot)

    # === host choice ===

    def pick(self, exclude, h=None, attempts: int = -1) -> int:
        """An endpoint index for the next attempt, or -1 when no host may be picked (UH).

        Ejected hosts are skipped unless the cluster is in panic; `exclude` (hosts already
        tried) is a preference, as Envoy's previous_hosts predicate is, re-picked away from up to
        `attempts` more times (the route's host_selection_retry_max_attempts; -1: Istio's 5).
        `h` is the request's consistent-hash value (None: no key, a random one), used by
        ring/Maglev clusters.
        """
        if self.row.ejections_active.load() == 0:  # the common case: nobody ejected
            if self.table is not None:
                return self._pick_hashed(self.table, None, h, exclude, attempts)
            return self.balancer.pick(self.book, exclude, attempts)
        healthy, panic = outlier.healthy_set_or_panic(
            outlier.availability(self.hosts, now_ms()), self.outlier.healthy_panic_threshold)
        if panic:
            self.stats.inc(L.W_LB_HEALTHY_PANIC)
            if self.table is not None:
                return self._pick_hashed(self.table, None, h, exclude, attempts)
            return self.balancer.pick(self.book, exclude, attempts)
        if not healthy:
            self.stats.inc(L.W_UPSTREAM_CX_NONE_HEALTHY)
            return -1
        if self.table is not None:
            # Envoy builds the table over the healthy hosts: a key moves only while its host is
            # out, and comes back after.
            if len(healthy) == self.n:
                return self._pick_hashed(self.table, None, h, exclude, attempts)
            table, index = self._healthy_table(healthy)
            return self._pick_hashed(table, index, h, exclude, attempts)
        if len(healthy) == self.n:
            return self.balancer.pick(self.book, exclude, attempts)
        pick_healthy = getattr(self.balancer, "pick_healthy", None)
        if pick_healthy is not None:  # locality priorities: Envoy's spill-over to lower priorities
            return pick_healthy(self.book, exclude, healthy)
        ok = set(healthy)
        avoid = ok.difference(exclude) if exclude else ok
        for _ in range(2 * self.n):  # the balancer's own order, restricted to healthy hosts
            ep = self.balancer.pick(self.book, exclude, attempts)
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
    def _pick_hashed(table, index, h, exclude, attempts=-1) -> int:
        if h is None:
            h = random.getrandbits(64)
        if exclude:
            if index is not None:
                exclude = {index.index(e) for e in exclude if e in index}
            # imported here: workers without consistent hashing never load the ring (1 MB RSS)
            from meshcore.upstream.ring import pick_excluding
            i = pick_excluding(table, h, exclude,
                               HOST_SELECTION_RETRY_MAX_ATTEMPTS if attempts < 0 else attempts)
        else:
            i = table.pick(h, 0)
        return i if index is None else index[i]

    # === breakers (limits shared by all workers) ===
    # The per-attempt units (rq_active, cx_active, rq_pending) are taken and given back by the
    # event loop in C (ext/loop.pyx ClusterHandle, the same rules as meshcore.upstream.breaker);
    # the retry budget is taken here, by the retry policy on the failure path.

    def try_retry(self) -> bool:
        return breaker.try_acquire(self.row.rq_retry_active, self.limits.max_retries,
                                   self.held.rq_retry_active)

    def end_retry(self) -> None:
        breaker.release(self.row.rq_retry_active, self.held.rq_retry_active)

    def on_result(self, ep: int, outcome) -> None:
        """One attempt on endpoint `ep` ended with `outcome` (meshcore.policy.classify): its
        counters and its outlier report, both read off the classifier's table."""
        if outcome.stat >= 0:
            self.stats.inc(outcome.stat)
        if self.outlier.enabled and ep >= 0 and outcome.outlier is not None:
            outlier.on_result(self.hosts[ep], self.row, outcome.outlier, now_ms(), self.outlier,
                              self.n, random.getrandbits(32) % 100)
