"""Fault injection (meshcore.policy.fault): Istio translation, per-million draws, abort reply."""
from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcore.config import istio
from meshcore.policy.fault import (ABORT_BODY, HUNDRED, MILLION, NO_FAULT, AbortReply, FaultPolicy,
                                   decide_fault, fault_policy_from_istio, fraction_hit)


def fault(**fields):
    return msgspec.convert(fields, istio.HTTPFaultInjection, dec_hook=istio.dec_hook)


def test_none():
    assert fault_policy_from_istio(None) == (None, [])


def test_delay_with_percentage():
    p, w = fault_policy_from_istio(fault(delay={"fixedDelay": "500ms", "percentage": {"value": 50}}))
    assert w == []
    assert (p.delay, p.delay_numerator, p.delay_denominator) == (0.5, 500_000, MILLION)
    assert p.abort_status == 0 and p.abort_reply is None
    assert p.delay_percent == 50.0


def test_delay_deprecated_int_percent():
    p, w = fault_policy_from_istio(fault(delay={"fixedDelay": "1s", "percent": 30}))
    assert w == [] and (p.delay_numerator, p.delay_denominator) == (30, HUNDRED)


def test_percentage_wins_over_percent():
    p, _ = fault_policy_from_istio(fault(delay={"fixedDelay": "1s", "percent": 30,
                                                "percentage": {"value": 1.5}}))
    assert (p.delay_numerator, p.delay_denominator) == (15_000, MILLION)


def test_go_truncation_of_percentages():
    p, _ = fault_policy_from_istio(fault(delay={"fixedDelay": "1s", "percentage": {"value": 0.57}}))
    assert p.delay_numerator == 5699  # uint32(0.57 * 10000) in Go
    p, _ = fault_policy_from_istio(fault(abort={"httpStatus": 503, "percentage": {"value": 33.3333}}))
    assert p.abort_numerator == 333333


def test_delay_without_percentage_never_fires():
    p, w = fault_policy_from_istio(fault(delay={"fixedDelay": "1s"}))
    assert p.delay_numerator == 0 and w[0][0] == "delay.percentage"
    assert all(decide_fault(p, r, r) == NO_FAULT for r in (0, 1, 99, 10**9))


def test_abort_without_percentage_never_fires():
    p, w = fault_policy_from_istio(fault(abort={"httpStatus": 503}))
    assert p.abort_status == 503 and p.abort_numerator == 0 and w[0][0] == "abort.percentage"
    assert all(decide_fault(p, r, r) == NO_FAULT for r in (0, 1, 10**9))


def test_abort_old_percent_is_ignored_with_warning():
    p, w = fault_policy_from_istio(fault(abort={"httpStatus": 503, "percent": 100}))
    assert p.abort_numerator == 0
    assert "abort.percent" in [f for f, _ in w]


def test_abort_reply():
    p, w = fault_policy_from_istio(fault(abort={"httpStatus": 418, "percentage": {"value": 100}}))
    assert w == []
    assert p.abort_reply == AbortReply(418, b"fault filter abort", "FI", "fault_filter_abort")
    assert ABORT_BODY == b"fault filter abort"
    assert decide_fault(p, 0, 123) == (0.0, 418)


def test_abort_reply_fits_local_reply_render():
    from meshcore import local_reply

    p = FaultPolicy(abort_status=503, abort_numerator=MILLION)
    wire = local_reply.render(p.abort_reply)
    assert wire.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"content-type: text/plain\r\n" in wire and wire.endswith(b"\r\n\r\nfault filter abort")
    assert FaultPolicy(abort_status=204, abort_numerator=1).abort_reply.body == b""


@pytest.mark.parametrize("status", [100, 199, 600, 700])
def test_abort_status_out_of_range_dropped(status):
    p, w = fault_policy_from_istio(fault(abort={"httpStatus": status, "percentage": {"value": 100}}))
    assert p is None and w[0][0] == "abort.httpStatus"


def test_grpc_abort_and_exponential_delay_warn():
    p, w = fault_policy_from_istio(fault(abort={"grpcStatus": "UNAVAILABLE", "percentage": {"value": 100}}))
    assert p is None and w[0][0] == "abort.grpcStatus"
    p, w = fault_policy_from_istio(fault(delay={"exponentialDelay": "1s", "percentage": {"value": 100}}))
    assert p is None and w[0][0] == "delay.exponentialDelay"
    p, w = fault_policy_from_istio(fault(
        delay={"exponentialDelay": "1s", "percentage": {"value": 100}},
        abort={"httpStatus": 500, "percentage": {"value": 10}}))
    assert p.delay == 0 and p.abort_status == 500 and [f for f, _ in w] == ["delay.exponentialDelay"]


def test_missing_types_warn():
    p, w = fault_policy_from_istio(fault(abort={"percentage": {"value": 100}}))
    assert p is None and w[0][0] == "abort"
    p, w = fault_policy_from_istio(fault(delay={"percentage": {"value": 100}}))
    assert p is None and w[0][0] == "delay"
    p, w = fault_policy_from_istio(fault())
    assert p is None and "abort and/or a delay" in w[0][1]


def test_tiny_percentage_warns():
    p, w = fault_policy_from_istio(fault(abort={"httpStatus": 500, "percentage": {"value": 0.00001}}))
    assert "neither 0.0" in w[0][1]


def test_decide_draws_per_million():
    p = FaultPolicy(delay=0.5, delay_numerator=250_000, abort_status=503, abort_numerator=10)
    assert decide_fault(p, 249_999, 10) == (0.5, None)
    assert decide_fault(p, 250_000, 9) == (0.0, 503)
    assert decide_fault(p, MILLION + 5, 7) == (0.5, 503)  # rnd % 1e6
    assert decide_fault(p, 999_999, 999_999) is NO_FAULT
    # Both hit: delay first (flag DI), then abort (flag FI).
    assert decide_fault(p, 0, 0) == (0.5, 503)


def test_decide_draws_per_hundred():
    p = FaultPolicy(delay=1.0, delay_numerator=30, delay_denominator=HUNDRED)
    assert [decide_fault(p, r, 0)[0] for r in (0, 29, 30, 99, 100, 129, 130)] == [
        1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]


def test_decide_returns_precomputed_tuples():
    p = FaultPolicy(delay=0.1, delay_numerator=MILLION, abort_status=500, abort_numerator=MILLION)
    assert decide_fault(p, 1, 1) is decide_fault(p, 2, 3)


@given(st.integers(0, MILLION), st.integers(0, 2**64 - 1))
def test_fraction_matches_envoy(numerator, rnd):
    assert fraction_hit(numerator, MILLION, rnd) == (rnd % MILLION < numerator)


@given(st.integers(0, 100))
def test_hit_rate_is_exact_over_a_full_cycle(percent):
    hits = sum(fraction_hit(percent, HUNDRED, r) for r in range(HUNDRED))
    assert hits == percent


def test_policy_validation():
    with pytest.raises(ValueError):
        FaultPolicy(abort_status=99)
    with pytest.raises(ValueError):
        FaultPolicy(delay=-1)
    with pytest.raises(ValueError):
        FaultPolicy(delay_denominator=1000)
    with pytest.raises(AttributeError):
        FaultPolicy().delay = 1  # type: ignore[misc]


def test_policy_pickles_with_precomputed_results():
    import pickle

    p = FaultPolicy(delay=0.5, delay_numerator=5, abort_status=503, abort_numerator=7)
    q = pickle.loads(pickle.dumps(p))
    assert q == p and q.abort_reply == p.abort_reply and decide_fault(q, 0, 0) == (0.5, 503)
