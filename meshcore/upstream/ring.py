"""Consistent-hash tables built exactly as Envoy 1.40 builds them (semantics.md §6.8-6.17).

Rules of this module (the compiled twin `ext/ring.pyx` follows the same ones):

* A table is built once from the endpoint list of one cluster (priority) and never changes; a new
  endpoint list means a new table. `pick(hash, attempt=0)` returns an endpoint *index* (position in
  the `keys` list given to the constructor), allocates nothing and never consults randomness.
* `keys[i]` is Envoy's host key: the endpoint address as `ip:port` (IPv6 `[addr]:port`), see
  `host_key()`. `weights[i]` is the endpoint's load_balancing_weight: a non-negative int, 0 read as 1
  (Istio's rule, §6.2, as in balancer.py); their sum must fit in 32 bits (Envoy rejects more).
* Hashes are XXH64 with seed 0 (`hash_key`); a request hash is an int in [0, 2**64).

RingHash (ring_hash_lb.cc, §6.10-6.13):

* weights normalised `w_i / sum(w)`; `scale = min(ceil(min_w * min_ring) / min_w, max_ring)`;
  the `size` gauge is `ceil(scale)`.
* hosts in the given order: `target += scale * w_i`; while `current < target`: add the entry
  `(XXH64("<key>_<i>"), host)` for i = 0, 1, ...; then sort by hash. Equal hashes (only possible
  for duplicate keys) are ordered by host index here; Envoy's unstable sort leaves that order
  unspecified.
* pick: the first entry whose hash is >= h, wrapping to entry 0 past the last one (the ketama
  search Envoy uses gives exactly this); a retry re-pick (`attempt > 0`) takes entry
  `(idx + attempt) % len(ring)`.

Maglev (maglev_lb.cc, §6.15):

* table size M must be prime (Envoy rejects others) and at most 5,000,011.
* hosts sorted by key (bytewise); for each `offset = XXH64(key) % M`,
  `skip = XXH64(key, seed=1) % (M - 1) + 1`. Fill rounds 1, 2, ...: a host takes a slot in a round
  unless `round * w_i < target_i`; when it does, `target_i += max_w` and it takes the first free
  slot of its permutation `(offset + skip * next) % M`.
* pick: `table[h % M]`; a retry (`attempt > 0`) first does `h ^= 2**64 - attempt`.

Key movement: Maglev moves about 1/N of the keys when one of N hosts leaves or joins. Envoy's ring
does only when the entries per host stay the same: every host gets about ceil(min_ring / N) entries,
so going from 3 to 2 hosts gives each survivor 512 instead of 342 entries and ~40% of the keys move
(`python bench/micro_ring.py --moved`). This is Envoy's behaviour and is reproduced, not fixed.

Both tables expose Envoy's gauges (`size`, `min_hashes_per_host`/`max_hashes_per_host` for the ring,
`min_entries_per_host`/`max_entries_per_host` for Maglev) and `counts()`, the entries per host.

Request hash folding (hash_policy.cc, §6.17): several hash policies on one route combine as
`h = rotl64(h, 1) ^ new`, starting from 0 and skipping policies that produced nothing
(`fold_hash`).
"""
from __future__ import annotations

import math
import operator
import socket
from bisect import bisect_left


from meshcore import _accel
from meshcore.upstream.balancer import NoHealthyUpstream

__all__ = [
    "RingHash", "RingHashPy", "RingHashC", "Maglev", "MaglevPy", "MaglevC",
    "hash_key", "hash_key_py", "fold_hash", "fold_hash_py", "host_key", "is_prime", "pick_excluding",
    "DEFAULT_MIN_RING_SIZE", "DEFAULT_MAX_RING_SIZE", "DEFAULT_TABLE_SIZE", "MAX_TABLE_SIZE",
]

