"""Per-worker load balancers: round robin, random and least request (semantics.md §6.1-6.7).

Rules of this module:

* A balancer picks an endpoint *index* (position in the cluster's load assignment) over a fixed list
  of endpoints. It is built once per cluster per worker (`make_balancer`) and rebuilt when the
  endpoint list changes; all randomness comes from the `random.Random` passed in, so a seeded rng
  gives a reproducible sequence.
* `pick(book, exclude=None, attempts=-1)`: `book` is anything with `rq_active(i) -> int` (a
  PoolBook); only LEAST_REQUEST reads it. `exclude` is the set of indexes already tried by this
  request (Envoy's `previous_hosts` retry predicate): a pick that lands in it is redone up to
  `attempts` more times (the route's `host_selection_retry_max_attempts`; -1: the balancer's
  default, Istio's 5), each redo advancing the balancer as a
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
    "Balancer", "NoHealthyUpstream", "make_balancer", "stateless_kind", "KINDS",
    "SCHEDULE_TABLE_MAX", "HOST_SELECTION_RETRY_MAX_ATTEMPTS", "edf_schedule",
    "SlowStart", "slow_start_from_istio", "stamp_joined", "LocalityLb", "locality_lb_from_istio",
    "make_cluster_balancer",
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
             exclude: Optional[AbstractSet[int]] = None, attempts: int = -1) -> int:
        i = self._once(book)
        if exclude and i in exclude:
            return self._repick(book, exclude, i, attempts)
        return i

    def _once(self, book) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _repick(self, book, exclude, i: int, attempts: int = -1) -> int:
        for _ in range(self.retry_max_attempts if attempts < 0 else attempts):
            i = self._once(book)
            if i not in exclude:
                return i
        return i

    def __repr__(self):
        return f"<{type(self).__name__} kind={self.kind} n={self.n}>"


class _Empty(Balancer):
    __slots__ = ("kind",)

    def pick(self, book=None, exclude=None, attempts=-1) -> int:
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

    def pick(self, book=None, exclude=None, attempts=-1) -> int:
        i = self._next
        self._next = self._succ[i]
        if exclude and i in exclude:
            return self._repick(book, exclude, i, attempts)
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

    def pick(self, book=None, exclude=None, attempts=-1) -> int:
        pos = self._pos
        self._pos = self._succ[pos]
        i = self._table[pos]
        if exclude and i in exclude:
            return self._repick(book, exclude, i, attempts)
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

    def pick(self, book=None, exclude=None, attempts=-1) -> int:
        heap = self._heap
        top = heap[0]
        i = top[2]
        top[0] += self._inv[i]
        top[1] = self._order
        self._order += 1
        _heapreplace(heap, top)
        if exclude and i in exclude:
            return self._repick(book, exclude, i, attempts)
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

    def pick(self, book=None, exclude=None, attempts=-1) -> int:
        i = self._bits(32) % self.n
        if exclude and i in exclude:
            return self._repick(book, exclude, i, attempts)
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

    def pick(self, book, exclude=None, attempts=-1) -> int:
        n = self.n
        bits = self._bits
        i = bits(32) % n
        j = bits(32) % n
        if j != i and book.rq_active(j) < book.rq_active(i):
            i = j
        if exclude and i in exclude:
            return self._repick(book, exclude, i, attempts)
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

    def pick(self, book, exclude=None, attempts=-1) -> int:
        i = self._once(book)
        if exclude and i in exclude:
            return self._repick(book, exclude, i, attempts)
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

    def pick(self, book, exclude=None, attempts=-1) -> int:
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
            return self._repick(book, exclude, i, attempts)
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


def stateless_kind(balancer) -> str | None:
    """"LEAST_REQUEST" for an equal-weight power-of-two-choices balancer, "RANDOM" for an
    equal-weight random one, else None. Those two keep no state between picks, so the event loop
    may draw the same picks itself (ext/loop.pyx ClusterHandle.fast_pick: two uniform draws with
    replacement, the second kept only with strictly fewer active requests; or one draw)."""
    t = type(balancer)
    if t is _LeastRequest:
        return "LEAST_REQUEST"
    if t is _Random:
        return "RANDOM"
    return None


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


# ================================================================================================
# Slow start (loadBalancer.warmup) and locality load balancing (localityLbSetting)
#
# Both are compiled into the immutable ClusterPolicy (SlowStart, LocalityLb below) and applied by
# `make_cluster_balancer`, which wraps the balancers above.

import math as _math
import time as _time
from dataclasses import dataclass as _dataclass, replace as _replace

SLOW_START_REFRESH_MS = 250  # weights of hosts in slow start are recomputed this often
OVERPROVISIONING_FACTOR = 1.4  # Envoy's default overprovisioning factor (140 %)


@_dataclass(frozen=True)
class SlowStart:
    """Envoy's slow_start_config as Istio writes it for `warmup` (setWarmup) or the older
    `warmupDurationSecs`. During `window` seconds after an endpoint joins the cluster its weight is
    `weight * max(min_weight_percent / 100, time_factor ** (1 / aggression))`, with
    `time_factor = max(seconds since it joined, 1) / window`.

    `joined`: ((endpoint key, CLOCK_MONOTONIC ms when it joined), ...), stamped by the supervisor
    (`stamp_joined`) for endpoints added by a reload; endpoints of the first config, like every
    host Envoy starts with, are not in slow start relative to each other.
    """

    window: float
    aggression: float = 1.0
    min_weight_percent: float = 10.0
    joined: tuple = ()

    def factor(self, joined_ms: int, now_ms: int) -> float:
        """The weight multiplier of an endpoint that joined at `joined_ms` (1.0 once warm)."""
        age = (now_ms - joined_ms) / 1000.0
        if age >= self.window:
            return 1.0
        time_factor = max(age, 1.0) / self.window
        return max(self.min_weight_percent / 100.0, time_factor ** (1.0 / self.aggression))


def slow_start_from_istio(lb) -> SlowStart | None:
    """SlowStart for an istio.LoadBalancerSettings (None without warmup)."""
    w = getattr(lb, "warmup", None)
    if w is not None and w.duration is not None:
        return SlowStart(w.duration.seconds, 1.0 if w.aggression is None else float(w.aggression),
                         10.0 if w.minimum_percent is None else float(w.minimum_percent))
    d = getattr(lb, "warmup_duration_secs", None)
    if d is not None:
        # Envoy's own defaults for a bare slow_start_window: aggression 1.0, min weight 10 %
        return SlowStart(d.seconds)
    return None


def stamp_joined(previous, snapshot, now_ms: int):
    """The Snapshot with each slow-start cluster's `joined` times: kept for endpoints the previous
    Snapshot already had, `now_ms` for new ones. With no previous Snapshot nothing is stamped."""
    if previous is None:
        return snapshot
    changed = {}
    for name, policy in snapshot.clusters.items():
        ss = policy.slow_start
        if ss is None:
            continue
        old = previous.clusters.get(name)
        old_keys = {e.key for e in old.endpoints} if old is not None else set()
        old_joined = dict(old.slow_start.joined) if old is not None and old.slow_start is not None else {}
        joined = []
        for e in policy.endpoints:
            if e.key in old_joined:
                if now_ms - old_joined[e.key] < ss.window * 1000:
                    joined.append((e.key, old_joined[e.key]))
            elif old is not None and e.key not in old_keys:
                joined.append((e.key, now_ms))
        joined = tuple(joined)
        if joined != ss.joined:
            changed[name] = _replace(policy, slow_start=_replace(ss, joined=joined))
    if not changed:
        return snapshot
    return _replace(snapshot, clusters={**snapshot.clusters, **changed})


class _SlowStartBalancer(Balancer):
    """Weights scaled by SlowStart while any endpoint is warming up, then the plain balancer."""

    __slots__ = ("kind", "_rng", "_base", "_joined", "_slow", "_clock", "_inner", "_next", "_until",
                 "_plain")

    def __init__(self, kind, weights, rng, slow: SlowStart, keys, clock, retry_max_attempts):
        super().__init__(weights, retry_max_attempts)
        self.kind = kind
        self._rng = rng
        self._slow = slow
        self._clock = clock
        joined = dict(slow.joined)
        self._joined = tuple(joined.get(k) for k in keys)
        stamps = [j for j in self._joined if j is not None]
        self._until = (max(stamps) + slow.window * 1000) if stamps else 0
        self._plain = None
        self._inner = None
        self._next = 0

    def _refresh(self, now: int) -> Balancer:
        if now >= self._until:
            if self._plain is None:
                self._plain = make_balancer(self.kind, self.weights, self._rng,
                                            host_selection_retry_max_attempts=self.retry_max_attempts)
            self._inner = self._plain
            self._next = _math.inf
            return self._inner
        scaled = tuple(w * (self._slow.factor(j, now) if j is not None else 1.0)
                       for w, j in zip(self.weights, self._joined))
        cls = _EdfRoundRobin if self.kind == "ROUND_ROBIN" else _WeightedLeastRequest
        if cls is _WeightedLeastRequest:
            self._inner = cls(scaled, self.retry_max_attempts, self._rng, DEFAULT_ACTIVE_REQUEST_BIAS)
        else:
            self._inner = cls(scaled, self.retry_max_attempts, self._rng)
        self._next = now + SLOW_START_REFRESH_MS
        return self._inner

    def pick(self, book=None, exclude=None, attempts=-1) -> int:
        inner = self._inner
        if inner is None or self._next != _math.inf:
            now = self._clock()
            if inner is None or now >= self._next:
                inner = self._refresh(now)
        return inner.pick(book, exclude, attempts)

    def _once(self, book) -> int:
        return self.pick(book)


@_dataclass(frozen=True)
class LocalityLb:
    """Envoy priorities and locality weights as Istio assigns them from this proxy's locality
    (--locality) and the endpoints' `locality` (istio/istio loadbalancer.go).

    priority: per endpoint, 0 = highest; -1 = not a destination (a locality `distribute` leaves
    out). group: per endpoint, its locality group. group_weight: per group, the locality weight
    of locality-weighted load balancing (`distribute`); () when localities are not weighted.
    """

    priority: tuple
    group: tuple
    group_weight: tuple = ()


def _split_locality(loc: str) -> tuple[str, str, str]:
    parts = (loc or "").split("/", 2)
    parts += [""] * (3 - len(parts))
    return parts[0], parts[1], parts[2]


def _locality_match(proxy: str, rule: str) -> bool:
    """Istio's util.LocalityMatch: `rule` region/zone/subzone, each `*` (or, below region, unset)
    matching anything."""
    pr, pz, ps = _split_locality(proxy)
    rr, rz, rs = _split_locality(rule)
    return ((rr == "*" or pr == rr) and (rz in ("*", "") or pz == rz) and (rs in ("*", "") or ps == rs))


def _lb_priority(proxy: str, endpoint: str) -> int:
    """Istio's util.LbPriority."""
    pr, pz, ps = _split_locality(proxy)
    er, ez, es = _split_locality(endpoint)
    if pr == er:
        if pz == ez:
            return 0 if ps == es else 1
        return 2
    return 3


