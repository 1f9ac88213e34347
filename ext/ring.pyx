# Compiled twin of meshcore/upstream/ring.py (RingHashPy, MaglevPy, hash_key_py, fold_hash_py):
# Envoy's RING_HASH ring and MAGLEV table, XXH64 and the hash-policy fold. Same API, same rules
# (read the module docstring there); this file only changes the representation:
#   * XXH64 is implemented here in C (the xxhash package has no C API); it is checked against the
#     xxhash package by tests/ext/test_ring.py;
#   * the ring is two C arrays (sorted hashes, host index per entry), the Maglev table one C array of
#     host indexes; pick() is a binary search / one modulo on them, with no allocation.
# The layout lives here, not in ext/ring.pxd: setup.py names the module meshcore._ext.ring, so
# Cython would look for ext/meshcore._ext.ring.pxd and silently ignore ext/ring.pxd.
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.stdint cimport uint64_t, uint32_t, int64_t
from libc.stdlib cimport qsort
from libc.string cimport memcpy, memset
from libc.math cimport ceil

from meshcore.upstream.balancer import NoHealthyUpstream

cdef extern from *:
    """
    #include <stdint.h>
    #include <stddef.h>
    #define MC_P1 11400714785074694791ULL
    #define MC_P2 14029467366897019727ULL
    #define MC_P3 1609587929392839161ULL
    #define MC_P4 9650029242287828579ULL
    #define MC_P5 2870177450012600261ULL
    static inline uint64_t mc_rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
    static inline uint64_t mc_read64(const unsigned char *p) {
        return (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16) | ((uint64_t)p[3] << 24)
             | ((uint64_t)p[4] << 32) | ((uint64_t)p[5] << 40) | ((uint64_t)p[6] << 48)
             | ((uint64_t)p[7] << 56);
    }
    static inline uint32_t mc_read32(const unsigned char *p) {
        return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
    }
    static inline uint64_t mc_round(uint64_t acc, uint64_t input) {
        acc += input * MC_P2;
        acc = mc_rotl64(acc, 31);
        return acc * MC_P1;
    }
    static inline uint64_t mc_merge(uint64_t acc, uint64_t val) {
        acc ^= mc_round(0, val);
        return acc * MC_P1 + MC_P4;
    }
    /* XXH64 (xxHash specification, 64-bit variant), little-endian input reads. */
    static uint64_t mc_xxh64(const unsigned char *p, size_t len, uint64_t seed) {
        const unsigned char *end = p + len;
        uint64_t h;
        if (len >= 32) {
            const unsigned char *limit = end - 32;
            uint64_t v1 = seed + MC_P1 + MC_P2, v2 = seed + MC_P2, v3 = seed, v4 = seed - MC_P1;
            do {
                v1 = mc_round(v1, mc_read64(p)); p += 8;
                v2 = mc_round(v2, mc_read64(p)); p += 8;
                v3 = mc_round(v3, mc_read64(p)); p += 8;
                v4 = mc_round(v4, mc_read64(p)); p += 8;
            } while (p <= limit);
            h = mc_rotl64(v1, 1) + mc_rotl64(v2, 7) + mc_rotl64(v3, 12) + mc_rotl64(v4, 18);
            h = mc_merge(h, v1); h = mc_merge(h, v2); h = mc_merge(h, v3); h = mc_merge(h, v4);
        } else {
            h = seed + MC_P5;
        }
        h += (uint64_t)len;
        while (p + 8 <= end) {
            h ^= mc_round(0, mc_read64(p));
            h = mc_rotl64(h, 27) * MC_P1 + MC_P4;
            p += 8;
        }
        if (p + 4 <= end) {
            h ^= (uint64_t)mc_read32(p) * MC_P1;
            h = mc_rotl64(h, 23) * MC_P2 + MC_P3;
            p += 4;
        }
        while (p < end) {
            h ^= (uint64_t)(*p) * MC_P5;
            h = mc_rotl64(h, 11) * MC_P1;
            p++;
        }
        h ^= h >> 33; h *= MC_P2;
        h ^= h >> 29; h *= MC_P3;
        h ^= h >> 32;
        return h;
    }
    typedef struct { uint64_t hash; uint32_t host; } mc_entry;
    static int mc_entry_cmp(const void *a, const void *b) {
        const mc_entry *x = (const mc_entry *)a, *y = (const mc_entry *)b;
        if (x->hash != y->hash) return x->hash < y->hash ? -1 : 1;
        if (x->host != y->host) return x->host < y->host ? -1 : 1;
        return 0;
    }
    """
    uint64_t mc_xxh64(const unsigned char *p, size_t length, uint64_t seed) nogil
    ctypedef struct mc_entry:
        uint64_t hash
        uint32_t host
    int mc_entry_cmp(const void *a, const void *b) nogil

