"""Route and per-try deadlines (meshcore.policy.timeout)."""
from __future__ import annotations

from math import inf

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcore.policy.timeout import (NO_DEADLINES, TIMEOUT_REQUEST_HEADERS, plan_deadlines,
                                     route_timeout_override)


def test_no_timeouts_is_a_constant():
    d = plan_deadlines(0.0, 0.0, 123.0)
    assert d is NO_DEADLINES
    assert d.global_deadline == inf
    assert d.per_try_deadline(500.0) == inf
    assert d.expected_timeout_ms(123.0) == 0  # header absent with timeout 0 (§1.19)


def test_route_timeout_only():
    d = plan_deadlines(0.3, 0.0, 100.0)
    assert d.global_deadline == pytest.approx(100.3)
    assert d.per_try_deadline(100.1) == inf
    assert d.expected_timeout_ms(100.0) == 300


def test_per_try_only():
    d = plan_deadlines(0.0, 0.7, 10.0)
    assert d.global_deadline == inf
    assert d.per_try_deadline(11.0) == pytest.approx(11.7)
    assert d.expected_timeout_ms(10.0) == 700  # per-try wins (§1.19: `700`)
    assert d.expected_timeout_ms(99.0) == 700  # no route timeout: never capped


def test_both_per_try_wins_header_and_global_covers_all_tries():
    d = plan_deadlines(1.0, 0.3, 0.0)
    assert d.expected_timeout_ms(0.0) == 300
    # Three attempts of 300 ms each: third per-try deadline is before the global one...
    assert d.per_try_deadline(0.62) == pytest.approx(0.92)
    assert d.global_deadline == pytest.approx(1.0)
    # ...a later attempt's per-try deadline may lie past it: the global one wins then.
    assert d.per_try_deadline(0.9) > d.global_deadline


def test_per_try_at_or_above_route_timeout_is_ignored():
    for per_try in (1.0, 2.0):
        d = plan_deadlines(1.0, per_try, 0.0)
        assert d.per_try_timeout == 0 and d.per_try_deadline(0.0) == inf
        assert d.expected_timeout_ms(0.0) == 1000
    assert plan_deadlines(1.0, 0.999, 0.0).per_try_timeout == pytest.approx(0.999)


def test_expected_timeout_shrinks_with_elapsed_time():
    d = plan_deadlines(1.0, 0.0, 0.0)
    assert d.expected_timeout_ms(0.25) == 750
    d = plan_deadlines(1.0, 0.3, 0.0)
    assert d.expected_timeout_ms(0.5) == 300
    assert d.expected_timeout_ms(0.8) == 200
    assert d.expected_timeout_ms(1.0) == 1  # out of time: 1, never 0 (= infinite upstream)
    assert d.expected_timeout_ms(5.0) == 1


def test_millisecond_truncation_is_float_robust():
    assert plan_deadlines(0.3, 0, 0).global_timeout_ms == 300
    assert plan_deadlines(1.005, 0, 0).global_timeout_ms == 1005
    assert plan_deadlines(0.0004, 0, 0) is NO_DEADLINES  # below 1 ms: Envoy reads 0 = none


@given(st.integers(0, 100_000), st.integers(0, 100_000), st.floats(0, 1e6))
def test_invariants(route_ms, per_try_ms, now):
    d = plan_deadlines(route_ms / 1000, per_try_ms / 1000, now)
    assert d.global_timeout_ms == route_ms
    if route_ms and per_try_ms >= route_ms:
        assert d.per_try_timeout_ms == 0
    else:
        assert d.per_try_timeout_ms == per_try_ms
    exp = d.expected_timeout_ms(now)
    assert exp == (d.per_try_timeout_ms or route_ms)
    if route_ms:
        assert d.global_deadline == pytest.approx(now + route_ms / 1000)


def test_route_timeout_override_header():
    hdr = {b"x-envoy-upstream-rq-timeout-ms": b"250"}
    assert route_timeout_override(1.0, hdr.get) == 0.25
    assert route_timeout_override(1.0, {}.get) == 1.0
    assert route_timeout_override(1.0, {b"x-envoy-upstream-rq-timeout-ms": b"0"}.get) == 0.0
    assert route_timeout_override(1.0, {b"x-envoy-upstream-rq-timeout-ms": b"abc"}.get) == 1.0
    assert route_timeout_override(1.0, {b"x-envoy-upstream-rq-timeout-ms": b"-5"}.get) == 1.0
    assert TIMEOUT_REQUEST_HEADERS == (b"x-envoy-upstream-rq-timeout-ms",)