def locality_lb_from_istio(setting, endpoints, proxy_locality: str, outlier_detection: bool) -> LocalityLb | None:
    """LocalityLb for a cluster, or None when locality plays no part (no endpoint has one,
    locality load balancing is disabled, or neither `distribute` nor failover applies)."""
    if setting is not None and setting.enabled is False:
        return None
    if not endpoints or not any(e.locality for e in endpoints):
        return None
    localities = list(dict.fromkeys(e.locality for e in endpoints))
    group_of = {loc: i for i, loc in enumerate(localities)}
    group = tuple(group_of[e.locality] for e in endpoints)
    if setting is not None and setting.distribute:
        for rule in setting.distribute:
            if not _locality_match(proxy_locality, rule.from_ or ""):
                continue
            base = [0] * len(localities)
            for e in endpoints:
                base[group_of[e.locality]] += e.weight
            weights = [0] * len(localities)
            unmatched = set(range(len(localities)))
            for to, w in rule.to.items():
                dest = [g for g in sorted(unmatched) if _locality_match(localities[g], to)]
                total = sum(base[g] for g in dest)
                for g in dest:
                    unmatched.discard(g)
                    share = base[g] * w / total if total else 0
                    if share > 0:
                        weights[g] = _math.ceil(share)
            priority = tuple(-1 if group_of[e.locality] in unmatched or not weights[group_of[e.locality]]
                             else 0 for e in endpoints)
            return LocalityLb(priority, group, tuple(weights))
        return None
    if not outlier_detection:
        return None  # Istio applies failover only with outlier detection (Envoy could not fail over)
    failover = setting.failover if setting is not None else ()
    pr = _split_locality(proxy_locality)[0]
    raw = []
    for e in endpoints:
        p = _lb_priority(proxy_locality, e.locality)
        if p == 3:
            for f in failover:
                if f.from_ == pr:
                    if _split_locality(e.locality)[0] != f.to:
                        p = 4
                    break
        raw.append(p)
    order = {p: i for i, p in enumerate(sorted(set(raw)))}
    return LocalityLb(tuple(order[p] for p in raw), group)


