"""Byte layout of the shared-memory segment, and small views that name its cells (no I/O).

Rules of this module:

* One segment per supervisor, sized from `(max_hosts, max_clusters, workers)`:

      [header 64 B][host rows: max_hosts x 64 B][cluster rows: max_clusters x 64 B]
      [worker stats: workers x max_clusters x WORKER_ROW_SIZE (256 B)]
      [worker host stats: workers x max_hosts x HOST_STATS_ROW_SIZE (64 B)]
      [worker Istio metrics: workers x (64 B block header + istio_rows x ISTIO_ROW_SIZE (512 B))]
      [worker cluster histograms: workers x max_clusters x CLUSTER_HIST_ROW_SIZE (192 B)]
      [worker breaker holdings: workers x max_clusters x HOLDINGS_ROW_SIZE (64 B)]

  Every region and every row starts on a 64-byte boundary (one cache line), so no two rows share a
  line: a host row, a cluster row and each worker's stats row never false-share.
* Host rows (one per endpoint slot, written by every worker): outlier state and counters, plus
  `rq_active` / `cx_active` shared for least-request balancing across workers. The state word is a
  uint64: 0 = ACTIVE, otherwise the host is EJECTED until that monotonic millisecond, so one CAS
  ejects and publishes the end time together. All other host cells are uint32.
  `consecutive_5xx` and `consecutive_gateway` sit in one aligned 8-byte word so a success can test
  and clear both with one 64-bit load and, rarely, one store.
* Times are monotonic milliseconds (time.monotonic() * 1000, CLOCK_MONOTONIC: the same clock in
  every process on the machine).
* Cluster rows (one per cluster slot, written by every worker with atomic adds): the
  circuit-breaker gauges shared by all workers and the outlier-detection stats. `ejections_active`
  is both Envoy's gauge and the guard that enforces maxEjectionPercent across workers.
* Worker stats rows (one per worker per cluster): uint64 Envoy cluster counters. Each worker
  writes only its own rows (single writer: `Cells.incr64`, no lock, no LOCK prefix); `/stats`
  sums them across workers.
* Worker host stats rows (one per worker per host slot, single writer): Envoy's per-host counters
  shown by admin `/clusters` (cx_total, cx_connect_fail, rq_total, rq_success, rq_error,
  rq_timeout), summed over workers.
* Worker Istio metrics blocks (one per worker, single writer; meshcore.metrics.istio owns their
  meaning): a 64-byte block header (rows in use, overflow count, downstream connection counters)
  and `istio_rows` rows of uint64 cells, each keyed by one bounded label set (destination id,
  response code, response flags) and holding the request count and the three Istio histograms.
  The last row is the overflow row.
* Worker cluster histogram rows (one per worker per cluster, single writer): Envoy's
  `upstream_rq_time` histogram (meshcore.metrics.istio's bucket bounds and cell order: bucket
  counts, sum, count).
* Worker breaker holdings rows (one per worker per cluster, written by that worker only while it
  runs): how many units of each cluster-row breaker gauge (cx_active, rq_pending, rq_active,
  rq_retry_active, at the same byte offsets as in the cluster row) this worker holds. A worker
  counts a unit here before it takes it from the cluster row and after it gives it back, so a
  row never shows less than the worker holds. When a worker dies, the supervisor subtracts its
  row from the cluster gauges and zeroes it (meshcore.upstream.breaker.return_holdings), so the
  limits stay exact after any crash.
* `H_DEST_ID` / `C_DEST_ID` (the same byte offset 60 in host and cluster rows): the Istio
  destination label-set id of the host (or of the cluster, for requests that never reached a
  host), written by the supervisor when it publishes a config (meshcore.metrics.labels).
* Stat names are Envoy's spelling, each listed once in a tuple; a stat's index in its tuple is its
  cell index in the row. The `W_*` / `C_*` / `H_*` constants are those indexes or byte offsets.
* Views (`HostRow`, `ClusterRow`, `WorkerStatsRow`, `Cell`) only hold `(cells, off)`; `cells` is an
  atomics `Cells` (compiled or pure) over the segment buffer, or over a bytearray in tests. Cores
  (`upstream.outlier`, `upstream.breaker`) read `cells`/`off` and call `Cells` methods directly.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

__all__ = [
    "MAGIC", "VERSION", "CACHE_LINE", "HEADER_SIZE", "HOST_ROW_SIZE", "CLUSTER_ROW_SIZE",
    "WORKER_ROW_SIZE", "HEADER_FIELDS", "HOST_FIELDS", "CLUSTER_FIELDS", "CLUSTER_GAUGES",
    "OUTLIER_STATS", "WORKER_CLUSTER_COUNTERS", "W_INDEX", "ACTIVE", "EJECTED",
    "Layout", "LayoutError", "Cell", "HostRow", "ClusterRow", "WorkerStatsRow",
    "HOST_STATS", "HOST_STATS_ROW_SIZE", "ISTIO_ROWS", "ISTIO_ROW_SIZE", "ISTIO_BLOCK_HEADER",
    "H_DEST_ID", "C_DEST_ID", "CLUSTER_HIST_ROW_SIZE", "HOLDINGS_ROW_SIZE",
]

CACHE_LINE = 64
MAGIC = int.from_bytes(b"meshcore", "little")
VERSION = 3  # 2: host stats and Istio metrics regions, istio_rows in the header; 3: holdings

# ------------------------------------------------------------------------------------------------
# Header (64 bytes): (name, byte offset, struct format)

HEADER_SIZE = 64
HEADER_FIELDS = (
    ("magic", 0, "Q"),
    ("version", 8, "I"),
    ("header_size", 12, "I"),
    ("generation", 16, "Q"),        # config generation, written by the supervisor
    ("max_hosts", 24, "I"),
    ("max_clusters", 28, "I"),
    ("workers", 32, "I"),
    ("worker_row_size", 36, "I"),
    ("total_size", 40, "Q"),
    ("istio_rows", 48, "I"),        # rows per worker in the Istio metrics block (version 2)
    # 52..63 reserved
)
HDR_GENERATION = 16
_HDR = struct.Struct("<QIIQIIIIQ")  # the fields above in order, little-endian, no padding
assert _HDR.size == 48
_HDR_V2 = struct.Struct("<I")  # istio_rows at offset 48

# ------------------------------------------------------------------------------------------------
# Host row (64 bytes): byte offsets

HOST_ROW_SIZE = 64
ACTIVE = 0      # state() values; the state word itself is 0 (ACTIVE) or ejected_until_ms
EJECTED = 1

H_STATE = 0                     # u64 state word: 0 = ACTIVE, otherwise EJECTED and the value is
H_EJECTED_UNTIL_MS = 0          #     the monotonic ms when the ejection ends (one CAS publishes
                                #     both; a reader needs one load)
H_CONSECUTIVE_5XX = 8           # u32 \ one aligned 8-byte word: a success tests both with one
H_CONSECUTIVE_GATEWAY = 12      # u32 / 64-bit load and clears both with one 64-bit store
H_CONSECUTIVE_LOCAL_ORIGIN = 16  # u32 (split mode only)
H_N_EJECTIONS = 20              # u32 Envoy's eject-time backoff multiplier (+1 per ejection,
                                #     -1 per sweep while healthy)
H_RQ_ACTIVE = 24                # u32 active requests to this host, all workers (least request)
H_CX_ACTIVE = 28                # u32 open connections to this host, all workers
H_EJECTIONS_TOTAL = 32          # u32 times this host was ejected (admin/debug)
# 36..59 reserved
H_DEST_ID = 60                  # u32 Istio destination label-set id (supervisor writes it)

HOST_FIELDS = (                 # (name, byte offset, size)
    ("ejected_until_ms", H_EJECTED_UNTIL_MS, 8),
    ("consecutive_5xx", H_CONSECUTIVE_5XX, 4),
    ("consecutive_gateway", H_CONSECUTIVE_GATEWAY, 4),
    ("consecutive_local_origin", H_CONSECUTIVE_LOCAL_ORIGIN, 4),
    ("n_ejections", H_N_EJECTIONS, 4),
    ("rq_active", H_RQ_ACTIVE, 4),
    ("cx_active", H_CX_ACTIVE, 4),
    ("ejections_total", H_EJECTIONS_TOTAL, 4),
    ("dest_id", H_DEST_ID, 4),
)

# ------------------------------------------------------------------------------------------------
# Cluster row (64 bytes = 16 uint32 cells). Index i is at byte offset 4*i.

CLUSTER_ROW_SIZE = 64
CLUSTER_GAUGES = (          # shared circuit-breaker resources (gauges, +1 / -1)
    "cx_active",            # -> upstream_cx_active
    "rq_pending",           # -> upstream_rq_pending_active
    "rq_active",            # -> upstream_rq_active
    "rq_retry_active",      # retries in flight (shown only as circuit_breakers...rq_retry_open)
)
OUTLIER_STATS = (           # cluster.<name>.outlier_detection.<stat>
    "ejections_active",     # gauge; also the cross-worker maxEjectionPercent guard
    "ejections_enforced_total",
    "ejections_overflow",
    "ejections_enforced_consecutive_5xx",
    "ejections_enforced_consecutive_gateway_failure",
    "ejections_enforced_consecutive_local_origin_failure",
    "ejections_detected_consecutive_5xx",
    "ejections_detected_consecutive_gateway_failure",
    "ejections_detected_consecutive_local_origin_failure",
    "ejections_total",              # deprecated (Envoy still emits it)
    "ejections_consecutive_5xx",    # deprecated (Envoy still emits it)
)
CLUSTER_FIELDS = CLUSTER_GAUGES + OUTLIER_STATS  # 15 of 16 cells; cell 15 is C_DEST_ID
assert len(CLUSTER_FIELDS) <= CLUSTER_ROW_SIZE // 4 - 1
C_DEST_ID = 60  # u32 Istio destination label-set id for requests that reached no host

C_CX_ACTIVE = 0
C_RQ_PENDING = 4
C_RQ_ACTIVE = 8
C_RQ_RETRY_ACTIVE = 12
C_EJECTIONS_ACTIVE = 16
C_EJECTIONS_ENFORCED_TOTAL = 20
C_EJECTIONS_OVERFLOW = 24
C_EJECTIONS_ENFORCED_CONSECUTIVE_5XX = 28
C_EJECTIONS_ENFORCED_CONSECUTIVE_GATEWAY_FAILURE = 32
C_EJECTIONS_ENFORCED_CONSECUTIVE_LOCAL_ORIGIN_FAILURE = 36
C_EJECTIONS_DETECTED_CONSECUTIVE_5XX = 40
C_EJECTIONS_DETECTED_CONSECUTIVE_GATEWAY_FAILURE = 44
C_EJECTIONS_DETECTED_CONSECUTIVE_LOCAL_ORIGIN_FAILURE = 48
C_EJECTIONS_TOTAL = 52
C_EJECTIONS_CONSECUTIVE_5XX = 56

# ------------------------------------------------------------------------------------------------
# Worker stats row: uint64 Envoy cluster counters (cluster.<name>.<stat>), summed over workers.

WORKER_CLUSTER_COUNTERS = (
    "upstream_cx_total",
    "upstream_cx_connect_fail",
    "upstream_cx_connect_timeout",
    "upstream_cx_overflow",
    "upstream_cx_none_healthy",
    "upstream_cx_rx_bytes_total",
    "upstream_cx_tx_bytes_total",
    "upstream_rq_total",
    "upstream_rq_completed",
    "upstream_rq_1xx",
    "upstream_rq_2xx",
    "upstream_rq_3xx",
    "upstream_rq_4xx",
    "upstream_rq_5xx",
    "upstream_rq_timeout",
    "upstream_rq_per_try_timeout",
    "upstream_rq_retry",
    "upstream_rq_retry_success",
    "upstream_rq_retry_overflow",
    "upstream_rq_retry_limit_exceeded",
    "upstream_rq_retry_backoff_exponential",
    "upstream_rq_pending_total",
    "upstream_rq_pending_overflow",
    "upstream_rq_pending_failure_eject",
    "upstream_rq_active_overflow",   # Envoy 1.40 (older Envoy counted these as pending_overflow)
    "upstream_rq_tx_reset",
    "upstream_rq_rx_reset",
    "upstream_rq_cancelled",
    "lb_healthy_panic",
    "retry_or_shadow_abandoned",     # a retry (or mirror) dropped: body over the buffer limit
)
W_INDEX = {name: i for i, name in enumerate(WORKER_CLUSTER_COUNTERS)}
WORKER_ROW_SIZE = -(-len(WORKER_CLUSTER_COUNTERS) * 8 // CACHE_LINE) * CACHE_LINE  # 256

W_UPSTREAM_CX_TOTAL = 0
W_UPSTREAM_CX_CONNECT_FAIL = 1
W_UPSTREAM_CX_CONNECT_TIMEOUT = 2
W_UPSTREAM_CX_OVERFLOW = 3
W_UPSTREAM_CX_NONE_HEALTHY = 4
W_UPSTREAM_CX_RX_BYTES_TOTAL = 5
W_UPSTREAM_CX_TX_BYTES_TOTAL = 6
W_UPSTREAM_RQ_TOTAL = 7
W_UPSTREAM_RQ_COMPLETED = 8
W_UPSTREAM_RQ_1XX = 9
W_UPSTREAM_RQ_2XX = 10
W_UPSTREAM_RQ_3XX = 11
W_UPSTREAM_RQ_4XX = 12
W_UPSTREAM_RQ_5XX = 13
W_UPSTREAM_RQ_TIMEOUT = 14
W_UPSTREAM_RQ_PER_TRY_TIMEOUT = 15
W_UPSTREAM_RQ_RETRY = 16
W_UPSTREAM_RQ_RETRY_SUCCESS = 17
W_UPSTREAM_RQ_RETRY_OVERFLOW = 18
W_UPSTREAM_RQ_RETRY_LIMIT_EXCEEDED = 19
W_UPSTREAM_RQ_RETRY_BACKOFF_EXPONENTIAL = 20
W_UPSTREAM_RQ_PENDING_TOTAL = 21
W_UPSTREAM_RQ_PENDING_OVERFLOW = 22
W_UPSTREAM_RQ_PENDING_FAILURE_EJECT = 23
W_UPSTREAM_RQ_ACTIVE_OVERFLOW = 24
W_UPSTREAM_RQ_TX_RESET = 25
W_UPSTREAM_RQ_RX_RESET = 26
W_UPSTREAM_RQ_CANCELLED = 27
W_LB_HEALTHY_PANIC = 28
W_RETRY_OR_SHADOW_ABANDONED = 29


# ------------------------------------------------------------------------------------------------
# Worker host stats row: uint64 per-host counters of one worker (admin /clusters), summed over
# workers. Index i is at byte offset 8*i.

HOST_STATS = (
    "cx_total",
    "cx_connect_fail",
    "rq_total",
    "rq_success",
    "rq_error",
    "rq_timeout",
)
HOST_STATS_ROW_SIZE = 64
HS_CX_TOTAL = 0
HS_CX_CONNECT_FAIL = 1
HS_RQ_TOTAL = 2
HS_RQ_SUCCESS = 3
HS_RQ_ERROR = 4
HS_RQ_TIMEOUT = 5
assert len(HOST_STATS) * 8 <= HOST_STATS_ROW_SIZE

# ------------------------------------------------------------------------------------------------
# Worker Istio metrics block: a 64-byte header, then `istio_rows` rows of ISTIO_ROW_SIZE bytes.
# Cell meanings are defined by meshcore.metrics.istio (the only module that reads or writes them).

ISTIO_BLOCK_HEADER = 64
ISTIO_ROW_SIZE = 512            # 64 uint64 cells
ISTIO_ROWS = 512                # default rows per worker (the last one is the overflow row)
CLUSTER_HIST_ROW_SIZE = 192     # 24 uint64 cells: 19 buckets, sum, count, 3 reserved
HOLDINGS_ROW_SIZE = 64          # uint32 cells at the cluster row's C_CX_ACTIVE..C_RQ_RETRY_ACTIVE


class LayoutError(ValueError):
    """The buffer does not hold a segment this code can read (magic, version or size mismatch)."""


def _round_up(n: int, to: int = CACHE_LINE) -> int:
    return -(-n // to) * to


@dataclass(frozen=True, slots=True)
class Layout:
    """Offsets of every row for a given geometry. Pure arithmetic; never touches memory."""

    max_hosts: int
    max_clusters: int
    workers: int
    worker_row_size: int = WORKER_ROW_SIZE
    istio_rows: int = ISTIO_ROWS
    host_base: int = field(init=False)
    cluster_base: int = field(init=False)
    worker_base: int = field(init=False)
    worker_block: int = field(init=False)   # bytes of one worker's stats (all its clusters)
    host_stats_base: int = field(init=False)
    host_stats_block: int = field(init=False)  # bytes of one worker's host stats (all hosts)
    istio_base: int = field(init=False)
    istio_block: int = field(init=False)    # bytes of one worker's Istio metrics block
    cluster_hist_base: int = field(init=False)
    cluster_hist_block: int = field(init=False)
    holdings_base: int = field(init=False)
    holdings_block: int = field(init=False)  # bytes of one worker's holdings (all its clusters)
    size: int = field(init=False)

    def __post_init__(self):
        for name in ("max_hosts", "max_clusters", "workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 0xFFFFFFFF:
                raise ValueError(f"{name} must be an int in 0..2^32-1, got {v!r}")
        wrs = self.worker_row_size
        if wrs < len(WORKER_CLUSTER_COUNTERS) * 8 or wrs % CACHE_LINE:
            raise ValueError(f"worker_row_size {wrs} must be a multiple of {CACHE_LINE} holding "
                             f"{len(WORKER_CLUSTER_COUNTERS)} counters")
        if not isinstance(self.istio_rows, int) or not 1 <= self.istio_rows <= 1 << 20:
            raise ValueError(f"istio_rows must be an int in 1..2^20, got {self.istio_rows!r}")
        host_base = HEADER_SIZE
        cluster_base = host_base + self.max_hosts * HOST_ROW_SIZE
        worker_base = _round_up(cluster_base + self.max_clusters * CLUSTER_ROW_SIZE)
        worker_block = self.max_clusters * wrs
        host_stats_base = worker_base + self.workers * worker_block
        host_stats_block = self.max_hosts * HOST_STATS_ROW_SIZE
        istio_base = host_stats_base + self.workers * host_stats_block
        istio_block = ISTIO_BLOCK_HEADER + self.istio_rows * ISTIO_ROW_SIZE
        cluster_hist_base = istio_base + self.workers * istio_block
        cluster_hist_block = self.max_clusters * CLUSTER_HIST_ROW_SIZE
        holdings_base = cluster_hist_base + self.workers * cluster_hist_block
        holdings_block = self.max_clusters * HOLDINGS_ROW_SIZE
        size = holdings_base + self.workers * holdings_block
        object.__setattr__(self, "host_base", host_base)
        object.__setattr__(self, "cluster_base", cluster_base)
        object.__setattr__(self, "worker_base", worker_base)
        object.__setattr__(self, "worker_block", worker_block)
        object.__setattr__(self, "host_stats_base", host_stats_base)
        object.__setattr__(self, "host_stats_block", host_stats_block)
        object.__setattr__(self, "istio_base", istio_base)
        object.__setattr__(self, "istio_block", istio_block)
        object.__setattr__(self, "cluster_hist_base", cluster_hist_base)
        object.__setattr__(self, "cluster_hist_block", cluster_hist_block)
        object.__setattr__(self, "holdings_base", holdings_base)
        object.__setattr__(self, "holdings_block", holdings_block)
        object.__setattr__(self, "size", size)

    # --- offsets (IndexError outside the geometry) ----------------------------------------------
    def host_off(self, slot: int) -> int:
        if not 0 <= slot < self.max_hosts:
            raise IndexError(f"host slot {slot} out of range (max_hosts={self.max_hosts})")
        return self.host_base + slot * HOST_ROW_SIZE

    def cluster_off(self, slot: int) -> int:
        if not 0 <= slot < self.max_clusters:
            raise IndexError(f"cluster slot {slot} out of range (max_clusters={self.max_clusters})")
        return self.cluster_base + slot * CLUSTER_ROW_SIZE

    def worker_row_off(self, worker: int, cluster_slot: int) -> int:
        if not 0 <= worker < self.workers:
            raise IndexError(f"worker {worker} out of range (workers={self.workers})")
        if not 0 <= cluster_slot < self.max_clusters:
            raise IndexError(f"cluster slot {cluster_slot} out of range "
                             f"(max_clusters={self.max_clusters})")
        return self.worker_base + worker * self.worker_block + cluster_slot * self.worker_row_size

    def stat_off(self, worker: int, cluster_slot: int, stat: int | str) -> int:
        idx = W_INDEX[stat] if isinstance(stat, str) else stat
        if not 0 <= idx < len(WORKER_CLUSTER_COUNTERS):
            raise IndexError(f"stat index {idx} out of range")
        return self.worker_row_off(worker, cluster_slot) + idx * 8

    def host_stats_off(self, worker: int, host_slot: int) -> int:
        """Byte offset of `worker`'s per-host counters row for `host_slot` (HOST_STATS)."""
        if not 0 <= worker < self.workers:
            raise IndexError(f"worker {worker} out of range (workers={self.workers})")
        if not 0 <= host_slot < self.max_hosts:
            raise IndexError(f"host slot {host_slot} out of range (max_hosts={self.max_hosts})")
        return self.host_stats_base + worker * self.host_stats_block \
            + host_slot * HOST_STATS_ROW_SIZE

    def istio_off(self, worker: int) -> int:
        """Byte offset of `worker`'s Istio metrics block (its 64-byte header; rows follow)."""
        if not 0 <= worker < self.workers:
            raise IndexError(f"worker {worker} out of range (workers={self.workers})")
        return self.istio_base + worker * self.istio_block

    def cluster_hist_off(self, worker: int, cluster_slot: int) -> int:
        """Byte offset of `worker`'s upstream_rq_time histogram row for `cluster_slot`."""
        if not 0 <= worker < self.workers:
            raise IndexError(f"worker {worker} out of range (workers={self.workers})")
        if not 0 <= cluster_slot < self.max_clusters:
            raise IndexError(f"cluster slot {cluster_slot} out of range "
                             f"(max_clusters={self.max_clusters})")
        return self.cluster_hist_base + worker * self.cluster_hist_block \
            + cluster_slot * CLUSTER_HIST_ROW_SIZE

    def holdings_off(self, worker: int, cluster_slot: int) -> int:
        """Byte offset of `worker`'s breaker holdings row for `cluster_slot`."""
        if not 0 <= worker < self.workers:
            raise IndexError(f"worker {worker} out of range (workers={self.workers})")
        if not 0 <= cluster_slot < self.max_clusters:
            raise IndexError(f"cluster slot {cluster_slot} out of range "
                             f"(max_clusters={self.max_clusters})")
        return self.holdings_base + worker * self.holdings_block \
            + cluster_slot * HOLDINGS_ROW_SIZE

    # --- header ---------------------------------------------------------------------------------
    def pack_header(self, generation: int = 0) -> bytes:
        head = _HDR.pack(MAGIC, VERSION, HEADER_SIZE, generation, self.max_hosts,
                         self.max_clusters, self.workers, self.worker_row_size, self.size)
        head += _HDR_V2.pack(self.istio_rows)
        return head + bytes(HEADER_SIZE - len(head))

    @classmethod
    def from_header(cls, buf) -> tuple[Layout, int]:
        """Read and validate a header; returns (layout, generation). Raises LayoutError."""
        mv = memoryview(buf).cast("B")
        try:
            if mv.nbytes < HEADER_SIZE:
                raise LayoutError(f"buffer of {mv.nbytes} bytes is smaller than the header")
            (magic, version, header_size, generation, max_hosts, max_clusters, workers,
             wrs, total) = _HDR.unpack_from(mv, 0)
            (istio_rows,) = _HDR_V2.unpack_from(mv, _HDR.size)
        finally:
            mv.release()
        if magic != MAGIC:
            raise LayoutError(f"bad magic 0x{magic:016x} (not a meshcore segment)")
        if version != VERSION or header_size != HEADER_SIZE:
            raise LayoutError(f"segment version {version} (header {header_size} B); this code "
                              f"reads version {VERSION} (header {HEADER_SIZE} B)")
        try:
            layout = cls(max_hosts, max_clusters, workers, wrs, istio_rows)
        except ValueError as e:
            raise LayoutError(f"inconsistent header: {e}") from None
        if layout.size != total:
            raise LayoutError(f"header says {total} bytes, geometry gives {layout.size}")
        return layout, generation

    def regions(self) -> list[tuple[str, int, int]]:
        """(name, start, end) of every region, in address order (for tests and the admin page)."""
        return [
            ("header", 0, HEADER_SIZE),
            ("hosts", self.host_base, self.cluster_base),
            ("clusters", self.cluster_base,
             self.cluster_base + self.max_clusters * CLUSTER_ROW_SIZE),
            ("workers", self.worker_base, self.host_stats_base),
            ("host_stats", self.host_stats_base, self.istio_base),
            ("istio", self.istio_base, self.cluster_hist_base),
            ("cluster_hist", self.cluster_hist_base, self.holdings_base),
            ("holdings", self.holdings_base, self.size),
        ]


