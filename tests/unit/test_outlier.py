"""Outlier detection (semantics §2c, §4) over host/cluster rows in a bytearray; explicit now_ms.

Every test runs on the pure Cells and on the compiled Cells (the compiled parameter fails when the
extension is not built, unless MESHCORE_NO_EXTENSIONS=1).
"""
import os

import msgspec
import pytest

from meshcore.config import istio
from meshcore.shm import atomics
from meshcore.shm.layout import H_STATE, ClusterRow, HostRow, Layout
from meshcore.upstream import outlier as od
from meshcore.upstream.outcome import (
    Outcome,
    is_local_origin,
    outcome_for_status,
)
from meshcore.upstream.outlier import (
    DISABLED,
    OutlierPolicy,
    availability,
    ejection_ms,
    healthy_set_or_panic,
    is_available,
    mep_allows,
    next_backoff,
    on_result,
    outlier_policy_from_istio,
    recount_ejections,
    sweep,
)

NO_EXT = bool(os.environ.get("MESHCORE_NO_EXTENSIONS"))
S, E5, GW = Outcome.SUCCESS, Outcome.HTTP_5XX, Outcome.GATEWAY_ERROR
CF, TO, RS = Outcome.CONNECT_FAILURE, Outcome.TIMEOUT, Outcome.RESET


@pytest.fixture(params=["pure", "compiled"])
def Cells(request):
    if request.param == "pure":
        return atomics.CellsPy
    if atomics.CellsC is None:
        if NO_EXT:
            pytest.skip("MESHCORE_NO_EXTENSIONS=1: pure-Python run")
        pytest.fail("meshcore._ext.shmatomic is not built")
    return atomics.CellsC


class Cluster:
    """n hosts and one cluster row over a fresh bytearray."""

    def __init__(self, Cells, n):
        self.layout = Layout(max_hosts=max(n, 1), max_clusters=1, workers=1)
        self.buf = bytearray(self.layout.size)
        self.cells = Cells(self.buf)
        self.hosts = [HostRow(self.cells, self.layout.host_off(i), i) for i in range(n)]
        self.row = ClusterRow(self.cells, self.layout.cluster_off(0), 0)

    def put(self, i, outcome, now, policy, times=1, rand100=0):
        """Report `outcome` `times` times; return the list of on_result results."""
        return [on_result(self.hosts[i], self.row, outcome, now, policy, len(self.hosts), rand100)
                for _ in range(times)]

    def stat(self, name):
        return self.row.get(name)


@pytest.fixture
def make(Cells):
    return lambda n=5: Cluster(Cells, n)


P5 = OutlierPolicy(max_ejection_percent=100)  # defaults, but no ejection cap


# ------------------------------------------------------------------------------------------------
# Outcome helpers


def test_outcome_for_status():
    assert outcome_for_status(200) is S and outcome_for_status(404) is S
    assert outcome_for_status(499) is S and outcome_for_status(600) is S
    assert outcome_for_status(500) is E5 and outcome_for_status(501) is E5
    assert outcome_for_status(505) is E5 and outcome_for_status(599) is E5
    for code in (502, 503, 504):
        assert outcome_for_status(code) is GW
    assert [is_local_origin(o) for o in Outcome] == [False, False, False, True, True, True]


def test_classifier_outlier_column():
    from meshcore.policy import classify as cl
    assert cl.classify(200).outlier is S
    assert cl.classify(503).outlier is GW
    assert cl.classify(500).outlier is E5
    assert cl.classify(cl.Kind.CONNECT_FAILURE).outlier is CF
    assert cl.classify(cl.Kind.CONNECT_TIMEOUT).outlier is CF
    assert cl.classify(cl.Kind.RESET_BEFORE_RESPONSE).outlier is RS
    assert cl.classify(cl.Kind.PROTOCOL_ERROR).outlier is RS
    assert cl.classify(cl.Kind.PER_TRY_TIMEOUT).outlier is TO
    assert cl.classify(cl.Kind.OVERFLOW).outlier is None


# ------------------------------------------------------------------------------------------------
# Policy and Istio translation


def _od(**yaml):
    return msgspec.convert(yaml, istio.OutlierDetection, dec_hook=istio.dec_hook)