DEFAULT_MIN_RING_SIZE = 1024
DEFAULT_MAX_RING_SIZE = 8388608          # Envoy default, also the largest allowed value
DEFAULT_TABLE_SIZE = 65537               # Maglev default (prime)
MAX_TABLE_SIZE = 5000011                 # Envoy's validation bound (lte), itself prime
MASK64 = (1 << 64) - 1
_MAX_WEIGHT_SUM = (1 << 32) - 1



def hash_key_py(data, seed: int = 0) -> int:
    """XXH64 of a bytes-like object (Envoy's HashUtil::xxHash64)."""
    if isinstance(data, str):
        raise TypeError("hash_key() needs bytes, not str")
    if seed and not 0 <= seed <= MASK64:
        raise OverflowError(f"seed {seed} is outside [0, 2**64)")
    return _xxh64(data, seed)


def _xxh64(data, seed: int = 0) -> int:
    # imported on first use: only the pure twin hashes in Python; workers run the compiled one
    import xxhash
    return xxhash.xxh64_intdigest(data, seed)


def fold_hash_py(acc: int, new: int) -> int:
    """Envoy's combination of one more hash policy result: rotl64(acc, 1) ^ new (acc 0 at start)."""
    acc = operator.index(acc)
    new = operator.index(new)
    if not 0 <= acc <= MASK64 or not 0 <= new <= MASK64:
        raise OverflowError("hash values must be in [0, 2**64)")
    return (((acc << 1) | (acc >> 63)) & MASK64) ^ new


def is_prime(n: int) -> bool:
    """Deterministic primality test for the Maglev table size (n < 2**32 in practice)."""
    n = operator.index(n)
    if n < 2:
        return False
    for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):  # deterministic below 3.3e24
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def host_key(address: str, port: int) -> str:
    """Envoy's host key for an endpoint: `ip:port`, IPv6 as `[addr]:port` in inet_ntop form.

    A name that is not an IP literal is returned as `name:port` unchanged (Envoy hashes the resolved
    address; pass the resolved IP).
    """
    port = operator.index(port)
    a = address.strip("[]")
    if ":" in a:
        try:
            a = socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, a.split("%", 1)[0]))
        except OSError:
            pass
        return f"[{a}]:{port}"
    return f"{a}:{port}"


def _check_hash(h, attempt):
    h = operator.index(h)
    attempt = operator.index(attempt)
    if not 0 <= h <= MASK64:
        raise OverflowError(f"hash {h} is outside [0, 2**64)")
    if not 0 <= attempt <= 0xFFFFFFFF:
        raise OverflowError(f"attempt {attempt} is outside [0, 2**32)")
    return h, attempt


def _normalize(keys, weights):
    """(encoded keys, normalised weights, min_w, max_w) exactly as Envoy's normalizeHostWeights."""
    keys = list(keys)
    weights = list(weights)
    if len(keys) != len(weights):
        raise ValueError(f"{len(keys)} keys but {len(weights)} weights")
    enc = []
    for k in keys:
        if not isinstance(k, str):
            raise TypeError(f"host keys must be str, got {type(k).__name__}")
        if not k:
            raise ValueError("host keys must not be empty")
        enc.append(k.encode())
    ws = []
    total = 0
    for w in weights:
        w = operator.index(w)
        if w < 0:
            raise ValueError(f"weights must be >= 0, got {w}")
        w = w or 1
        total += w
        ws.append(w)
    if total > _MAX_WEIGHT_SUM:
        raise ValueError(f"sum of weights {total} exceeds 2**32 - 1")
    min_w, max_w = 1.0, 0.0
    norm = []
    for w in ws:
        x = w * 1.0 / total
        norm.append(x)
        min_w = min(min_w, x)
        max_w = max(max_w, x)
    return enc, norm, min_w, max_w


