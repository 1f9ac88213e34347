"""Envoy's cluster, listener, http and server stats as one list (T1: reads cells, no I/O).

Rules of this module:

* A `Stat` has Envoy's dotted name (what admin `/stats` prints), its value, its kind ("counter" or
  "gauge"), and its Prometheus family and tags as Envoy's tag extraction gives them, with Istio's
  bootstrap tag for clusters (`cluster_name`, as on an Istio sidecar; plain Envoy writes
  `envoy_cluster_name`): `cluster.<c>.upstream_rq_2xx` ->
  `envoy_cluster_upstream_rq_xx{envoy_response_code_class="2",cluster_name="<c>"}`.
* Cluster stats come from meshcore.stats_render.cluster_stats; listener and http connection
  manager stats from the workers' Istio blocks (downstream connections, and the response code
  classes of the requests recorded there, and the connections closed at accept:
  `downstream_global_cx_overflow`); server stats from what the supervisor knows.
* `/reset_counters` is a baseline, not a store: `Baseline.reset(stats)` remembers every counter's
  value and later reads subtract it (never below 0). Workers are the only writers of their cells,
  so zeroing them from the supervisor could lose a concurrent add; a baseline cannot. Gauges are
  never reset, as in Envoy.
* `select(stats, regex, used_only)`: admin `filter=` (a Python `re` search on the name, as Envoy's
  RE2 partial match) and `usedonly` (here: a non-zero value; meshcore keeps no "written" bit).
"""
from __future__ import annotations

import re
from typing import NamedTuple

from meshcore.metrics.istio import accept_overflow_total, collect
from meshcore.stats_render import StatsCluster, cluster_stats

__all__ = ["Stat", "Baseline", "collect_stats", "select", "render_text", "render_json",
           "listener_prefix", "SERVER_STATES"]

_GAUGES = frozenset((
    "upstream_cx_active", "upstream_rq_pending_active", "upstream_rq_active",
    "outlier_detection.ejections_active", "membership_total", "membership_healthy",
))
SERVER_STATES = {"LIVE": 0, "DRAINING": 1, "PRE_INITIALIZING": 2, "INITIALIZING": 3}


class Stat(NamedTuple):
    name: str
    value: int
    kind: str                    # "counter" | "gauge"
    family: str                  # Prometheus metric name
    tags: tuple = ()             # ((label, value), ...) in Envoy's order


def _cluster_stat(cluster: str, stat: str, value: int) -> Stat:
    kind = "gauge" if stat in _GAUGES or stat.startswith("circuit_breakers.") else "counter"
    tags = (("cluster_name", cluster),)
    family = "envoy_cluster_" + stat.replace(".", "_")
    if stat.startswith("upstream_rq_") and stat.endswith("xx") and stat[12:13].isdigit() \
            and len(stat) == 15:
        family = "envoy_cluster_upstream_rq_xx"
        tags = (("envoy_response_code_class", stat[12]),) + tags
    return Stat(f"cluster.{cluster}.{stat}", value, kind, family, tags)


def listener_prefix(listen: tuple[str, int]) -> tuple[str, str]:
    """(listener stat address, http conn manager prefix) of the proxy listener: Envoy writes
    `127.0.0.1_15001`; Istio names the outbound HCM prefix `outbound_<address>_<port>`."""
    host, port = listen
    addr = f"{host}_{port}"
    return addr, f"outbound_{addr}"


