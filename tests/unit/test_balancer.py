"""Balancers: round robin (rotation, EDF weights), random, least request, retry exclusion."""
import random
from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.upstream import balancer as bal
from meshcore.upstream.balancer import NoHealthyUpstream, edf_schedule, make_balancer
from meshcore.upstream.pool import PoolBookPy


class Load:
    """Minimal `book`: fixed active-request counts."""

    def __init__(self, active):
        self.active = list(active)

    def rq_active(self, i):
        return self.active[i]


def picks(b, k, book=None, exclude=None):
    return [b.pick(book, exclude) for _ in range(k)]


def envoy_edf(weights, k, prepicks=0):
    """Reference model of Envoy's EdfScheduler with exact arithmetic: entries (deadline, order_offset),
    initial deadline 1/w in index order, each pick re-queued at deadline + 1/w with the next offset."""
    queue = [(Fraction(1, w), i, i) for i, w in enumerate(weights)]
    order = len(weights)
    out = []
    for step in range(prepicks + k):
        queue.sort()
        d, _, i = queue.pop(0)
        queue.append((d + Fraction(1, weights[i]), order, i))
        order += 1
        if step >= prepicks:
            out.append(i)
    return out


# --- ROUND_ROBIN ---------------------------------------------------------------------------------

def test_rr_equal_weights_strict_rotation():
    b = make_balancer("ROUND_ROBIN", [1, 1, 1, 1], random.Random(7))
    seq = picks(b, 12)
    start = seq[0]
    assert seq == [(start + k) % 4 for k in range(12)]


def test_rr_equal_nonunit_weights_rotate():
    b = make_balancer("ROUND_ROBIN", [5, 5, 5], random.Random(1))
    seq = picks(b, 9)
    assert seq == [(seq[0] + k) % 3 for k in range(9)]


def test_rr_start_is_random():
    starts = Counter(make_balancer("ROUND_ROBIN", [1] * 5, random.Random(s)).pick(None)
                     for s in range(200))
    assert set(starts) == set(range(5))


def test_rr_single_endpoint():
    b = make_balancer("ROUND_ROBIN", [3], random.Random(0))
    assert picks(b, 5) == [0] * 5


def test_rr_weighted_exact_proportions():
    for seed in range(10):
        b = make_balancer("ROUND_ROBIN", [1, 2, 3], random.Random(seed))
        assert Counter(picks(b, 600)) == {0: 100, 1: 200, 2: 300}


def test_rr_weighted_every_period_exact():
    w = [1, 4, 2, 7]
    b = make_balancer("ROUND_ROBIN", w, random.Random(3))
    seq = picks(b, sum(w) * 5)
    for k in range(0, len(seq) - sum(w) + 1):  # any window of one period, not only aligned ones
        assert Counter(seq[k:k + sum(w)]) == dict(enumerate(w))


def test_rr_weighted_interleaves():
    # EDF spreads picks: with weights 1,2,3 the heaviest host never gets 3 in a row
    b = make_balancer("ROUND_ROBIN", [1, 2, 3], random.Random(5))
    seq = picks(b, 60)
    assert all(seq[k:k + 3] != [2, 2, 2] for k in range(len(seq) - 2))


def test_edf_schedule_matches_envoy_scheduler():
    assert edf_schedule([1, 2, 3]) == [2, 1, 2, 0, 1, 2] == envoy_edf([1, 2, 3], 6)
    # ties go to the entry queued first, which is NOT plain index order: weights 2,1
    assert edf_schedule([2, 1]) == envoy_edf([2, 1], 3) == [0, 1, 0]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=7))
def test_edf_schedule_property(weights):
    period = edf_schedule(weights)
    assert period == envoy_edf(weights, sum(weights))
    # periodic: the next period is identical
    assert envoy_edf(weights, sum(weights), prepicks=sum(weights)) == period


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=2, max_size=6).filter(lambda w: len(set(w)) > 1),
       st.integers(0, 2**32))
def test_rr_weighted_is_a_rotation_of_the_period(weights, seed):
    b = make_balancer("ROUND_ROBIN", weights, random.Random(seed))
    seq = picks(b, 2 * sum(weights))
    period = edf_schedule(weights)
    start = seq[0:sum(weights)]
    assert any(start == period[k:] + period[:k] for k in range(len(period)))
    assert seq[:sum(weights)] == seq[sum(weights):]


def test_rr_weighted_start_is_random():
    firsts = Counter(tuple(picks(make_balancer("ROUND_ROBIN", [1, 3], random.Random(s)), 4))
                     for s in range(100))
    assert len(firsts) == 4  # all four rotations of the period occur


def test_rr_large_period_uses_heap_edf():
    w = [3000, 1000, 500, 1]
    b = make_balancer("ROUND_ROBIN", w, random.Random(2))
    assert type(b).__name__ == "_EdfRoundRobin"
    c = Counter(picks(b, sum(w) * 2))
    for i, wi in enumerate(w):
        assert abs(c[i] - 2 * wi) <= 2  # float deadlines, as in Envoy: exact up to rounding


