"""A worker's metric writes: the thin calls the I/O shell makes (T1 over shared-memory cells).

Rules of this module:

* `WorkerMetrics` is created once per worker process and holds only offsets into the segment;
  every method is a few single-writer `incr64` adds on this worker's own rows (no lock, no dict
  built per call). The compiled event loop ports `host_attempt` and
  meshcore.metrics.istio.record cell for cell.
* The shell calls:
  - `request_done(rec, clusters)` once per finished request, next to the access log (Istio
    metrics; the cluster's final-response counters, `charge_final`; its upstream_rq_time
    histogram when an upstream answered);
  - `attempt_done(host_slot, outcome, reused)` once per upstream attempt that picked a host
    (Envoy's per-host counters behind admin `/clusters`);
  - `downstream_open()` / `downstream_close()` per client connection (listener stats).
* Per-host counters follow Envoy's router and pools: an attempt that opened a connection adds
  cx_total (and cx_connect_fail when the connect failed or timed out); an attempt that reached a
  connection adds rq_total and then rq_success (a response below 500), rq_error (a 5xx response,
  a reset or a protocol error) or rq_timeout (per-try timeout). Circuit-breaker overflow touches
  no host.
"""
from __future__ import annotations

from meshcore.metrics.istio import IstioWriter, flags_mask, hist_record
from meshcore.policy.classify import Kind
from meshcore.shm.layout import (
    CLUSTER_HIST_ROW_SIZE,
    W_INDEX,
    W_UPSTREAM_RQ_COMPLETED,
    H_DEST_ID,
    HOST_STATS,
    HOST_STATS_ROW_SIZE,
    HS_CX_CONNECT_FAIL,
    HS_CX_TOTAL,
    HS_RQ_ERROR,
    HS_RQ_SUCCESS,
    HS_RQ_TIMEOUT,
    HS_RQ_TOTAL,
)

__all__ = ["WorkerMetrics", "NullMetrics", "worker_metrics", "host_attempt", "host_stats",
           "charge_final"]

_CLASS_STAT = (None,) + tuple(W_INDEX[f"upstream_rq_{c}xx"] for c in range(1, 6))


def charge_final(stats, status: int) -> None:
    """Envoy's chargeUpstreamCode: the final response of a request routed to a cluster (an
    upstream's, or the router's own local reply: UH, UO, UF, UT ...) counts once in
    upstream_rq_completed and upstream_rq_<N>xx; retried attempts do not."""
    if 100 <= status <= 599:
        stats.inc(W_UPSTREAM_RQ_COMPLETED)
        stats.inc(_CLASS_STAT[status // 100])

_CONNECT_FAILED = (Kind.CONNECT_FAILURE, Kind.CONNECT_TIMEOUT)


def host_attempt(cells, off: int, kind, status: int, reused: bool) -> None:
    """Count one attempt in a worker's host stats row at `off` (see the module rules)."""
    if kind is Kind.OVERFLOW:
        return
    inc = cells.incr64
    if not reused:
        inc(off + 8 * HS_CX_TOTAL, 1)
    if kind is Kind.RESPONSE:
        inc(off + 8 * HS_RQ_TOTAL, 1)
        inc(off + 8 * (HS_RQ_ERROR if status >= 500 else HS_RQ_SUCCESS), 1)
    elif kind in _CONNECT_FAILED:
        inc(off + 8 * HS_CX_CONNECT_FAIL, 1)
    elif kind is Kind.PER_TRY_TIMEOUT:
        inc(off + 8 * HS_RQ_TOTAL, 1)
        inc(off + 8 * HS_RQ_TIMEOUT, 1)
    else:  # reset before a response, protocol error
        inc(off + 8 * HS_RQ_TOTAL, 1)
        inc(off + 8 * HS_RQ_ERROR, 1)


def host_stats(cells, layout, host_slot: int) -> dict[str, int]:
    """One host's counters summed over workers (admin /clusters)."""
    sums = [0] * len(HOST_STATS)
    for w in range(layout.workers):
        off = layout.host_stats_off(w, host_slot)
        for i in range(len(HOST_STATS)):
            sums[i] += cells.load64(off + 8 * i)
    return dict(zip(HOST_STATS, sums))


class WorkerMetrics:
    __slots__ = ("cells", "istio", "host_base", "hist_base")

    def __init__(self, segment, worker: int):
        layout = segment.layout
        self.cells = segment.cells
        self.istio = IstioWriter(self.cells, layout, worker)
        self.host_base = layout.host_stats_base + worker * layout.host_stats_block
        self.hist_base = layout.cluster_hist_base + worker * layout.cluster_hist_block

    def request_done(self, rec, clusters) -> None:
        """One finished request (`rec`: the proxy's RequestRecord; `clusters`: the worker's
        cluster states by name, for a request that reached no host)."""
        row = rec.host_row
        state = clusters.get(rec.cluster) if rec.cluster is not None else None
        if row is None and state is not None:
            row = state.row
        dest = self.cells.load32(row.off + H_DEST_ID) if row is not None else 0
        if state is not None:
            charge_final(state.stats, rec.status)
        if state is not None and rec.upstream_service_time is not None:
            # Envoy's upstream_rq_time: router start to the upstream response (retries included)
            hist_record(self.cells, self.hist_base + state.row.slot * CLUSTER_HIST_ROW_SIZE,
                        rec.upstream_service_time)
        head = rec.head
        self.istio.record(dest, rec.status, flags_mask(rec.flags), rec.duration_ms,
                          head.end + rec.bytes_received, rec.bytes_sent)

    def attempt_done(self, host_slot: int, outcome, reused: bool) -> None:
        host_attempt(self.cells, self.host_base + host_slot * HOST_STATS_ROW_SIZE, outcome.kind,
                     outcome.status, reused)

    def downstream_open(self) -> None:
        self.istio.downstream_open()

    def downstream_close(self) -> None:
        self.istio.downstream_close()


class NullMetrics:
    """Records nothing: MESHCORE_METRICS=off, a developer aid to measure what recording costs
    (Envoy cluster counters kept by the cores still count; the Istio metrics, per-host counters,
    final-response charges and upstream_rq_time stay empty)."""

    __slots__ = ()

    def request_done(self, rec, clusters) -> None:
        pass

    def attempt_done(self, host_slot: int, outcome, reused: bool) -> None:
        pass

    def downstream_open(self) -> None:
        pass

    def downstream_close(self) -> None:
        pass


def worker_metrics(segment, worker: int, environ=None):
    """The worker's recorder; NullMetrics when `environ["MESHCORE_METRICS"] == "off"`."""
    if (environ or {}).get("MESHCORE_METRICS") == "off":
        return NullMetrics()
    return WorkerMetrics(segment, worker)
