"""Istio's standard HTTP metrics as plain uint64 cells in shared memory (T1: no I/O).

Rules of this module (the byte layout of the block is meshcore.shm.layout `istio_off`):

* Metrics (semantics.md §11): `istio_requests_total` (counter) and three histograms with Envoy's
  default buckets, which Istio leaves in place: `istio_request_duration_milliseconds` (ms),
  `istio_request_bytes` and `istio_response_bytes` (bytes). Every request records each histogram
  once, so a histogram's `_count` is the request count of its row.
* Label sets are bounded and never come from raw request data. A row is keyed by one uint64:
  `key = dest_id << 42 | flags << 10 | code`, where
  - `dest_id` (22 bits) names the destination labels (service, workload, app, version ...): an
    id the supervisor interns from config and endpoint labels (meshcore.metrics.labels) and
    publishes in the host row (or the cluster row, for a request that reached no host); 0 is the
    all-"unknown" destination (no route);
  - `flags` (32 bits) is a bitmask over RESPONSE_FLAGS (Envoy's short names);
  - `code` (10 bits) is the HTTP status sent downstream, 0 when none was.
  The source side (reporter, source_workload ...) is the same for every row of a process and is
  added by the renderer (meshcore.metrics.prometheus).
* Per worker, single writer: a worker (or the C event loop replacing its Python) owns its block
  and is the only process that writes it, with plain `incr64` adds (no lock, no LOCK prefix).
  Readers sum the blocks of all workers.
* Block header cells (uint64): B_ROWS_USED rows hold interned keys; a new key's row is written
  first (key cell), then published by storing rows_used + 1, so a reader never sees a row without
  its key. B_OVERFLOW counts records that found the table full: they go to the last row
  (`rows - 1`), whose key is OVERFLOW_KEY and whose labels render as "unknown".
  B_DOWNSTREAM_CX_TOTAL / B_DOWNSTREAM_CX_ACTIVE count the worker's client connections (Envoy's
  listener stats).
* Row cells (uint64, index i at byte 8*i): R_KEY, R_REQUESTS, then per histogram NB non-cumulative
  bucket counts (bucket i counts values <= BUCKETS[i] and > BUCKETS[i-1]; values above the last
  bound are in no bucket, only in the count, i.e. in le="+Inf") followed by the sum. Values are
  integers (ms, bytes), as Envoy records them.
* A restarted worker adopts its block as it finds it (`IstioWriter` re-reads the keys), so
  counters never go backwards while the supervisor lives.
"""
from __future__ import annotations

from bisect import bisect_left

from meshcore.shm.layout import ISTIO_BLOCK_HEADER, ISTIO_ROW_SIZE

__all__ = [
    "BUCKETS", "NB", "RESPONSE_FLAGS", "OVERFLOW_KEY", "pack_key", "unpack_key", "flags_mask",
    "flags_text", "bucket_index", "record", "IstioWriter", "Series", "collect", "row_off",
    "R_KEY", "R_REQUESTS", "R_DURATION", "R_DURATION_SUM", "R_REQUEST_BYTES",
    "R_REQUEST_BYTES_SUM", "R_RESPONSE_BYTES", "R_RESPONSE_BYTES_SUM",
    "B_ROWS_USED", "B_OVERFLOW", "B_DOWNSTREAM_CX_TOTAL", "B_DOWNSTREAM_CX_ACTIVE",
    "B_DOWNSTREAM_CX_OVERFLOW", "AcceptOverflow", "forget_connections", "accept_overflow_total",
]

# Envoy's default histogram bounds (semantics.md §11.3), for ms and bytes alike.
BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
           300000, 600000, 1800000, 3600000)
NB = len(BUCKETS)

# Row cells (uint64 indexes)
R_KEY = 0
R_REQUESTS = 1
R_DURATION = 2
R_DURATION_SUM = R_DURATION + NB
R_REQUEST_BYTES = R_DURATION_SUM + 1
R_REQUEST_BYTES_SUM = R_REQUEST_BYTES + NB
R_RESPONSE_BYTES = R_REQUEST_BYTES_SUM + 1
R_RESPONSE_BYTES_SUM = R_RESPONSE_BYTES + NB
ROW_CELLS = R_RESPONSE_BYTES_SUM + 1
assert ROW_CELLS * 8 <= ISTIO_ROW_SIZE