cdef enum:
    _MAX_RING = 8388608
    _MAX_TABLE = 5000011

DEFAULT_MIN_RING_SIZE = 1024
DEFAULT_MAX_RING_SIZE = _MAX_RING
DEFAULT_TABLE_SIZE = 65537
MAX_TABLE_SIZE = _MAX_TABLE


cdef uint64_t _hash_buffer(object data, uint64_t seed) except? 0:
    cdef const unsigned char[::1] view
    if type(data) is bytes:
        return mc_xxh64(<const unsigned char *>PyBytes_AS_STRING(data), <size_t>PyBytes_GET_SIZE(data), seed)
    if isinstance(data, str):
        raise TypeError("hash_key() needs bytes, not str")
    view = memoryview(data).cast("B")
    if view.shape[0] == 0:
        return mc_xxh64(<const unsigned char *>b"", 0, seed)
    return mc_xxh64(&view[0], <size_t>view.shape[0], seed)


def hash_key(data, uint64_t seed=0):
    """XXH64 of a bytes-like object (Envoy's HashUtil::xxHash64)."""
    return _hash_buffer(data, seed)


def fold_hash(uint64_t acc, uint64_t new):
    """Envoy's combination of one more hash policy result: rotl64(acc, 1) ^ new (acc 0 at start)."""
    return ((acc << 1) | (acc >> 63)) ^ new


cdef bint _is_prime(uint64_t n):
    cdef uint64_t d
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    d = 3
    while d * d <= n:
        if n % d == 0:
            return False
        d += 2
    return True


cdef tuple _normalize(keys, weights):
    """(encoded keys, normalised weights, min_w, max_w) exactly as Envoy's normalizeHostWeights."""
    cdef list ks = list(keys)
    cdef list ws_in = list(weights)
    cdef list enc = []
    cdef list ws = []
    cdef list norm = []
    cdef object total = 0
    cdef double min_w = 1.0, max_w = 0.0, x
    if len(ks) != len(ws_in):
        raise ValueError(f"{len(ks)} keys but {len(ws_in)} weights")
    for k in ks:
        if not isinstance(k, str):
            raise TypeError(f"host keys must be str, got {type(k).__name__}")
        if not k:
            raise ValueError("host keys must not be empty")
        enc.append((<str>k).encode())
    for w in ws_in:
        w = w.__index__()
        if w < 0:
            raise ValueError(f"weights must be >= 0, got {w}")
        w = w or 1
        total += w
        ws.append(w)
    if total > 0xFFFFFFFF:
        raise ValueError(f"sum of weights {total} exceeds 2**32 - 1")
    for w in ws:
        x = (<double>(<uint32_t>w)) * 1.0 / <double>(<uint64_t>total)
        norm.append(x)
        if x < min_w:
            min_w = x
        if x > max_w:
            max_w = x
    return enc, norm, min_w, max_w