def test_policy_defaults_are_envoy_defaults_as_istio_applies_them():
    p = OutlierPolicy()
    assert (p.interval_ms, p.base_ejection_time_ms, p.max_ejection_time_ms) == (10_000, 30_000,
                                                                              300_000)
    assert p.max_ejection_percent == 10
    assert (p.consecutive_5xx, p.enforcing_consecutive_5xx) == (5, 100)
    assert (p.consecutive_gateway_failure, p.enforcing_consecutive_gateway_failure) == (5, 0)
    assert (p.consecutive_local_origin_failure,
            p.enforcing_consecutive_local_origin_failure) == (5, 100)
    assert p.healthy_panic_threshold == 0.0 and not p.split_external_local_origin_errors
    assert not p.check_mep_on_first_eject and not p.always_eject_one_host


def test_no_block_means_no_detector_and_panic_50():
    assert outlier_policy_from_istio(None) == (DISABLED, ())
    assert not DISABLED.enabled and DISABLED.healthy_panic_threshold == 50.0


def test_empty_block_gives_defaults():
    p, w = outlier_policy_from_istio(_od())
    assert p == OutlierPolicy() and w == ()


def test_durations_and_percentages_copied():
    p, w = outlier_policy_from_istio(_od(interval="1s", baseEjectionTime="1m",
                                         maxEjectionPercent=100, minHealthPercent=30))
    assert (p.interval_ms, p.base_ejection_time_ms) == (1000, 60_000)
    assert p.max_ejection_percent == 100 and p.healthy_panic_threshold == 30.0
    assert p.max_ejection_time_ms == 300_000 and w == ()


def test_string_durations_parsed_too():
    class Raw:  # a duck-typed block whose durations are plain strings
        interval = "250ms"
        base_ejection_time = "1.5s"
    p, _ = outlier_policy_from_istio(Raw())
    assert (p.interval_ms, p.base_ejection_time_ms) == (250, 1500)


def test_max_ejection_percent_zero_is_unset():
    p, _ = outlier_policy_from_istio(_od(maxEjectionPercent=0))
    assert p.max_ejection_percent == 10


def test_consecutive_errors_as_istio_1_4():
    p, w = outlier_policy_from_istio(_od(consecutiveErrors=2))
    assert (p.consecutive_gateway_failure, p.enforcing_consecutive_gateway_failure) == (2, 100)
    assert (p.consecutive_5xx, p.enforcing_consecutive_5xx) == (5, 0)
    assert len(w) == 1 and "consecutiveErrors is deprecated" in w[0] and "1.7" in w[0]


def test_consecutive_errors_newer_fields_override_their_parts():
    p, w = outlier_policy_from_istio(_od(consecutiveErrors=2, consecutive5xxErrors=7))
    assert (p.consecutive_gateway_failure, p.enforcing_consecutive_gateway_failure) == (2, 100)
    assert (p.consecutive_5xx, p.enforcing_consecutive_5xx) == (7, 100)
    p, _ = outlier_policy_from_istio(_od(consecutiveErrors=2, consecutiveGatewayErrors=4))
    assert (p.consecutive_gateway_failure, p.enforcing_consecutive_gateway_failure) == (4, 100)
    assert p.enforcing_consecutive_5xx == 0


def test_consecutive_errors_not_positive_ignored_with_warning():
    p, w = outlier_policy_from_istio(_od(consecutiveErrors=0))
    assert p == OutlierPolicy() and "not positive" in w[0]


def test_consecutive_5xx_and_gateway_fields():
    p, _ = outlier_policy_from_istio(_od(consecutive5xxErrors=3, consecutiveGatewayErrors=2))
    assert (p.consecutive_5xx, p.enforcing_consecutive_5xx) == (3, 100)
    assert (p.consecutive_gateway_failure, p.enforcing_consecutive_gateway_failure) == (2, 100)
    p, _ = outlier_policy_from_istio(_od(consecutive5xxErrors=0, consecutiveGatewayErrors=0))
    assert (p.consecutive_5xx, p.enforcing_consecutive_5xx) == (0, 0)
    assert (p.consecutive_gateway_failure, p.enforcing_consecutive_gateway_failure) == (0, 0)