class RingHashPy:
    """Envoy's ketama ring (RING_HASH); the pure-Python reference of `RingHashC`."""

    __slots__ = ("_hashes", "_hosts", "_len", "_n", "_counts", "_size", "_min", "_max",
                 "_min_ring", "_max_ring")

    size = property(lambda self: self._size, doc="Envoy gauge ring_hash_lb.size: ceil(scale)")
    min_hashes_per_host = property(lambda self: self._min, doc="Envoy gauge ring_hash_lb.min_hashes_per_host")
    max_hashes_per_host = property(lambda self: self._max, doc="Envoy gauge ring_hash_lb.max_hashes_per_host")
    minimum_ring_size = property(lambda self: self._min_ring)
    maximum_ring_size = property(lambda self: self._max_ring)

    def __init__(self, keys, weights, minimum_ring_size: int = DEFAULT_MIN_RING_SIZE,
                 maximum_ring_size: int = DEFAULT_MAX_RING_SIZE):
        minimum_ring_size = operator.index(minimum_ring_size)
        maximum_ring_size = operator.index(maximum_ring_size)
        if not 0 <= minimum_ring_size <= DEFAULT_MAX_RING_SIZE:
            raise ValueError(f"minimum_ring_size must be in [0, {DEFAULT_MAX_RING_SIZE}], got {minimum_ring_size}")
        if not 0 <= maximum_ring_size <= DEFAULT_MAX_RING_SIZE:
            raise ValueError(f"maximum_ring_size must be in [0, {DEFAULT_MAX_RING_SIZE}], got {maximum_ring_size}")
        if minimum_ring_size > maximum_ring_size:
            raise ValueError(f"ring hash: minimum_ring_size ({minimum_ring_size}) > "
                             f"maximum_ring_size ({maximum_ring_size})")
        enc, norm, min_w, _ = _normalize(keys, weights)
        self._min_ring = minimum_ring_size
        self._max_ring = maximum_ring_size
        n = self._n = len(enc)
        self._counts = [0] * n
        if n == 0:
            self._hashes = []
            self._hosts = []
            self._len = 0
            self._size = self._min = self._max = 0
            return
        scale = min(float(math.ceil(min_w * minimum_ring_size)) / min_w, float(maximum_ring_size))
        ring_size = math.ceil(scale)
        entries = []
        current = 0.0
        target = 0.0
        counts = self._counts
        for host, (key, w) in enumerate(zip(enc, norm)):
            prefix = key + b"_"
            target += scale * w
            i = 0
            while current < target:
                entries.append((_xxh64(prefix + str(i).encode()), host))
                i += 1
                current += 1.0
            counts[host] = i
        entries.sort()
        self._hashes = [e[0] for e in entries]
        self._hosts = [e[1] for e in entries]
        self._len = len(entries)
        self._size = ring_size
        self._min = min(min(counts), ring_size)
        self._max = max(counts)

    @property
    def n_hosts(self) -> int:
        return self._n

    def __len__(self) -> int:
        """Number of entries actually on the ring (Envoy's `ring_.size()`, normally == `size`)."""
        return self._len

    def counts(self) -> list:
        """Ring entries per host, in host order."""
        return list(self._counts)

    def entries(self) -> list:
        """The sorted ring as (hash, host index) pairs (for tests and debugging)."""
        return list(zip(self._hashes, self._hosts))

    def pick(self, h: int, attempt: int = 0) -> int:
        if h.__class__ is not int or not 0 <= h <= MASK64 or attempt:
            h, attempt = _check_hash(h, attempt)
        n = self._len
        if n == 0:
            raise NoHealthyUpstream("RING_HASH table has no endpoints to pick from")
        i = bisect_left(self._hashes, h)
        if i == n:
            i = 0
        if attempt:
            i = (i + attempt) % n
        return self._hosts[i]

    def __repr__(self):
        return f"<RingHashPy hosts={self._n} size={self.size}>"