@cython.final
cdef class RingHash:
    """Envoy's ketama ring (RING_HASH) with C arrays; compiled twin of RingHashPy."""

    cdef uint64_t *_hashes
    cdef uint32_t *_hosts
    cdef Py_ssize_t _len
    cdef Py_ssize_t _n
    cdef list _counts
    cdef readonly Py_ssize_t size
    cdef readonly Py_ssize_t min_hashes_per_host
    cdef readonly Py_ssize_t max_hashes_per_host
    cdef readonly Py_ssize_t minimum_ring_size
    cdef readonly Py_ssize_t maximum_ring_size

    def __cinit__(self, keys, weights, minimum_ring_size=DEFAULT_MIN_RING_SIZE,
                  maximum_ring_size=DEFAULT_MAX_RING_SIZE):
        cdef object mn = minimum_ring_size.__index__()
        cdef object mx = maximum_ring_size.__index__()
        cdef double scale, min_w, current = 0.0, target = 0.0
        cdef Py_ssize_t n, host, cap, count, klen, used, nlen, j
        cdef uint64_t i
        cdef mc_entry *entries = NULL
        cdef unsigned char *buf = NULL
        cdef char digits[24]
        cdef bytes key
        cdef list norm
        if not 0 <= mn <= _MAX_RING:
            raise ValueError(f"minimum_ring_size must be in [0, {_MAX_RING}], got {mn}")
        if not 0 <= mx <= _MAX_RING:
            raise ValueError(f"maximum_ring_size must be in [0, {_MAX_RING}], got {mx}")
        if mn > mx:
            raise ValueError(f"ring hash: minimum_ring_size ({mn}) > maximum_ring_size ({mx})")
        enc, norm, min_w, _ = _normalize(keys, weights)
        self.minimum_ring_size = mn
        self.maximum_ring_size = mx
        n = self._n = len(enc)
        self._counts = [0] * n
        self._len = 0
        if n == 0:
            return
        scale = ceil(min_w * <double>(<uint64_t>mn)) / min_w
        if scale > <double>(<uint64_t>mx):
            scale = <double>(<uint64_t>mx)
        self.size = <Py_ssize_t>(<uint64_t>ceil(scale))
        # one spare entry per host absorbs floating-point drift of the running target
        cap = self.size + n + 1
        entries = <mc_entry *>PyMem_Malloc(cap * sizeof(mc_entry))
        klen = max(len(k) for k in enc)
        buf = <unsigned char *>PyMem_Malloc(klen + 32)
        if entries == NULL or buf == NULL:
            PyMem_Free(entries)
            PyMem_Free(buf)
            raise MemoryError()
        used = 0
        try:
            for host in range(n):
                key = enc[host]
                klen = PyBytes_GET_SIZE(key)
                memcpy(buf, PyBytes_AS_STRING(key), klen)
                buf[klen] = 95  # '_'
                target += scale * <double>norm[host]
                i = 0
                while current < target:
                    # decimal digits of i, appended after "<key>_"
                    nlen = 0
                    count = <Py_ssize_t>i
                    while True:
                        digits[nlen] = <char>(48 + count % 10)
                        nlen += 1
                        count //= 10
                        if count == 0:
                            break
                    for j in range(nlen):
                        buf[klen + 1 + j] = <unsigned char>digits[nlen - 1 - j]
                    if used == cap:
                        raise RuntimeError("ring hash: entry count overflow")
                    entries[used].hash = mc_xxh64(buf, <size_t>(klen + 1 + nlen), 0)
                    entries[used].host = <uint32_t>host
                    used += 1
                    i += 1
                    current += 1.0
                self._counts[host] = <Py_ssize_t>i
            qsort(entries, used, sizeof(mc_entry), mc_entry_cmp)
            self._hashes = <uint64_t *>PyMem_Malloc((used if used else 1) * sizeof(uint64_t))
            self._hosts = <uint32_t *>PyMem_Malloc((used if used else 1) * sizeof(uint32_t))
            if self._hashes == NULL or self._hosts == NULL:
                raise MemoryError()
            for j in range(used):
                self._hashes[j] = entries[j].hash
                self._hosts[j] = entries[j].host
            self._len = used
        finally:
            PyMem_Free(entries)
            PyMem_Free(buf)
        self.min_hashes_per_host = min(min(self._counts), self.size)
        self.max_hashes_per_host = max(self._counts)

    def __dealloc__(self):
        PyMem_Free(self._hashes)
        PyMem_Free(self._hosts)

    @property
    def n_hosts(self):
        return self._n

    def __len__(self):
        """Number of entries actually on the ring (Envoy's `ring_.size()`, normally == `size`)."""
        return self._len

    def counts(self):
        """Ring entries per host, in host order."""
        return list(self._counts)

    def entries(self):
        """The sorted ring as (hash, host index) pairs (for tests and debugging)."""
        cdef Py_ssize_t j
        return [(self._hashes[j], self._hosts[j]) for j in range(self._len)]

    def pick(self, uint64_t h, uint32_t attempt=0):
        cdef Py_ssize_t lo = 0, hi = self._len, mid
        if hi == 0:
            raise NoHealthyUpstream("RING_HASH table has no endpoints to pick from")
        # lower bound: first entry with hash >= h
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._hashes[mid] < h:
                lo = mid + 1
            else:
                hi = mid
        if lo == self._len:
            lo = 0
        if attempt:
            lo = <Py_ssize_t>((<uint64_t>lo + attempt) % <uint64_t>self._len)
        return self._hosts[lo]

    def __reduce__(self):
        raise TypeError("RingHash tables are not picklable; rebuild them from the endpoints")

    def __repr__(self):
        return f"<RingHashC hosts={self._n} size={self.size}>"