# ------------------------------------------------------------------------------------------------
# Views


class Cell:
    """One uint32 cell shared by all workers (a breaker resource counter)."""

    __slots__ = ("cells", "off")

    def __init__(self, cells, off: int):
        self.cells = cells
        self.off = off

    def load(self) -> int:
        return self.cells.load32(self.off)

    def store(self, value: int) -> None:
        self.cells.store32(self.off, value)

    def add(self, delta: int) -> int:
        """Atomic add; returns the previous value."""
        return self.cells.fetch_add32(self.off, delta)

    def cas(self, expected: int, desired: int) -> bool:
        return self.cells.cas32(self.off, expected, desired)

    def __repr__(self):
        return f"Cell(off={self.off}, value={self.load()})"


class HostRow:
    """View of one host row. Hot-path users read `cells`/`off` and use the H_* offsets."""

    __slots__ = ("cells", "off", "slot")

    def __init__(self, cells, off: int, slot: int = -1):
        self.cells = cells
        self.off = off
        self.slot = slot

    def state(self) -> int:
        """ACTIVE or EJECTED (an EJECTED host may already be expired; see outlier.is_available)."""
        return EJECTED if self.cells.load64(self.off + H_STATE) else ACTIVE

    def is_ejected(self) -> bool:
        return self.cells.load64(self.off + H_STATE) != 0

    def ejected_until_ms(self) -> int:
        return self.cells.load64(self.off + H_EJECTED_UNTIL_MS)

    def consecutive_5xx(self) -> int:
        return self.cells.load32(self.off + H_CONSECUTIVE_5XX)

    def consecutive_gateway(self) -> int:
        return self.cells.load32(self.off + H_CONSECUTIVE_GATEWAY)

    def consecutive_local_origin(self) -> int:
        return self.cells.load32(self.off + H_CONSECUTIVE_LOCAL_ORIGIN)

    def n_ejections(self) -> int:
        return self.cells.load32(self.off + H_N_EJECTIONS)

    def ejections_total(self) -> int:
        return self.cells.load32(self.off + H_EJECTIONS_TOTAL)

    def rq_active(self) -> int:
        return self.cells.load32(self.off + H_RQ_ACTIVE)

    def rq_start(self) -> None:
        self.cells.fetch_add32(self.off + H_RQ_ACTIVE, 1)

    def rq_end(self) -> None:
        c = self.cells
        if c.fetch_add32(self.off + H_RQ_ACTIVE, -1) == 0:  # unmatched: undo the wrap
            c.fetch_add32(self.off + H_RQ_ACTIVE, 1)

    def cx_active(self) -> int:
        return self.cells.load32(self.off + H_CX_ACTIVE)

    def cx_open(self) -> None:
        self.cells.fetch_add32(self.off + H_CX_ACTIVE, 1)

    def cx_close(self) -> None:
        c = self.cells
        if c.fetch_add32(self.off + H_CX_ACTIVE, -1) == 0:
            c.fetch_add32(self.off + H_CX_ACTIVE, 1)

    def clear(self) -> None:
        """Zero the whole row (slot (re)assignment by the supervisor, never while in use)."""
        c = self.cells
        for k in range(0, HOST_ROW_SIZE, 8):
            c.store64(self.off + k, 0)

    def snapshot(self) -> dict[str, int]:
        c = self.cells
        return {name: (c.load32 if size == 4 else c.load64)(self.off + off)
                for name, off, size in HOST_FIELDS}

    def __repr__(self):
        return f"HostRow(slot={self.slot}, {self.snapshot()})"


