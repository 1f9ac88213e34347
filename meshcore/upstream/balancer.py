"""Per-worker load balancers: round robin, random and least request (semantics.md §6.1-6.7).

Rules of this module:

* A balancer picks an endpoint *index* (position in the cluster's load assignment) over a fixed list
  of endpoints. It is built once per cluster per worker (`make_balancer`) and rebuilt when the
  endpoint list changes; all randomness comes from the `random.Random` passed in, so a seeded rng
  gives a reproducible sequence.
* `pick(book, exclude=None)`: `book` is anything with `rq_active(i) -> int` (a PoolBook); only
  LEAST_REQUEST reads it. `exclude` is the set of indexes already tried by this request (Envoy's
  `previous_hosts` retry predicate): a pick that lands in it is redone up to
  `host_selection_retry_max_attempts` (Istio: 5) more times, each redo advancing the balancer as a
  normal pick would; if every redo lands in `exclude` the last pick is returned anyway (Envoy's
  `ZoneAwareLoadBalancerBase::chooseHost` loop).
* The common path (`exclude` empty) allocates no containers; only int arithmetic.
* Weights: one positive int per endpoint; 0 is read as 1 (Istio's rule, §6.2); negatives raise.
  "Equal weights" means all weights equal, whatever the value.

Algorithms (Envoy parity, per worker):

* ROUND_ROBIN, equal weights: `hosts[idx++ % n]`, idx starting at a random value drawn at build.
* ROUND_ROBIN, unequal weights: Envoy's EDF scheduler. Host i's k-th turn has deadline k/w_i; turns
  are served in deadline order, ties going to the entry queued first (Envoy's `order_offset`). With
  static weights that tie rule is equivalent to "smaller weight first, then lower index", so the
  schedule is periodic with period W = sum(w) and host i gets exactly w_i of every W consecutive
  picks. When W <= SCHEDULE_TABLE_MAX the period is precomputed as a table and a pick is one list
  index; the start position is random over the period, like current Envoy's
  `EdfScheduler::createWithPicks(seed)`. Larger W falls back to a heap EDF with float deadlines
  (as Envoy) and a random pre-pick count below n (older Envoy's `seed % hosts.size()`).
  The table's tie-exact order can differ from Envoy's accumulated doubles only on rounding ties.
* RANDOM: `hosts[random % n]` over all hosts, weights ignored (§6.5). Envoy draws 64 random bits;
  here `rng.getrandbits(32) % n` (the cheapest C call; modulo bias n / 2**32, below 1e-6 for
  n < 4000). LEAST_REQUEST draws the same way.
* LEAST_REQUEST, equal weights: power of `choice_count` (default 2) choices, drawn uniformly *with
  replacement*; the first draw is kept unless a later one has strictly fewer active requests (§6.6).
* LEAST_REQUEST, unequal weights: Envoy's EDF with a dynamic weight (§6.7). The picked host is
  re-queued with deadline `current + 1 / effective_weight` where
  `effective_weight = w / (rq_active + 1) ** active_request_bias`, rq_active read at pick time (before
  the caller's rq_start), exactly when Envoy's `pickAndAdd` recomputes it. Other hosts keep the
  deadline computed when they were last queued, so a host's load is seen only when it is picked,
  as in Envoy. Build state: all hosts queued with their static weight (no request is known at
  build time) and a random number (< n) of pre-picks. This is EDF, not a weighted p2c.
"""
from __future__ import annotations

import heapq
import operator
import random
from typing import AbstractSet, Optional, Protocol, Sequence

__all__ = [
    "Balancer", "NoHealthyUpstream", "make_balancer", "KINDS",
    "SCHEDULE_TABLE_MAX", "HOST_SELECTION_RETRY_MAX_ATTEMPTS", "edf_schedule",
]

# Largest weighted-round-robin period (sum of weights) served from precomputed tables (schedule +
# successor, one pointer each per slot): at most 64 KiB per cluster per worker.
SCHEDULE_TABLE_MAX = 4096

# Istio sets `host_selection_retry_max_attempts: 5` next to the previous_hosts predicate.
HOST_SELECTION_RETRY_MAX_ATTEMPTS = 5