def test_split_mode_and_local_origin():
    p, w = outlier_policy_from_istio(_od(splitExternalLocalOriginErrors=True,
                                         consecutiveLocalOriginFailures=3))
    assert p.split_external_local_origin_errors and p.consecutive_local_origin_failure == 3
    assert p.enforcing_consecutive_local_origin_failure == 100 and w == ()
    p, _ = outlier_policy_from_istio(_od(splitExternalLocalOriginErrors=True))
    assert p.consecutive_local_origin_failure == 5  # Envoy default
    p, w = outlier_policy_from_istio(_od(consecutiveLocalOriginFailures=3))
    assert not p.split_external_local_origin_errors and "ignored unless" in w[0]


def test_unimplemented_and_invalid_fields_warn():
    _, w = outlier_policy_from_istio(_od(outlierDetectionHttpErrorCodes=[500]))
    assert "not implemented" in w[0]
    p, w = outlier_policy_from_istio(_od(interval="0s"))
    assert p.interval_ms == 10_000 and "below 1ms" in w[0]
    p, w = outlier_policy_from_istio(_od(maxEjectionPercent=250, minHealthPercent=-5))
    assert p.max_ejection_percent == 100 and p.healthy_panic_threshold == 0.0 and len(w) == 2


def test_mep_rule_options_pass_through():
    p, _ = outlier_policy_from_istio(_od(), check_mep_on_first_eject=True,
                                     always_eject_one_host=True)
    assert p.check_mep_on_first_eject and p.always_eject_one_host


# ------------------------------------------------------------------------------------------------
# Counting and immediate ejection


def test_fifth_consecutive_5xx_ejects_immediately(make):
    c = make()
    assert c.put(0, E5, 1000, P5, times=4) == [False] * 4
    assert c.hosts[0].consecutive_5xx() == 4
    assert c.put(0, E5, 1000, P5) == [True]
    h = c.hosts[0]
    assert h.is_ejected() and h.ejected_until_ms() == 1000 + 30_000
    assert h.consecutive_5xx() == 0  # detection resets the counter
    assert h.n_ejections() == 1 and h.ejections_total() == 1
    assert c.stat("ejections_active") == 1
    assert c.stat("ejections_enforced_total") == 1
    assert c.stat("ejections_enforced_consecutive_5xx") == 1
    assert c.stat("ejections_detected_consecutive_5xx") == 1
    assert c.stat("ejections_consecutive_5xx") == 1 and c.stat("ejections_total") == 1


def test_success_resets_both_counters(make):
    c = make()
    c.put(0, GW, 0, P5, times=4)
    assert (c.hosts[0].consecutive_5xx(), c.hosts[0].consecutive_gateway()) == (4, 4)
    c.put(0, S, 0, P5)
    assert (c.hosts[0].consecutive_5xx(), c.hosts[0].consecutive_gateway()) == (0, 0)
    assert c.put(0, E5, 0, P5, times=4) == [False] * 4  # counting restarted
    assert not c.hosts[0].is_ejected()


def test_non_gateway_5xx_resets_only_gateway(make):
    c = make()
    c.put(0, GW, 0, P5, times=3)
    c.put(0, E5, 0, P5)
    assert (c.hosts[0].consecutive_5xx(), c.hosts[0].consecutive_gateway()) == (4, 0)


def test_gateway_detected_but_not_enforced_by_default(make):
    p = OutlierPolicy(consecutive_5xx=0, max_ejection_percent=100)  # only gateway detection
    c = make()
    assert c.put(0, GW, 0, p, times=5) == [False] * 5
    assert not c.hosts[0].is_ejected()
    assert c.stat("ejections_detected_consecutive_gateway_failure") == 1
    assert c.stat("ejections_enforced_total") == 0 and c.stat("ejections_active") == 0
    assert c.hosts[0].consecutive_gateway() == 0  # reset by the detection


def test_istio_1_4_consecutive_errors_500s_never_eject_502s_do(make):
    p, _ = outlier_policy_from_istio(_od(consecutiveErrors=2, maxEjectionPercent=100))
    c = make()
    assert not any(c.put(0, E5, 0, p, times=20))
    assert not c.hosts[0].is_ejected()
    # 5xx detection still happens (threshold 5) but is not enforced
    assert c.stat("ejections_detected_consecutive_5xx") == 4
    assert c.stat("ejections_enforced_total") == 0
    assert c.put(1, GW, 0, p, times=2) == [False, True]
    assert c.stat("ejections_enforced_consecutive_gateway_failure") == 1