class MaglevPy:
    """Envoy's Maglev table (MAGLEV); the pure-Python reference of `MaglevC`."""

    __slots__ = ("_table", "_n", "_counts", "_m", "_min", "_max")

    table_size = property(lambda self: self._m, doc="Maglev table size M (prime)")
    min_entries_per_host = property(lambda self: self._min, doc="Envoy gauge maglev_lb.min_entries_per_host")
    max_entries_per_host = property(lambda self: self._max, doc="Envoy gauge maglev_lb.max_entries_per_host")

    def __init__(self, keys, weights, table_size: int = DEFAULT_TABLE_SIZE):
        table_size = operator.index(table_size)
        if not 0 < table_size <= MAX_TABLE_SIZE:
            raise ValueError(f"maglev table_size must be in [1, {MAX_TABLE_SIZE}], got {table_size}")
        if not is_prime(table_size):
            raise ValueError("The table size of maglev must be prime number")
        enc, norm, _, max_w = _normalize(keys, weights)
        m = self._m = table_size
        n = self._n = len(enc)
        self._counts = [0] * n
        if n == 0:
            self._table = []
            self._min = self._max = 0
            return
        order = sorted(range(n), key=lambda i: (enc[i], i))
        offset = [_xxh64(enc[i]) % m for i in order]
        skip = [_xxh64(enc[i], 1) % (m - 1) + 1 for i in order]
        weight = [norm[i] for i in order]
        target = [0.0] * n
        nxt = [0] * n
        cnt = [0] * n
        hosts = list(range(n))  # shared int objects for the table slots
        table = [None] * m
        filled = 0
        iteration = 1
        while filled < m:
            for j in range(n):
                if filled >= m:
                    break
                if iteration * weight[j] < target[j]:
                    continue
                target[j] += max_w
                o, s, k = offset[j], skip[j], nxt[j]
                c = (o + s * k) % m
                while table[c] is not None:
                    k += 1
                    c = (o + s * k) % m
                table[c] = hosts[order[j]]
                nxt[j] = k + 1
                cnt[j] += 1
                filled += 1
            iteration += 1
        self._table = table
        for j in range(n):
            self._counts[order[j]] = cnt[j]
        self._min = min(min(cnt), m)
        self._max = max(cnt)

    @property
    def size(self) -> int:
        return self._m if self._n else 0

    @property
    def n_hosts(self) -> int:
        return self._n

    def __len__(self) -> int:
        return len(self._table)

    def counts(self) -> list:
        """Table slots per host, in host order."""
        return list(self._counts)

    def table(self) -> list:
        """Host index of every slot (for tests and debugging)."""
        return list(self._table)

    def pick(self, h: int, attempt: int = 0) -> int:
        if h.__class__ is not int or not 0 <= h <= MASK64 or attempt:
            h, attempt = _check_hash(h, attempt)
        if not self._n:
            raise NoHealthyUpstream("MAGLEV table has no endpoints to pick from")
        if attempt:
            h ^= (1 << 64) - attempt
        return self._table[h % self._m]

    def __repr__(self):
        return f"<MaglevPy hosts={self._n} table_size={self._m}>"


def pick_excluding(table, h: int, exclude, retry_max_attempts: int = 5) -> int:
    """Envoy's host choice on a retry with the previous_hosts predicate (§6.13/§6.15).

    `exclude`: endpoint indexes already tried by this request. Attempts 0..retry_max_attempts are
    tried in order (Istio: host_selection_retry_max_attempts 5, so up to 6 picks); the first host
    not excluded wins, else the last pick is used anyway (thread_aware_lb_impl.cc chooseHost).
    """
    host = table.pick(h, 0)
    if not exclude or host not in exclude:
        return host
    for attempt in range(1, retry_max_attempts + 1):
        host = table.pick(h, attempt)
        if host not in exclude:
            return host
    return host


_c = _accel.load("ring")
RingHashC = getattr(_c, "RingHash", None)
MaglevC = getattr(_c, "Maglev", None)
RingHash = RingHashC or RingHashPy
Maglev = MaglevC or MaglevPy
hash_key = getattr(_c, "hash_key", None) or hash_key_py
fold_hash = getattr(_c, "fold_hash", None) or fold_hash_py