# Block header cells (uint64 indexes)
B_ROWS_USED = 0
B_OVERFLOW = 1
B_DOWNSTREAM_CX_TOTAL = 2
B_DOWNSTREAM_CX_ACTIVE = 3
B_DOWNSTREAM_CX_OVERFLOW = 4  # connections closed at accept (--max-connections, no descriptors)

# Envoy's response flags (short names). Rendering order: the retry flags first, as Envoy 1.40
# prints its observed combinations ("URX,UF", "URX,UT", "UO,UC"), then Envoy's enum order.
RESPONSE_FLAGS = ("URX", "UO", "LH", "UH", "UT", "LR", "UR", "UF", "UC", "NR", "DI", "FI", "RL",
                  "UAEX", "RLSE", "IH", "SI", "DPE", "UPE", "NC", "UMSDR", "RFCF", "NFCF", "OM",
                  "DF", "DO", "DR", "DC")
_FLAG_BIT = {name: 1 << i for i, name in enumerate(RESPONSE_FLAGS)}
assert len(RESPONSE_FLAGS) <= 32

DEST_BITS = 22
MAX_DEST_ID = (1 << DEST_BITS) - 1
OVERFLOW_KEY = (1 << 64) - 1  # key of the overflow row (no real key has all bits set)


def pack_key(dest_id: int, code: int, flags: int) -> int:
    """The row key of one label set. `code` outside 0..999 is recorded as 0."""
    if not 0 <= code <= 999:
        code = 0
    return (dest_id & MAX_DEST_ID) << 42 | (flags & 0xFFFFFFFF) << 10 | code


def unpack_key(key: int) -> tuple[int, int, int]:
    """(dest_id, code, flags) of a key."""
    return key >> 42, key & 0x3FF, (key >> 10) & 0xFFFFFFFF


_mask_cache: dict = {}


def flags_mask(text) -> int:
    """Bitmask of an Envoy flags string ("URX,UF"; "-", "" or None: 0). Unknown names are
    ignored (never stored as text, so they cannot grow the label space)."""
    m = _mask_cache.get(text)
    if m is None:
        m = 0
        if text and text != "-":
            for name in text.split(","):
                m |= _FLAG_BIT.get(name.strip(), 0)
        if len(_mask_cache) < 256:  # flag strings come from code: few; bound it anyway
            _mask_cache[text] = m
    return m


def flags_text(mask: int) -> str:
    """The label value of a flags bitmask: names joined with ",", "-" when none."""
    if not mask:
        return "-"
    return ",".join(name for i, name in enumerate(RESPONSE_FLAGS) if mask >> i & 1)


def bucket_index(value: int) -> int:
    """Index of the bucket a value falls in (value <= BUCKETS[i]); NB when above every bound."""
    return bisect_left(BUCKETS, value)


def row_off(block_off: int, row: int) -> int:
    return block_off + ISTIO_BLOCK_HEADER + row * ISTIO_ROW_SIZE


# ------------------------------------------------------------------------------------------------
# Writer (one per worker)


def record(cells, block_off: int, rows: int, index: dict, dest_id: int, code: int, flags: int,
           duration_ms: int, request_bytes: int, response_bytes: int) -> int:
    """Count one finished request in a worker's block; returns the byte offset of its row.

    The reference implementation the compiled event loop must match cell for cell.
    `index`: key -> row offset, this worker's private lookup (rebuilt by `adopt`); `rows`: rows
    in the block (layout.istio_rows). Single writer: only the owning worker calls this.
    """
    key = pack_key(dest_id, code, flags)
    off = index.get(key)
    if off is None:
        off = _new_row(cells, block_off, rows, index, key)
    inc = cells.incr64
    inc(off + 8 * R_REQUESTS, 1)
    if duration_ms < 0:
        duration_ms = 0
    i = bisect_left(BUCKETS, duration_ms)
    if i < NB:
        inc(off + 8 * (R_DURATION + i), 1)
    if duration_ms:
        inc(off + 8 * R_DURATION_SUM, duration_ms)
    i = bisect_left(BUCKETS, request_bytes)
    if i < NB:
        inc(off + 8 * (R_REQUEST_BYTES + i), 1)
    if request_bytes:
        inc(off + 8 * R_REQUEST_BYTES_SUM, request_bytes)
    i = bisect_left(BUCKETS, response_bytes)
    if i < NB:
        inc(off + 8 * (R_RESPONSE_BYTES + i), 1)
    if response_bytes:
        inc(off + 8 * R_RESPONSE_BYTES_SUM, response_bytes)
    return off