# Envoy LeastRequest defaults: choice_count 2, active_request_bias 1.0.
DEFAULT_CHOICE_COUNT = 2
DEFAULT_ACTIVE_REQUEST_BIAS = 1.0

KINDS = ("ROUND_ROBIN", "RANDOM", "LEAST_REQUEST")
_ALIASES = {"LEAST_CONN": "LEAST_REQUEST"}  # Istio maps the deprecated LEAST_CONN to LEAST_REQUEST

_heapreplace = heapq.heapreplace


class NoHealthyUpstream(LookupError):
    """The balancer has no endpoint to pick (Envoy: 503, flag UH, `no healthy upstream`)."""


class ActiveRequests(Protocol):
    def rq_active(self, ep: int) -> int: ...


class Balancer:
    """Base class: `pick(book, exclude=None) -> int`; subclasses implement `pick` and `_once`."""

    __slots__ = ("n", "weights", "retry_max_attempts")
    kind = ""

    def __init__(self, weights: tuple, retry_max_attempts: int):
        self.n = len(weights)
        self.weights = weights
        self.retry_max_attempts = retry_max_attempts

    def pick(self, book: Optional[ActiveRequests] = None,
             exclude: Optional[AbstractSet[int]] = None) -> int:
        i = self._once(book)
        if exclude and i in exclude:
            return self._repick(book, exclude, i)
        return i

    def _once(self, book) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _repick(self, book, exclude, i: int) -> int:
        for _ in range(self.retry_max_attempts):
            i = self._once(book)
            if i not in exclude:
                return i
        return i

    def __repr__(self):
        return f"<{type(self).__name__} kind={self.kind} n={self.n}>"


class _Empty(Balancer):
    __slots__ = ("kind",)

    def pick(self, book=None, exclude=None) -> int:
        raise NoHealthyUpstream(f"{self.kind} balancer has no endpoints to pick from")

    _once = pick


class _RoundRobin(Balancer):
    """Equal weights: strict rotation from a random start."""

    __slots__ = ("_next", "_succ")
    kind = "ROUND_ROBIN"

    def __init__(self, weights, retry_max_attempts, rng):
        super().__init__(weights, retry_max_attempts)
        self._next = rng.randrange(self.n)
        self._succ = tuple(range(1, self.n)) + (0,)  # i -> (i + 1) % n without arithmetic

    def pick(self, book=None, exclude=None) -> int:
        i = self._next
        self._next = self._succ[i]
        if exclude and i in exclude:
            return self._repick(book, exclude, i)
        return i

    def _once(self, book) -> int:
        i = self._next
        self._next = self._succ[i]
        return i


def edf_schedule(weights: Sequence[int]) -> list:
    """One period (sum(weights) picks) of Envoy's EDF schedule for static weights, from the initial
    state (all hosts queued in index order with deadline 1/w).

    Host i's k-th turn (k = 1..w_i) has deadline k/w_i; equal deadlines go to the smaller weight,
    then the lower index (what Envoy's insertion-order tie break amounts to with static weights).
    Float keys are exact here: equal rationals k/w divide to the same double, and for W within
    SCHEDULE_TABLE_MAX distinct ones are far more than one ulp apart.
    """
    hosts = []
    keys = []
    for i in sorted(range(len(weights)), key=lambda j: (weights[j], j)):
        w = weights[i]
        for k in range(1, w + 1):
            hosts.append(i)
            keys.append(k / w)
    order = sorted(range(len(keys)), key=keys.__getitem__)  # stable: ties keep (w, index) order
    return [hosts[j] for j in order]


class _WeightedRoundRobin(Balancer):
    """Unequal weights, small period: precomputed EDF period, random start."""

    __slots__ = ("_table", "_succ", "_pos")
    kind = "ROUND_ROBIN"

    def __init__(self, weights, retry_max_attempts, rng):
        super().__init__(weights, retry_max_attempts)
        self._table = tuple(edf_schedule(weights))
        period = len(self._table)
        self._succ = tuple(range(1, period)) + (0,)
        self._pos = rng.randrange(period)

    def pick(self, book=None, exclude=None) -> int:
        pos = self._pos
        self._pos = self._succ[pos]
        i = self._table[pos]
        if exclude and i in exclude:
            return self._repick(book, exclude, i)
        return i

    def _once(self, book) -> int:
        pos = self._pos
        self._pos = self._succ[pos]
        return self._table[pos]


