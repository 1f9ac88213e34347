"""Per-worker mutable state of one cluster: its pool bookkeeping and its balancer.

Built from an immutable `ClusterPolicy`; rebuilt only when that policy changes on reload, so a
reload that leaves a cluster alone keeps its warm connections.
"""
from __future__ import annotations

import math
import random

from meshcore.config.policy import ClusterPolicy
from meshcore.upstream.balancer import make_balancer
from meshcore.upstream.pool import PoolBook

MAX_IDLE_PER_ENDPOINT = 64


class ClusterState:
    __slots__ = ("policy", "endpoints", "book", "balancer", "idle_timeout")

    def __init__(self, policy: ClusterPolicy, rng: random.Random):
        self.policy = policy
        self.endpoints = policy.endpoints
        # Istio/Envoy: an idle timeout of 0 disables it.
        self.idle_timeout = policy.idle_timeout or math.inf
        self.book = PoolBook(len(policy.endpoints), MAX_IDLE_PER_ENDPOINT)
        self.balancer = (make_balancer(policy.lb, [e.weight for e in policy.endpoints], rng)
                         if policy.endpoints else None)

    # Hooks the I/O shell calls; stats, outlier detection and breakers hang off them.
    def on_open(self, ep: int) -> None:
        """A new upstream connection to endpoint `ep` was established."""

    def on_idle(self, ep: int) -> None:
        """A connection of endpoint `ep` went back to the idle pool."""

    def on_result(self, ep: int, outcome) -> None:
        """One attempt on endpoint `ep` ended with `outcome` (meshcore.policy.classify)."""


def rebuild(old: dict[str, ClusterState], clusters: dict[str, ClusterPolicy],
            rng: random.Random) -> tuple[dict[str, ClusterState], list]:
    """New cluster states for a snapshot, reusing unchanged ones.

    Returns (states, idle connections of dropped or changed clusters, to be closed).
    """
    states: dict[str, ClusterState] = {}
    to_close: list = []
    for name, policy in clusters.items():
        prev = old.get(name)
        if prev is not None and prev.policy == policy:
            states[name] = prev
        else:
            states[name] = ClusterState(policy, rng)
    for name, prev in old.items():
        if states.get(name) is not prev:
            to_close.extend(prev.book.drain_all())
    return states, to_close