def test_rr_heap_fallback_matches_table(monkeypatch):
    w = [2, 5, 3, 1]
    monkeypatch.setattr(bal, "SCHEDULE_TABLE_MAX", 0)
    heap_b = make_balancer("ROUND_ROBIN", w, random.Random(11))
    assert type(heap_b).__name__ == "_EdfRoundRobin"
    seq = picks(heap_b, sum(w) * 3)
    period = edf_schedule(w)
    assert any(seq[:sum(w)] == period[k:] + period[:k] for k in range(len(period)))
    assert Counter(seq) == {i: 3 * x for i, x in enumerate(w)}


# --- RANDOM ------------------------------------------------------------------------------------

def test_random_roughly_uniform_and_ignores_weights():
    b = make_balancer("RANDOM", [1, 1, 100, 1], random.Random(42))
    c = Counter(picks(b, 8000))
    assert set(c) == {0, 1, 2, 3}
    for i in range(4):
        assert 1700 < c[i] < 2300, c


def test_random_reproducible_with_seed():
    a = picks(make_balancer("RANDOM", [1] * 7, random.Random(9)), 50)
    b = picks(make_balancer("RANDOM", [1] * 7, random.Random(9)), 50)
    assert a == b
    assert all(0 <= i < 7 for i in a)


# --- LEAST_REQUEST -----------------------------------------------------------------------------

def test_lr_prefers_less_loaded():
    book = Load([10, 0, 0, 0])
    b = make_balancer("LEAST_REQUEST", [1, 1, 1, 1], random.Random(3))
    c = Counter(picks(b, 4000, book))
    # host 0 wins only when both draws land on it: p = 1/16 -> ~250 of 4000
    assert c[0] < 450, c
    for i in (1, 2, 3):
        assert c[i] > 1000, c


def test_lr_two_hosts_busier_still_gets_a_quarter():
    book = Load([5, 0])
    c = Counter(picks(make_balancer("LEAST_REQUEST", [1, 1], random.Random(8)), 8000, book))
    assert 1600 < c[0] < 2400, c  # draws with replacement: (0, 0) has p = 1/4


def test_lr_ties_keep_first_draw():
    # all equal load: p2c degenerates to the first draw, i.e. uniform random
    book = Load([0, 0, 0])
    c = Counter(picks(make_balancer("LEAST_REQUEST", [1, 1, 1], random.Random(4)), 6000, book))
    for i in range(3):
        assert 1700 < c[i] < 2300, c


def test_lr_equal_first_draw_semantics():
    # the first of the two draws is kept on ties; replaced only by a strictly smaller count
    rng = random.Random(123)
    twin = random.Random(123)
    n = 5
    book = Load([3, 1, 4, 1, 5])
    b = make_balancer("LEAST_REQUEST", [1] * n, rng)
    for _ in range(500):
        i, j = twin.getrandbits(32) % n, twin.getrandbits(32) % n
        want = j if book.active[j] < book.active[i] else i
        assert b.pick(book) == want


def test_lr_with_pool_book():
    book = PoolBookPy(3)
    for _ in range(10):
        book.rq_start(1)
    c = Counter(picks(make_balancer("LEAST_REQUEST", [1, 1, 1], random.Random(1)), 3000, book))
    assert c[1] < c[0] / 2 and c[1] < c[2] / 2


def test_lr_choice_count():
    book = Load([10, 0, 0, 0])
    b = make_balancer("LEAST_REQUEST", [1] * 4, random.Random(6), choice_count=4)
    c = Counter(picks(b, 4000, book))
    assert c[0] < 60, c  # needs all 4 draws on host 0: p = 1/256


def test_lr_weighted_no_load_follows_weights():
    book = Load([0, 0, 0])
    b = make_balancer("LEAST_REQUEST", [1, 2, 3], random.Random(2))
    assert Counter(picks(b, 600, book)) == {0: 100, 1: 200, 2: 300}


def test_lr_weighted_prefers_less_loaded():
    book = Load([10, 0, 0])
    b = make_balancer("LEAST_REQUEST", [2, 1, 1], random.Random(2))
    c = Counter(picks(b, 4000, book))
    # effective weights 2/11, 1, 1: host 0 gets ~ 0.18/2.18 = 8 % instead of 50 %
    assert c[0] < 500, c
    assert c[1] > 1500 and c[2] > 1500, c


def test_lr_weighted_bias_zero_is_weighted_rr():
    book = Load([50, 0, 0])
    b = make_balancer("LEAST_REQUEST", [1, 2, 3], random.Random(2), active_request_bias=0.0)
    assert Counter(picks(b, 600, book)) == {0: 100, 1: 200, 2: 300}