def _new_row(cells, block_off: int, rows: int, index: dict, key: int) -> int:
    used = cells.load64(block_off + 8 * B_ROWS_USED)
    if used >= rows - 1:  # full: the last row takes every other label set, counted
        cells.incr64(block_off + 8 * B_OVERFLOW, 1)
        off = row_off(block_off, rows - 1)
        if cells.load64(off + 8 * R_KEY) != OVERFLOW_KEY:
            cells.store64(off + 8 * R_KEY, OVERFLOW_KEY)
        return off  # not indexed: each overflowing record is counted in B_OVERFLOW
    off = row_off(block_off, used)
    cells.store64(off + 8 * R_KEY, key)  # the key first, then publish the row
    cells.store64(block_off + 8 * B_ROWS_USED, used + 1)
    index[key] = off
    return off


def adopt(cells, block_off: int, rows: int) -> dict:
    """The key -> row offset index of a block as a (re)started worker finds it."""
    used = min(cells.load64(block_off + 8 * B_ROWS_USED), rows - 1)
    return {cells.load64(row_off(block_off, r) + 8 * R_KEY): row_off(block_off, r)
            for r in range(used)}


class IstioWriter:
    """One worker's Istio block: `record` plus its downstream connection counters."""

    __slots__ = ("cells", "block", "rows", "index")

    def __init__(self, cells, layout, worker: int):
        self.cells = cells
        self.block = layout.istio_off(worker)
        self.rows = layout.istio_rows
        self.index = adopt(cells, self.block, self.rows)

    def record(self, dest_id: int, code: int, flags: int, duration_ms: int, request_bytes: int,
               response_bytes: int) -> None:
        record(self.cells, self.block, self.rows, self.index, dest_id, code, flags, duration_ms,
               request_bytes, response_bytes)

    def downstream_open(self) -> None:
        self.cells.incr64(self.block + 8 * B_DOWNSTREAM_CX_TOTAL, 1)
        self.cells.incr64(self.block + 8 * B_DOWNSTREAM_CX_ACTIVE, 1)

    def downstream_close(self) -> None:
        off = self.block + 8 * B_DOWNSTREAM_CX_ACTIVE
        if self.cells.load64(off):
            self.cells.store64(off, self.cells.load64(off) - 1)


class AcceptOverflow:
    """Publishes a worker's count of connections closed at accept (the event loop keeps it in
    process memory) into its block; a restarted worker goes on from its predecessor's count, so
    the counter never goes back."""

    __slots__ = ("cells", "off", "base")

    def __init__(self, cells, layout, worker: int):
        self.cells = cells
        self.off = layout.istio_off(worker) + 8 * B_DOWNSTREAM_CX_OVERFLOW
        self.base = cells.load64(self.off)

    def publish(self, count: int) -> None:
        self.cells.store64(self.off, self.base + count)


def accept_overflow_total(cells, layout) -> int:
    return sum(cells.load64(layout.istio_off(w) + 8 * B_DOWNSTREAM_CX_OVERFLOW)
               for w in range(layout.workers))


def forget_connections(cells, layout, worker: int) -> int:
    """A dead worker's connections are gone: zero its downstream_cx_active (the supervisor, before
    the restart). Returns how many it had."""
    off = layout.istio_off(worker) + 8 * B_DOWNSTREAM_CX_ACTIVE
    n = cells.load64(off)
    cells.store64(off, 0)
    return n


# ------------------------------------------------------------------------------------------------
# Reader (supervisor): sums over workers