class ClusterRow:
    """View of one cluster row: breaker gauges as `Cell`s, outlier stats by name."""

    __slots__ = ("cells", "off", "slot", "cx_active", "rq_pending", "rq_active",
                 "rq_retry_active", "ejections_active")

    def __init__(self, cells, off: int, slot: int = -1):
        self.cells = cells
        self.off = off
        self.slot = slot
        self.cx_active = Cell(cells, off + C_CX_ACTIVE)
        self.rq_pending = Cell(cells, off + C_RQ_PENDING)
        self.rq_active = Cell(cells, off + C_RQ_ACTIVE)
        self.rq_retry_active = Cell(cells, off + C_RQ_RETRY_ACTIVE)
        self.ejections_active = Cell(cells, off + C_EJECTIONS_ACTIVE)

    def get(self, name: str) -> int:
        return self.cells.load32(self.off + 4 * CLUSTER_FIELDS.index(name))

    def add(self, byte_off: int, delta: int = 1) -> int:
        """Atomic add on the cell at `byte_off` (a C_* constant); returns the previous value."""
        return self.cells.fetch_add32(self.off + byte_off, delta)

    def snapshot(self) -> dict[str, int]:
        c = self.cells
        return {name: c.load32(self.off + 4 * i) for i, name in enumerate(CLUSTER_FIELDS)}

    def clear(self) -> None:
        c = self.cells
        for k in range(0, CLUSTER_ROW_SIZE, 8):
            c.store64(self.off + k, 0)

    def __repr__(self):
        return f"ClusterRow(slot={self.slot}, {self.snapshot()})"


class WorkerStatsRow:
    """One worker's counters for one cluster. Single writer: only that worker calls `inc`."""

    __slots__ = ("cells", "off")

    def __init__(self, cells, off: int):
        self.cells = cells
        self.off = off

    def inc(self, idx: int, n: int = 1) -> int:
        """Add `n` to counter `idx` (a W_* constant); returns the new value."""
        return self.cells.incr64(self.off + (idx << 3), n)

    def get(self, idx: int) -> int:
        return self.cells.load64(self.off + (idx << 3))

    def snapshot(self) -> dict[str, int]:
        c = self.cells
        return {name: c.load64(self.off + 8 * i) for i, name in enumerate(WORKER_CLUSTER_COUNTERS)}

    def clear(self) -> None:
        c = self.cells
        for k in range(0, len(WORKER_CLUSTER_COUNTERS) * 8, 8):
            c.store64(self.off + k, 0)