def test_local_origin_counts_as_5xx_and_gateway_in_default_mode(make):
    c = make()
    for o in (CF, TO, RS):
        c.put(0, o, 0, P5)
    h = c.hosts[0]
    assert (h.consecutive_5xx(), h.consecutive_gateway(), h.consecutive_local_origin()) == (3, 3, 0)
    assert c.put(0, CF, 0, P5, times=2) == [False, True]  # 5th consecutive "5xx"


def test_refused_port_ejected_after_two_connect_failures(make):
    # semantics §4.1 [E]: consecutive_5xx: 2 -> ejected after 2 connect failures
    p = OutlierPolicy(consecutive_5xx=2, max_ejection_percent=100)
    c = make()
    assert c.put(0, CF, 0, p, times=2) == [False, True]


def test_split_mode_local_origin(make):
    p = OutlierPolicy(split_external_local_origin_errors=True,
                      consecutive_local_origin_failure=3, max_ejection_percent=100)
    c = make()
    h = c.hosts[0]
    c.put(0, CF, 0, p, times=2)
    assert (h.consecutive_5xx(), h.consecutive_gateway(), h.consecutive_local_origin()) == (0, 0, 2)
    c.put(0, GW, 0, p)  # a response: the connection worked -> local counter cleared
    assert (h.consecutive_5xx(), h.consecutive_gateway(), h.consecutive_local_origin()) == (1, 1, 0)
    c.put(0, CF, 0, p, times=2)
    assert c.put(0, TO, 0, p) == [False]  # connected, then timed out: counter restarts at 1
    assert h.consecutive_local_origin() == 1
    assert c.put(0, RS, 0, p, times=5) == [False] * 5  # resets after connect never accumulate
    assert c.put(0, CF, 0, p, times=2) == [False, True]
    assert c.stat("ejections_enforced_consecutive_local_origin_failure") == 1
    assert c.stat("ejections_detected_consecutive_local_origin_failure") == 1
    assert h.consecutive_local_origin() == 0


def test_split_mode_success_clears_local_counter(make):
    p = OutlierPolicy(split_external_local_origin_errors=True, max_ejection_percent=100)
    c = make()
    c.put(0, CF, 0, p, times=4)
    c.put(0, S, 0, p)
    assert c.hosts[0].consecutive_local_origin() == 0


def test_threshold_zero_never_fires(make):
    p = OutlierPolicy(consecutive_5xx=0, consecutive_gateway_failure=0,
                      max_ejection_percent=100)
    c = make()
    assert not any(c.put(0, GW, 0, p, times=50))
    assert c.stat("ejections_detected_consecutive_5xx") == 0


def test_disabled_policy_records_nothing(make):
    c = make()
    assert not any(c.put(0, E5, 0, DISABLED, times=10))
    assert c.hosts[0].consecutive_5xx() == 0


def test_detection_on_ejected_host_is_ignored_and_counter_keeps_counting(make):
    c = make()
    c.put(0, E5, 0, P5, times=5)
    assert c.hosts[0].is_ejected()
    assert not any(c.put(0, E5, 10, P5, times=12))  # in-flight failures of an ejected host
    assert c.hosts[0].consecutive_5xx() == 12       # passed the threshold, not reset
    assert c.stat("ejections_detected_consecutive_5xx") == 1
    # even an expired (not yet swept) ejection is still "flagged" for detection purposes
    c.put(0, S, 40_000, P5)
    assert not any(c.put(0, E5, 40_000, P5, times=5))
    assert c.stat("ejections_enforced_total") == 1


def test_enforcement_percentage_uses_rand100(make):
    p = OutlierPolicy(enforcing_consecutive_5xx=50, max_ejection_percent=100)
    c = make()
    assert c.put(0, E5, 0, p, times=5, rand100=50)[-1] is False
    assert c.stat("ejections_detected_consecutive_5xx") == 1
    assert c.put(0, E5, 0, p, times=5, rand100=49)[-1] is True