def test_lr_weighted_other_bias():
    book = Load([3, 0])
    b = make_balancer("LEAST_REQUEST", [2, 1], random.Random(2), active_request_bias=0.5)
    c = Counter(picks(b, 3000, book))
    # effective weights 2/sqrt(4) = 1 and 1 -> about even
    assert 1300 < c[0] < 1700, c


def test_lr_weighted_reads_load_of_picked_host_only():
    class Spy(Load):
        def __init__(self, active):
            super().__init__(active)
            self.asked = []

        def rq_active(self, i):
            self.asked.append(i)
            return super().rq_active(i)

    book = Spy([0, 0, 0])
    b = make_balancer("LEAST_REQUEST", [1, 2, 4], random.Random(0))
    for _ in range(20):
        i = b.pick(book)
        assert book.asked == [i]
        book.asked.clear()


# --- exclude (previous_hosts predicate) --------------------------------------------------------

def test_exclude_rr_skips_tried_host():
    b = make_balancer("ROUND_ROBIN", [1, 1], random.Random(0))
    first = b.pick(None)
    # the next pick would be the other host; exclude it -> RR advances to `first` again
    assert b.pick(None, exclude={1 - first}) == first
    assert b.pick(None, exclude=frozenset({first})) == 1 - first


def test_exclude_all_keeps_last_pick_after_five_repicks():
    b = make_balancer("ROUND_ROBIN", [1, 1, 1], random.Random(0))
    twin = make_balancer("ROUND_ROBIN", [1, 1, 1], random.Random(0))
    expected = picks(twin, 6)[-1]  # 1 pick + 5 re-picks
    assert b.pick(None, exclude={0, 1, 2}) == expected
    assert b.pick(None) == twin.pick(None)  # state advanced by exactly 6


def test_exclude_repick_limit_option():
    b = make_balancer("ROUND_ROBIN", [1, 1, 1, 1], random.Random(0),
                      host_selection_retry_max_attempts=0)
    first = b.pick(None)
    nxt = (first + 1) % 4
    assert b.pick(None, exclude={nxt}) == nxt  # no re-pick allowed: keep the excluded pick


@pytest.mark.parametrize("kind", ["ROUND_ROBIN", "RANDOM", "LEAST_REQUEST"])
@pytest.mark.parametrize("weights", [[1, 1, 1, 1], [1, 2, 3, 4]])
def test_exclude_avoids_tried_hosts(kind, weights):
    b = make_balancer(kind, weights, random.Random(17))
    book = Load([0, 0, 0, 0])
    hits = Counter()
    for _ in range(400):
        i = b.pick(book, exclude={0, 1})
        hits[i] += 1
    # all 6 picks land in {0,1} with p = (1/2)**6 -> ~6 of 400 for RANDOM / equal LR, 0 for RR
    assert hits[0] + hits[1] <= 20, hits
    assert hits[2] > 0 and hits[3] > 0


def test_exclude_empty_set_is_plain_pick():
    a = make_balancer("RANDOM", [1] * 5, random.Random(1))
    b = make_balancer("RANDOM", [1] * 5, random.Random(1))
    assert picks(a, 20, exclude=set()) == picks(b, 20)


# --- construction ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ROUND_ROBIN", "RANDOM", "LEAST_REQUEST"])
def test_no_endpoints_raises_on_pick(kind):
    b = make_balancer(kind, [], random.Random(0))
    with pytest.raises(NoHealthyUpstream, match="no endpoints"):
        b.pick(Load([]))


def test_unknown_kind():
    with pytest.raises(ValueError, match="RING_HASH"):
        make_balancer("RING_HASH", [1], random.Random(0))


def test_least_conn_alias():
    assert make_balancer("LEAST_CONN", [1, 1], random.Random(0)).kind == "LEAST_REQUEST"


def test_weights_validation():
    # 0 reads as 1 (Istio), so [0, 1] is equal weights
    b = make_balancer("ROUND_ROBIN", [0, 1], random.Random(0))
    assert type(b).__name__ == "_RoundRobin"
    with pytest.raises(ValueError):
        make_balancer("ROUND_ROBIN", [1, -1], random.Random(0))
    with pytest.raises(TypeError):
        make_balancer("ROUND_ROBIN", [1, 1.5], random.Random(0))
    with pytest.raises(ValueError):
        make_balancer("LEAST_REQUEST", [1, 1], random.Random(0), choice_count=1)
    with pytest.raises(ValueError):
        make_balancer("LEAST_REQUEST", [1, 2], random.Random(0), active_request_bias=-1.0)


def test_rng_drives_everything():
    for kind in ("ROUND_ROBIN", "RANDOM", "LEAST_REQUEST"):
        for w in ([1, 1, 1], [3, 1, 2]):
            book = Load([1, 0, 2])
            a = picks(make_balancer(kind, w, random.Random(99)), 40, book)
            b = picks(make_balancer(kind, w, random.Random(99)), 40, book)
            assert a == b