class Series:
    """The summed cells of one label set: requests, and per histogram (buckets, sum)."""

    __slots__ = ("requests", "duration", "duration_sum", "request_bytes", "request_bytes_sum",
                 "response_bytes", "response_bytes_sum")

    def __init__(self):
        self.requests = 0
        self.duration = [0] * NB
        self.duration_sum = 0
        self.request_bytes = [0] * NB
        self.request_bytes_sum = 0
        self.response_bytes = [0] * NB
        self.response_bytes_sum = 0

    def add_row(self, cells, off: int) -> None:
        ld = cells.load64
        self.requests += ld(off + 8 * R_REQUESTS)
        for i in range(NB):
            self.duration[i] += ld(off + 8 * (R_DURATION + i))
            self.request_bytes[i] += ld(off + 8 * (R_REQUEST_BYTES + i))
            self.response_bytes[i] += ld(off + 8 * (R_RESPONSE_BYTES + i))
        self.duration_sum += ld(off + 8 * R_DURATION_SUM)
        self.request_bytes_sum += ld(off + 8 * R_REQUEST_BYTES_SUM)
        self.response_bytes_sum += ld(off + 8 * R_RESPONSE_BYTES_SUM)

    def quantile(self, q: float) -> float | None:
        """Duration quantile (ms) by linear interpolation inside the bucket, as PromQL's
        histogram_quantile does; None without requests; the last bound when above it."""
        return bucket_quantile(self.duration, self.requests, q)


def bucket_quantile(buckets, count: int, q: float) -> float | None:
    if count <= 0:
        return None
    rank = q * count
    seen = 0
    lower = 0.0
    for i, n in enumerate(buckets):
        if n and seen + n >= rank:
            return lower + (BUCKETS[i] - lower) * ((rank - seen) / n)
        seen += n
        lower = float(BUCKETS[i])
    return float(BUCKETS[-1])


def collect(cells, layout) -> tuple[dict[int, Series], int, int, int]:
    """Sum every worker's block: ({key: Series}, overflowed records, downstream connections
    total, downstream connections active)."""
    out: dict[int, Series] = {}
    overflow = cx_total = cx_active = 0
    rows = layout.istio_rows
    for w in range(layout.workers):
        block = layout.istio_off(w)
        overflow += cells.load64(block + 8 * B_OVERFLOW)
        cx_total += cells.load64(block + 8 * B_DOWNSTREAM_CX_TOTAL)
        cx_active += cells.load64(block + 8 * B_DOWNSTREAM_CX_ACTIVE)
        used = min(cells.load64(block + 8 * B_ROWS_USED), rows - 1)
        offs = [row_off(block, r) for r in range(used)]
        last = row_off(block, rows - 1)
        if cells.load64(last + 8 * R_KEY) == OVERFLOW_KEY:
            offs.append(last)
        for off in offs:
            key = cells.load64(off + 8 * R_KEY)
            series = out.get(key)
            if series is None:
                series = out[key] = Series()
            series.add_row(cells, off)
    return out, overflow, cx_total, cx_active


# ------------------------------------------------------------------------------------------------
# Envoy's per-cluster upstream_rq_time histogram (layout.cluster_hist_off rows): the same bounds;
# cells 0..NB-1 bucket counts, NB the sum, NB+1 the count.

H_SUM = NB
H_COUNT = NB + 1


def hist_record(cells, off: int, value: int) -> None:
    """One value (ms) into a worker's histogram row at `off` (single writer)."""
    inc = cells.incr64
    i = bisect_left(BUCKETS, value)
    if i < NB:
        inc(off + 8 * i, 1)
    if value > 0:
        inc(off + 8 * H_SUM, value)
    inc(off + 8 * H_COUNT, 1)


def hist_collect(cells, layout, cluster_slot: int) -> tuple[list[int], int, int]:
    """(bucket counts, sum, count) of one cluster's histogram, summed over workers."""
    buckets = [0] * NB
    total = count = 0
    for w in range(layout.workers):
        off = layout.cluster_hist_off(w, cluster_slot)
        for i in range(NB):
            buckets[i] += cells.load64(off + 8 * i)
        total += cells.load64(off + 8 * H_SUM)
        count += cells.load64(off + 8 * H_COUNT)
    return buckets, total, count