# ------------------------------------------------------------------------------------------------
# Ejection time and backoff


def test_ejection_time_arithmetic():
    assert [ejection_ms(n, 30_000, 300_000) for n in (1, 2, 10, 11)] == [30_000, 60_000, 300_000,
                                                                         300_000]
    assert ejection_ms(3, 500_000, 300_000) == 500_000  # capped at max(max, base)
    seq, n = [], 0
    for _ in range(6):
        n = next_backoff(n, 1000, 2500)
        seq.append(ejection_ms(n, 1000, 2500))
    assert seq == [1000, 2000, 2500, 2500, 2500, 2500]  # §4.6 observation: ~1 s, ~2 s, 2.5 s ...
    assert n == 4  # the multiplier stops growing once n*base >= max + base


def test_repeated_ejections_back_off_and_sweep_decrements(make):
    p = OutlierPolicy(consecutive_5xx=1, base_ejection_time_ms=1000, max_ejection_time_ms=2500,
                      interval_ms=200, max_ejection_percent=100)
    c = make(1)
    h = c.hosts[0]
    now, lengths = 0, []
    for _ in range(4):
        assert c.put(0, E5, now, p) == [True]
        lengths.append(h.ejected_until_ms() - now)
        now = h.ejected_until_ms()
        assert sweep(c.hosts, c.row, now, p) == [0]
    assert lengths == [1000, 2000, 2500, 2500]
    assert h.n_ejections() == 4
    for expect in (3, 2, 1, 0, 0):  # healthy sweeps walk the multiplier back down
        sweep(c.hosts, c.row, now, p)
        assert h.n_ejections() == expect
    assert c.put(0, E5, now, p) == [True]
    assert h.ejected_until_ms() - now == 1000


# ------------------------------------------------------------------------------------------------
# Availability and sweep


def test_is_available_and_expiry(make):
    c = make()
    h = c.hosts[0]
    assert is_available(h, 0)
    c.put(0, E5, 1000, P5, times=5)
    assert not is_available(h, 1000)
    assert not is_available(h, 30_999)
    assert is_available(h, 31_000)  # expired counts as available at once, before any sweep
    assert h.is_ejected()
    assert availability(c.hosts, 2000) == [False, True, True, True, True]


def test_sweep_unejects_expired_and_resets_counters(make):
    c = make()
    c.put(0, E5, 0, P5, times=5)
    c.put(1, E5, 10_000, P5, times=5)
    c.put(0, GW, 1, P5, times=3)   # in-flight failures while ejected
    assert c.stat("ejections_active") == 2
    assert sweep(c.hosts, c.row, 29_999, P5) == []
    assert sweep(c.hosts, c.row, 30_000, P5) == [0]
    h0 = c.hosts[0]
    assert not h0.is_ejected() and h0.ejected_until_ms() == 0
    assert (h0.consecutive_5xx(), h0.consecutive_gateway(), h0.consecutive_local_origin()) == (0, 0,
                                                                                               0)
    assert h0.n_ejections() == 1  # not decremented in the sweep that un-ejected it
    assert c.stat("ejections_active") == 1
    assert sweep(c.hosts, c.row, 40_000, P5) == [1]
    assert c.stat("ejections_active") == 0
    assert (h0.n_ejections(), c.hosts[1].n_ejections()) == (0, 1)
    assert c.stat("ejections_enforced_total") == 2  # counters are cumulative


def test_recount_ejections(make):
    c = make()
    c.put(0, E5, 0, P5, times=5)
    c.cells.store32(c.row.ejections_active.off, 7)  # drift (e.g. a worker died mid-ejection)
    assert recount_ejections(c.hosts, c.row) == 1
    assert c.stat("ejections_active") == 1


# ------------------------------------------------------------------------------------------------
# maxEjectionPercent


def test_mep_legacy_first_ejection_always_allowed(make):
    c = make(3)  # default 10 %: 3 hosts -> 0.3 host, rounds down, yet one is ejected
    p = OutlierPolicy()
    assert c.put(0, E5, 0, p, times=5)[-1] is True
    assert c.put(1, E5, 0, p, times=5)[-1] is False
    assert c.stat("ejections_overflow") == 1 and c.stat("ejections_active") == 1
    assert c.stat("ejections_detected_consecutive_5xx") == 2
    assert c.hosts[1].consecutive_5xx() == 0  # reset even though the ejection was refused