class _EdfBase(Balancer):
    """Heap EDF with Envoy's entry order: [deadline, order_offset, index] lists, mutated in place
    and re-sifted with heapreplace (no allocation per pick)."""

    __slots__ = ("_heap", "_order", "_inv")

    def __init__(self, weights, retry_max_attempts, rng):
        super().__init__(weights, retry_max_attempts)
        self._inv = tuple(1.0 / w for w in weights)
        # Envoy queues the hosts in index order: order_offset = index.
        self._heap = [[self._inv[i], i, i] for i in range(self.n)]
        heapq.heapify(self._heap)
        self._order = self.n
        for _ in range(rng.randrange(self.n)):  # older Envoy: seed % n pre-picks
            self._advance(self._inv[self._heap[0][2]])

    def _advance(self, step: float) -> int:
        heap = self._heap
        top = heap[0]
        top[0] += step
        top[1] = self._order
        self._order += 1
        _heapreplace(heap, top)
        return top[2]


class _EdfRoundRobin(_EdfBase):
    """Unequal weights, period above SCHEDULE_TABLE_MAX: heap EDF with static weights."""

    __slots__ = ()
    kind = "ROUND_ROBIN"

    def pick(self, book=None, exclude=None) -> int:
        heap = self._heap
        top = heap[0]
        i = top[2]
        top[0] += self._inv[i]
        top[1] = self._order
        self._order += 1
        _heapreplace(heap, top)
        if exclude and i in exclude:
            return self._repick(book, exclude, i)
        return i

    def _once(self, book) -> int:
        top = self._heap[0]
        return self._advance(self._inv[top[2]])


class _Random(Balancer):
    """Uniform over all endpoints; weights ignored (Envoy random_lb)."""

    __slots__ = ("_bits",)
    kind = "RANDOM"

    def __init__(self, weights, retry_max_attempts, rng):
        super().__init__(weights, retry_max_attempts)
        self._bits = rng.getrandbits

    def pick(self, book=None, exclude=None) -> int:
        i = self._bits(32) % self.n
        if exclude and i in exclude:
            return self._repick(book, exclude, i)
        return i

    def _once(self, book) -> int:
        return self._bits(32) % self.n


class _LeastRequest(Balancer):
    """Equal weights: power of two choices with replacement (first draw wins ties)."""

    __slots__ = ("_bits",)
    kind = "LEAST_REQUEST"

    def __init__(self, weights, retry_max_attempts, rng):
        super().__init__(weights, retry_max_attempts)
        self._bits = rng.getrandbits

    def pick(self, book, exclude=None) -> int:
        n = self.n
        bits = self._bits
        i = bits(32) % n
        j = bits(32) % n
        if j != i and book.rq_active(j) < book.rq_active(i):
            i = j
        if exclude and i in exclude:
            return self._repick(book, exclude, i)
        return i

    def _once(self, book) -> int:
        n = self.n
        bits = self._bits
        i = bits(32) % n
        j = bits(32) % n
        if j != i and book.rq_active(j) < book.rq_active(i):
            return j
        return i


class _LeastRequestN(_LeastRequest):
    """Equal weights, choice_count != 2: power of N choices with replacement."""

    __slots__ = ("_choices",)

    def __init__(self, weights, retry_max_attempts, rng, choice_count):
        super().__init__(weights, retry_max_attempts, rng)
        self._choices = choice_count

    def pick(self, book, exclude=None) -> int:
        i = self._once(book)
        if exclude and i in exclude:
            return self._repick(book, exclude, i)
        return i

    def _once(self, book) -> int:
        n = self.n
        bits = self._bits
        i = bits(32) % n
        best = None
        for _ in range(self._choices - 1):
            j = bits(32) % n
            if j != i:
                if best is None:
                    best = book.rq_active(i)
                a = book.rq_active(j)
                if a < best:
                    i, best = j, a
        return i