@cython.final
cdef class Maglev:
    """Envoy's Maglev table (MAGLEV) with a C array; compiled twin of MaglevPy."""

    cdef uint32_t *_table
    cdef Py_ssize_t _n
    cdef list _counts
    cdef readonly Py_ssize_t table_size
    cdef readonly Py_ssize_t min_entries_per_host
    cdef readonly Py_ssize_t max_entries_per_host

    def __cinit__(self, keys, weights, table_size=DEFAULT_TABLE_SIZE):
        cdef object ts = table_size.__index__()
        cdef uint64_t m, c, filled = 0, k, o, s
        cdef uint32_t iteration = 1
        cdef Py_ssize_t n, j
        cdef double max_w
        cdef uint64_t *offset = NULL
        cdef uint64_t *skip = NULL
        cdef uint64_t *nxt = NULL
        cdef uint64_t *cnt = NULL
        cdef double *weight = NULL
        cdef double *target = NULL
        cdef uint32_t *orig = NULL
        cdef unsigned char *used = NULL
        cdef bytes key
        if not 0 < ts <= _MAX_TABLE:
            raise ValueError(f"maglev table_size must be in [1, {_MAX_TABLE}], got {ts}")
        m = <uint64_t>ts
        if not _is_prime(m):
            raise ValueError("The table size of maglev must be prime number")
        enc, norm, _, max_w = _normalize(keys, weights)
        self.table_size = <Py_ssize_t>m
        n = self._n = len(enc)
        self._counts = [0] * n
        if n == 0:
            return
        order = sorted(range(n), key=lambda i: (enc[i], i))
        offset = <uint64_t *>PyMem_Malloc(n * sizeof(uint64_t))
        skip = <uint64_t *>PyMem_Malloc(n * sizeof(uint64_t))
        nxt = <uint64_t *>PyMem_Malloc(n * sizeof(uint64_t))
        cnt = <uint64_t *>PyMem_Malloc(n * sizeof(uint64_t))
        weight = <double *>PyMem_Malloc(n * sizeof(double))
        target = <double *>PyMem_Malloc(n * sizeof(double))
        orig = <uint32_t *>PyMem_Malloc(n * sizeof(uint32_t))
        used = <unsigned char *>PyMem_Malloc(m)
        self._table = <uint32_t *>PyMem_Malloc(m * sizeof(uint32_t))
        try:
            if (offset == NULL or skip == NULL or nxt == NULL or cnt == NULL or weight == NULL
                    or target == NULL or orig == NULL or used == NULL or self._table == NULL):
                raise MemoryError()
            for j in range(n):
                key = enc[order[j]]
                orig[j] = <uint32_t>order[j]
                offset[j] = mc_xxh64(<const unsigned char *>PyBytes_AS_STRING(key),
                                     <size_t>PyBytes_GET_SIZE(key), 0) % m
                skip[j] = mc_xxh64(<const unsigned char *>PyBytes_AS_STRING(key),
                                   <size_t>PyBytes_GET_SIZE(key), 1) % (m - 1) + 1
                weight[j] = <double>norm[order[j]]
                target[j] = 0.0
                nxt[j] = 0
                cnt[j] = 0
            memset(used, 0, m)
            with nogil:
                while filled < m:
                    for j in range(n):
                        if filled >= m:
                            break
                        if <double>iteration * weight[j] < target[j]:
                            continue
                        target[j] += max_w
                        o = offset[j]
                        s = skip[j]
                        k = nxt[j]
                        c = (o + s * k) % m
                        while used[c]:
                            k += 1
                            c = (o + s * k) % m
                        used[c] = 1
                        self._table[c] = orig[j]
                        nxt[j] = k + 1
                        cnt[j] += 1
                        filled += 1
                    iteration += 1
            for j in range(n):
                self._counts[orig[j]] = <Py_ssize_t>cnt[j]
        finally:
            PyMem_Free(offset)
            PyMem_Free(skip)
            PyMem_Free(nxt)
            PyMem_Free(cnt)
            PyMem_Free(weight)
            PyMem_Free(target)
            PyMem_Free(orig)
            PyMem_Free(used)
        self.min_entries_per_host = min(min(self._counts), self.table_size)
        self.max_entries_per_host = max(self._counts)

    def __dealloc__(self):
        PyMem_Free(self._table)

    @property
    def size(self):
        return self.table_size if self._n else 0

    @property
    def n_hosts(self):
        return self._n

    def __len__(self):
        return self.table_size if self._n else 0

    def counts(self):
        """Table slots per host, in host order."""
        return list(self._counts)

    def table(self):
        """Host index of every slot (for tests and debugging)."""
        cdef Py_ssize_t j
        if not self._n:
            return []
        return [self._table[j] for j in range(self.table_size)]

    def pick(self, uint64_t h, uint32_t attempt=0):
        if not self._n:
            raise NoHealthyUpstream("MAGLEV table has no endpoints to pick from")
        if attempt:
            h ^= (<uint64_t>0) - <uint64_t>attempt
        return self._table[h % <uint64_t>self.table_size]

    def __reduce__(self):
        raise TypeError("Maglev tables are not picklable; rebuild them from the endpoints")

    def __repr__(self):
        return f"<MaglevC hosts={self._n} table_size={self.table_size}>"