def collect_stats(cells, layout, clusters, now_ms: int, *, listen=("0.0.0.0", 15001),
                  state: str = "LIVE", uptime_s: int = 0, concurrency: int = 1,
                  memory_bytes: int = 0, istio=None) -> list[Stat]:
    """Every stat, unsorted. `clusters`: StatsCluster tuples; `istio`: a `collect()` result to
    reuse (read here when None)."""
    out: list[Stat] = []
    for cl in clusters:
        cl = cl if isinstance(cl, StatsCluster) else StatsCluster(*cl)
        for stat, value in cluster_stats(cells, layout, cl, now_ms).items():
            out.append(_cluster_stat(cl.name, stat, value))

    series, _overflow, cx_total, cx_active = istio if istio is not None else collect(cells, layout)
    classes = [0] * 6
    total = 0
    for key, s in series.items():
        code = key & 0x3FF
        classes[code // 100 if code < 600 else 0] += s.requests
        total += s.requests
    addr, prefix = listener_prefix(listen)
    lt = (("envoy_listener_address", addr),)
    out.append(Stat(f"listener.{addr}.downstream_cx_total", cx_total, "counter",
                    "envoy_listener_downstream_cx_total", lt))
    out.append(Stat(f"listener.{addr}.downstream_cx_active", cx_active, "gauge",
                    "envoy_listener_downstream_cx_active", lt))
    # Envoy's overload-manager connection limit counter; here also accepts refused for lack of
    # descriptors (both close the new connection at once)
    out.append(Stat(f"listener.{addr}.downstream_global_cx_overflow",
                    accept_overflow_total(cells, layout), "counter",
                    "envoy_listener_downstream_global_cx_overflow", lt))
    ht = (("envoy_http_conn_manager_prefix", prefix),)
    out.append(Stat(f"http.{prefix}.downstream_cx_total", cx_total, "counter",
                    "envoy_http_downstream_cx_total", ht))
    out.append(Stat(f"http.{prefix}.downstream_cx_active", cx_active, "gauge",
                    "envoy_http_downstream_cx_active", ht))
    out.append(Stat(f"http.{prefix}.downstream_rq_total", total, "counter",
                    "envoy_http_downstream_rq_total", ht))
    out.append(Stat(f"http.{prefix}.downstream_rq_completed", total, "counter",
                    "envoy_http_downstream_rq_completed", ht))
    for c in range(1, 6):
        out.append(Stat(f"http.{prefix}.downstream_rq_{c}xx", classes[c], "counter",
                        "envoy_http_downstream_rq_xx",
                        (("envoy_response_code_class", str(c)),) + ht))

    def server(stat, value):
        out.append(Stat(f"server.{stat}", value, "gauge", f"envoy_server_{stat}", ()))

    server("live", int(state == "LIVE"))
    server("state", SERVER_STATES.get(state, 3))
    server("uptime", uptime_s)
    server("concurrency", concurrency)
    server("total_connections", cx_active)
    server("memory_physical_size", memory_bytes)
    server("hot_restart_epoch", 0)
    out.append(Stat("cluster_manager.active_clusters", len(clusters), "gauge",
                    "envoy_cluster_manager_active_clusters", ()))
    out.append(Stat("listener_manager.total_listeners_active", 1, "gauge",
                    "envoy_listener_manager_total_listeners_active", ()))
    return out


class Baseline:
    """Counter values at the last `/reset_counters` (see the module rules)."""

    def __init__(self):
        self.values: dict[str, int] = {}

    def reset(self, stats) -> None:
        self.values = {s.name: s.value for s in stats if s.kind == "counter"}

    def apply(self, stats) -> list[Stat]:
        if not self.values:
            return list(stats)
        get = self.values.get
        return [s._replace(value=max(0, s.value - get(s.name, 0))) if s.kind == "counter" else s
                for s in stats]


def select(stats, regex: str | None = None, used_only: bool = False) -> list[Stat]:
    """Admin filters. Raises re.error for a bad regex (the admin answers 400)."""
    if regex:
        pattern = re.compile(regex)
        stats = [s for s in stats if pattern.search(s.name)]
    if used_only:
        stats = [s for s in stats if s.value]
    return list(stats)


def render_text(stats) -> str:
    """Envoy's `/stats` text: `name: value` lines sorted by name."""
    return "".join(f"{s.name}: {s.value}\n" for s in sorted(stats, key=lambda s: s.name))


def render_json(stats) -> dict:
    """Envoy's `/stats?format=json` shape: {"stats": [{"name", "value"}, ...]} sorted by name."""
    return {"stats": [{"name": s.name, "value": s.value}
                      for s in sorted(stats, key=lambda s: s.name)]}