def test_mep_legacy_overshoots_by_one(make):
    c = make(3)
    p = OutlierPolicy(max_ejection_percent=50)
    assert c.put(0, E5, 0, p, times=5)[-1]
    assert c.put(1, E5, 0, p, times=5)[-1]  # 33 % < 50 % -> allowed, ends at 66 %
    assert not c.put(2, E5, 0, p, times=5)[-1]
    assert c.stat("ejections_active") == 2


def test_mep_legacy_ten_hosts_ten_percent(make):
    c = make(10)
    p = OutlierPolicy()
    assert c.put(0, E5, 0, p, times=5)[-1]
    assert not c.put(1, E5, 0, p, times=5)[-1]


@pytest.mark.parametrize("mep,expected", [(10, 0), (33, 0), (34, 1), (67, 2), (100, 3)])
def test_mep_envoy_1_28_rule(make, mep, expected):
    c = make(3)
    p = OutlierPolicy(max_ejection_percent=mep, check_mep_on_first_eject=True)
    for i in range(3):
        c.put(i, E5, 0, p, times=5)
    assert c.stat("ejections_active") == expected
    assert c.stat("ejections_overflow") == 3 - expected


def test_mep_always_eject_one_host(make):
    c = make(3)
    p = OutlierPolicy(check_mep_on_first_eject=True, always_eject_one_host=True)
    for i in range(3):
        c.put(i, E5, 0, p, times=5)
    assert c.stat("ejections_active") == 1


def test_mep_allows_pure():
    legacy = OutlierPolicy(max_ejection_percent=10)
    assert mep_allows(0, 3, legacy) and not mep_allows(1, 3, legacy)
    assert not mep_allows(0, 0, legacy)
    assert mep_allows(0, 1, OutlierPolicy(max_ejection_percent=250))  # clamped to 100


class LosingCells:
    """Wraps Cells; the first CAS on the host state word loses to a simulated other worker."""

    def __init__(self, inner, state_off, other_until):
        self._inner = inner
        self._state_off = state_off
        self._other = other_until
        self.armed = True

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def cas64(self, off, expected, desired):
        if self.armed and off == self._state_off:
            self.armed = False
            self._inner.store64(off, self._other)  # another worker published its ejection
        return self._inner.cas64(off, expected, desired)


def test_losing_the_publish_cas_gives_the_reservation_back(make):
    c = make(2)
    host = HostRow(LosingCells(c.cells, c.hosts[0].off + H_STATE, 12_345), c.hosts[0].off, 0)
    results = [on_result(host, c.row, E5, 0, P5, 2) for _ in range(5)]
    assert results == [False] * 5
    assert c.hosts[0].ejected_until_ms() == 12_345  # the winner's value was not clobbered
    assert c.stat("ejections_active") == 0  # our reservation returned (the fake winner took none)
    assert c.stat("ejections_enforced_total") == 0
    assert c.hosts[0].n_ejections() == 0


# ------------------------------------------------------------------------------------------------
# Panic threshold


@pytest.mark.parametrize("available,threshold,expected", [
    ([True, True, True], 0.0, ((0, 1, 2), False)),
    ([True, False, False], 50.0, ((0, 1, 2), True)),     # §4.11 [E]: 1 of 3 healthy, 50 % -> panic
    ([True, True, False, False], 50.0, ((0, 1), False)),  # 50 % is not below 50 %
    ([False, False, False], 0.0, ((), False)),          # §4.12: threshold 0, all ejected -> UH
    ([False, False, False], 50.0, ((0, 1, 2), True)),
    ([True, False, False], 0.0, ((0,), False)),
    ([True, True, True, False], 80.0, ((0, 1, 2), False)),  # 140*3//4 >= 100: total health 100
    ([True, True, False, False, False], 80.0, ((0, 1, 2, 3, 4), True)),
    ([], 50.0, ((), False)),
])
def test_healthy_set_or_panic(available, threshold, expected):
    assert healthy_set_or_panic(available, threshold) == expected


def test_module_exports():
    for name in od.__all__:
        assert hasattr(od, name)