class _WeightedLeastRequest(_EdfBase):
    """Unequal weights: EDF with effective weight w / (rq_active + 1) ** bias, recomputed for the
    picked host at pick time (Envoy's pickAndAdd)."""

    __slots__ = ("_bias",)
    kind = "LEAST_REQUEST"

    def __init__(self, weights, retry_max_attempts, rng, bias):
        super().__init__(weights, retry_max_attempts, rng)
        self._bias = bias

    def pick(self, book, exclude=None) -> int:
        heap = self._heap
        top = heap[0]
        i = top[2]
        bias = self._bias
        if bias == 1.0:
            top[0] += (book.rq_active(i) + 1) * self._inv[i]
        elif bias == 0.0:
            top[0] += self._inv[i]
        else:
            top[0] += (book.rq_active(i) + 1) ** bias * self._inv[i]
        top[1] = self._order
        self._order += 1
        _heapreplace(heap, top)
        if exclude and i in exclude:
            return self._repick(book, exclude, i)
        return i

    def _once(self, book) -> int:
        return _WeightedLeastRequest.pick(self, book)


def _normalise_weights(weights) -> tuple:
    out = []
    for w in weights:
        w = operator.index(w)
        if w < 0:
            raise ValueError(f"endpoint weights must be >= 0, got {w}")
        out.append(w if w > 0 else 1)
    return tuple(out)


def make_balancer(kind: str, weights: Sequence[int], rng: random.Random, *,
                  choice_count: int = DEFAULT_CHOICE_COUNT,
                  active_request_bias: float = DEFAULT_ACTIVE_REQUEST_BIAS,
                  host_selection_retry_max_attempts: int = HOST_SELECTION_RETRY_MAX_ATTEMPTS,
                  ) -> Balancer:
    """Build the balancer for one cluster's endpoints.

    Args:
      kind: "ROUND_ROBIN", "RANDOM" or "LEAST_REQUEST" ("LEAST_CONN" is accepted as Istio's alias).
      weights: one load-balancing weight per endpoint, in endpoint order (0 is read as 1).
      rng: the worker's random source; start positions are drawn from it now, random picks later.
      choice_count: LEAST_REQUEST equal-weight sample size (Envoy default 2, must be >= 2).
      active_request_bias: LEAST_REQUEST unequal-weight exponent (Envoy default 1.0, must be >= 0).
      host_selection_retry_max_attempts: extra picks when a pick lands in `exclude` (Istio: 5).

    Returns a Balancer. With no endpoints the balancer is built, but `pick` raises
    NoHealthyUpstream.

    Raises:
      ValueError: unknown kind or an out-of-range option or weight.
      TypeError: a weight that is not an int.
    """
    kind = _ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise ValueError(f"unknown load balancer kind {kind!r}; expected one of {', '.join(KINDS)}")
    if choice_count < 2:
        raise ValueError(f"choice_count must be >= 2, got {choice_count}")
    if not active_request_bias >= 0.0:
        raise ValueError(f"active_request_bias must be >= 0, got {active_request_bias}")
    if host_selection_retry_max_attempts < 0:
        raise ValueError("host_selection_retry_max_attempts must be >= 0, "
                         f"got {host_selection_retry_max_attempts}")
    w = _normalise_weights(weights)
    retries = host_selection_retry_max_attempts
    if not w:
        empty = _Empty(w, retries)
        empty.kind = kind
        return empty
    equal = min(w) == max(w)
    if kind == "RANDOM":
        return _Random(w, retries, rng)
    if kind == "ROUND_ROBIN":
        if equal:
            return _RoundRobin(w, retries, rng)
        if sum(w) <= SCHEDULE_TABLE_MAX:
            return _WeightedRoundRobin(w, retries, rng)
        return _EdfRoundRobin(w, retries, rng)
    # LEAST_REQUEST
    if equal:
        if choice_count == 2:
            return _LeastRequest(w, retries, rng)
        return _LeastRequestN(w, retries, rng, choice_count)
    return _WeightedLeastRequest(w, retries, rng, float(active_request_bias))