class _BookView:
    """A PoolBook seen through a sub-balancer's index map (LEAST_REQUEST reads rq_active)."""

    __slots__ = ("book", "index")

    def __init__(self, index):
        self.book = None
        self.index = index

    def rq_active(self, i: int) -> int:
        return self.book.rq_active(self.index[i])


class _LocalityBalancer(Balancer):
    """Envoy's priority and locality-weighted selection over per-locality balancers.

    All hosts healthy: the highest priority takes every request (its health is >= 100 % / 1.4).
    `pick_healthy(book, exclude, healthy)`, used while hosts are ejected: Envoy's priority load
    (each priority's healthy share times the overprovisioning factor 1.4, spilling what it cannot
    carry to the next), then, with locality weights, a locality by weight times its availability,
    then a host of that locality with the cluster's balancer.
    """

    __slots__ = ("kind", "_rng", "_levels", "_weighted", "_edf")

    def __init__(self, kind, weights, rng, loc: LocalityLb, retry_max_attempts):
        super().__init__(weights, retry_max_attempts)
        self.kind = kind
        self._rng = rng
        self._weighted = bool(loc.group_weight)
        levels: dict = {}
        for i, p in enumerate(loc.priority):
            if p < 0:
                continue
            key = (p, loc.group[i] if self._weighted else 0)
            levels.setdefault(p, {}).setdefault(key[1], []).append(i)
        self._levels = []  # per priority: [(group weight, index tuple, balancer, view), ...]
        for p in sorted(levels):
            entries = []
            for g, idx in levels[p].items():
                idx = tuple(idx)
                view = _BookView(idx)
                b = make_balancer(kind, [weights[i] for i in idx], rng,
                                  host_selection_retry_max_attempts=retry_max_attempts)
                gw = loc.group_weight[g] if self._weighted else 1
                entries.append((gw, idx, b, view))
            self._levels.append(entries)
        # smooth weighted round robin state over each priority's localities
        self._edf = [[0.0] * len(entries) for entries in self._levels]

    def _pick_in(self, level: int, book, weights) -> int:
        entries = self._levels[level]
        if len(entries) == 1:
            k = 0
        else:
            cur = self._edf[level]
            total = 0.0
            k = -1
            for j, w in enumerate(weights):
                cur[j] += w
                total += w
                if w > 0 and (k < 0 or cur[j] > cur[k]):
                    k = j
            if k < 0:
                return -1
            cur[k] -= total
        _, idx, b, view = entries[k]
        view.book = book
        return idx[b.pick(view)]

    def pick(self, book=None, exclude=None, attempts=-1) -> int:
        if not self._levels:
            raise NoHealthyUpstream("no endpoint in a selected locality")
        weights = [e[0] for e in self._levels[0]]
        i = self._pick_in(0, book, weights)
        if exclude and i in exclude:
            for _ in range(self.retry_max_attempts if attempts < 0 else attempts):
                i = self._pick_in(0, book, weights)
                if i not in exclude:
                    break
        return i

    _once = pick

    def pick_healthy(self, book, exclude, healthy) -> int:
        """A host among `healthy` (indexes), or -1 when no priority has one."""
        ok = set(healthy)
        loads = []
        remaining = 100
        for entries in self._levels:
            total = sum(len(e[1]) for e in entries)
            up = sum(1 for e in entries for i in e[1] if i in ok)
            health = min(100, int(OVERPROVISIONING_FACTOR * up * 100 / total)) if total else 0
            take = min(remaining, health)
            loads.append(take)
            remaining -= take
        if sum(loads) == 0:
            return -1
        draw = self._rng.getrandbits(32) % sum(loads)
        level = 0
        for level, load in enumerate(loads):
            if draw < load:
                break
            draw -= load
        entries = self._levels[level]
        weights = []
        for gw, idx, _, _ in entries:
            up = sum(1 for i in idx if i in ok)
            weights.append(gw * min(1.0, OVERPROVISIONING_FACTOR * up / len(idx)) if idx else 0)
        avoid = ok.difference(exclude) if exclude else ok
        for _ in range(2 * self.n):
            i = self._pick_in(level, book, weights)
            if i in avoid or (i in ok and not avoid):
                return i
        pool = sorted(i for e in entries for i in e[1] if i in (avoid or ok))
        return pool[self._rng.getrandbits(32) % len(pool)] if pool else -1


def make_cluster_balancer(policy, rng: random.Random, clock=None) -> Balancer:
    """The balancer for a ClusterPolicy: its `lb` kind over its endpoints' weights, with slow start
    (`policy.slow_start`) and priorities/locality weights (`policy.locality_lb`) when configured.
    `clock()`: CLOCK_MONOTONIC milliseconds (the supervisor's `joined` stamps use the same clock)."""
    weights = [e.weight for e in policy.endpoints]
    loc = getattr(policy, "locality_lb", None)
    if loc is not None and policy.endpoints:
        return _LocalityBalancer(policy.lb, _normalise_weights(weights), rng, loc,
                                 HOST_SELECTION_RETRY_MAX_ATTEMPTS)
    slow = getattr(policy, "slow_start", None)
    if slow is not None and slow.joined and policy.endpoints:
        clock = clock or (lambda: int(_time.monotonic() * 1000))
        return _SlowStartBalancer(policy.lb, _normalise_weights(weights), rng, slow,
                                  [e.key for e in policy.endpoints], clock, HOST_SELECTION_RETRY_MAX_ATTEMPTS)
    return make_balancer(policy.lb, weights, rng)
