"""Which shared-memory rows belong to which cluster and host (T1: no I/O).

The supervisor allocates slots when a config is accepted and sends the map with it, so every
worker agrees on the rows. A (cluster, endpoint) pair keeps its host slot across reloads, so
ejections and counters survive an unrelated config change. A slot freed by a reload is held back
for one generation (workers still on the old config may write to it until they swap), then
cleared before it is handed out again.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class SlotsExhausted(ValueError):
    pass


@dataclass
class SlotAllocator:
    max_clusters: int
    max_hosts: int
    clusters: dict = field(default_factory=dict)  # cluster name -> slot
    hosts: dict = field(default_factory=dict)  # (cluster name, endpoint key) -> slot
    _held_clusters: set = field(default_factory=set)
    _held_hosts: set = field(default_factory=set)

    def allocate(self, snapshot) -> tuple[dict, list[int], list[int]]:
        """Slots for `snapshot`: ({cluster: (slot, (host slot per endpoint...))}, new cluster
        slots, new host slots). New slots must be cleared before the map is published.
        Raises SlotsExhausted when the segment is too small (the config is then rejected)."""
        want_c = set(snapshot.clusters)
        want_h = {(name, ep.key) for name, c in snapshot.clusters.items() for ep in c.endpoints}
        keep_c = {k: v for k, v in self.clusters.items() if k in want_c}
        keep_h = {k: v for k, v in self.hosts.items() if k in want_h}
        freed_c = set(self.clusters.values()) - set(keep_c.values())
        freed_h = set(self.hosts.values()) - set(keep_h.values())
        free_c = iter(sorted(set(range(self.max_clusters)) - set(keep_c.values()) - self._held_clusters))
        free_h = iter(sorted(set(range(self.max_hosts)) - set(keep_h.values()) - self._held_hosts))
        new_c, new_h = [], []
        try:
            for name in sorted(want_c - set(keep_c)):
                keep_c[name] = next(free_c)
                new_c.append(keep_c[name])
            for key in sorted(want_h - set(keep_h)):
                keep_h[key] = next(free_h)
                new_h.append(keep_h[key])
        except StopIteration:
            raise SlotsExhausted(
                f"the config needs {len(want_c)} clusters and {len(want_h)} cluster hosts; the "
                f"shared-memory segment holds {self.max_clusters} and {self.max_hosts}") from None
        self.clusters, self.hosts = keep_c, keep_h
        self._held_clusters, self._held_hosts = freed_c, freed_h
        mapping = {name: (keep_c[name], tuple(keep_h[(name, ep.key)] for ep in c.endpoints))
                   for name, c in snapshot.clusters.items()}
        return mapping, new_c, new_h
