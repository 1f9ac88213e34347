"""Retry policy, Istio translation, request overrides and per-request state (meshcore.policy.retry)."""
from __future__ import annotations

from dataclasses import replace

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcore.config import istio
from meshcore.policy import retry as R
from meshcore.policy.classify import Kind, classify_failure, classify_response
from meshcore.policy.retry import (DEFAULT_CONSISTENT_HASH_POLICY, DEFAULT_POLICY,
                                   ENVOY_EMPTY_POLICY, RETRY_REQUEST_HEADERS, Reason, RetryPolicy,
                                   RetryState, final_flags, merge_request_overrides,
                                   parse_retry_on, retry_policy_from_istio)

OK = classify_response(200)
R503 = classify_response(503)
CF = classify_failure(Kind.CONNECT_FAILURE)
CT = classify_failure(Kind.CONNECT_TIMEOUT)
RESET = classify_failure(Kind.RESET_BEFORE_RESPONSE)  # request sent, fresh connection
RESET_UNSENT = classify_failure(Kind.RESET_BEFORE_RESPONSE, request_bytes_sent=False)
PTT = classify_failure(Kind.PER_TRY_TIMEOUT)
OVF = classify_failure(Kind.OVERFLOW)
UPE = classify_failure(Kind.PROTOCOL_ERROR)


class H(dict):
    """A response/request head stand-in: `.get(bytes)`."""


def policy(retry_on: str, n: int = 2, **kw) -> RetryPolicy:
    bits, codes, valid, unknown = parse_retry_on(retry_on)
    assert valid, unknown
    return RetryPolicy(num_retries=n, retry_on=bits, retriable_status_codes=codes, **kw)


def decide(p, outcome, headers=None, **kw):
    return RetryState(p, **kw).on_outcome(outcome, False, 0.0, 0, headers=headers)


def retried(p, outcome, headers=None, **kw) -> bool:
    return decide(p, outcome, headers, **kw).retry


def http_retry(**fields):
    return msgspec.convert(fields, istio.HTTPRetry, dec_hook=istio.dec_hook)


# === parse_retry_on ==========================================================================

ALL_TOKENS = {**R.HTTP_TOKENS, **R.GRPC_TOKENS}


@pytest.mark.parametrize("token", sorted(ALL_TOKENS))
def test_every_token(token):
    bits, codes, valid, unknown = parse_retry_on(token)
    assert bits == ALL_TOKENS[token] and codes == () and valid and unknown == ()
    assert R.format_retry_on(bits) == token


def test_token_bits_are_distinct():
    values = list(ALL_TOKENS.values())
    assert len(set(values)) == len(values) == 16
    assert all(v & (v - 1) == 0 for v in values)


def test_whitespace_and_empty_parts():
    bits, codes, valid, _ = parse_retry_on(" 5xx ,, reset,\tconnect-failure ,")
    assert bits == R.RETRY_ON_5XX | R.RETRY_ON_RESET | R.RETRY_ON_CONNECT_FAILURE
    assert valid and codes == ()
    assert parse_retry_on("") == (0, (), True, ())


def test_tokens_are_case_sensitive():
    bits, _, valid, unknown = parse_retry_on("5XX,Reset")
    assert bits == 0 and not valid and unknown == ("5XX", "Reset")


def test_bare_status_codes_move_to_codes_and_add_the_token():
    bits, codes, valid, _ = parse_retry_on("503")
    assert bits == R.RETRY_ON_RETRIABLE_STATUS_CODES and codes == (503,) and valid
    bits, codes, _, _ = parse_retry_on("5xx,503,504")
    assert bits == R.RETRY_ON_5XX | R.RETRY_ON_RETRIABLE_STATUS_CODES and codes == (503, 504)
    bits, codes, _, _ = parse_retry_on("retriable-status-codes,409")
    assert bits == R.RETRY_ON_RETRIABLE_STATUS_CODES and codes == (409,)


@pytest.mark.parametrize("token,code", [("+503", 503), ("0503", 503), ("425", 425), ("418", 418),
                                        ("100", 100), ("511", 511)])
def test_go_atoi_and_status_text(token, code):
    assert parse_retry_on(token)[1] == (code,)


@pytest.mark.parametrize("token", ["306", "419", "509", "999", "600", "-503", "5_03", "٥٠٣", "0"])
def test_integers_istio_does_not_know_stay_tokens(token):
    bits, codes, valid, unknown = parse_retry_on(token)
    assert bits == 0 and codes == () and not valid and unknown == (token,)


def test_istio_substring_check_quirk():
    # Istio appends `retriable-status-codes` only when the kept text does not *contain* it.
    bits, codes, valid, unknown = parse_retry_on("xretriable-status-codesx,503")
    assert codes == (503,) and not bits & R.RETRY_ON_RETRIABLE_STATUS_CODES
    assert unknown == ("xretriable-status-codesx",)


def test_unknown_tokens_reported_known_kept():
    bits, codes, valid, unknown = parse_retry_on("5xx,bogus,unavailable,nope")
    assert bits == R.RETRY_ON_5XX | R.RETRY_ON_GRPC_UNAVAILABLE
    assert not valid and unknown == ("bogus", "nope")


# === Istio translation (semantics.md §1.20-1.24, current Istio) ==============================


def test_default_policy_current_istio():
    p, w = retry_policy_from_istio(None, consistent_hash=False)
    assert p is DEFAULT_POLICY and w == []
    assert p.num_retries == 2
    assert p.retry_on == (R.RETRY_ON_CONNECT_FAILURE | R.RETRY_ON_REFUSED_STREAM
                          | R.RETRY_ON_GRPC_UNAVAILABLE | R.RETRY_ON_GRPC_CANCELLED
                          | R.RETRY_ON_RETRIABLE_STATUS_CODES)
    assert p.retriable_status_codes == ()  # 1.24+: no 503
    assert p.host_selection_retry_max_attempts == 5 and p.previous_hosts
    assert p.per_try_timeout == 0 and (p.base_interval_ms, p.max_interval_ms) == (25, 250)
    assert set(p.retry_on_string.split(",")) == set(R.DEFAULT_RETRY_ON.split(","))


def test_default_policy_consistent_hash_drops_previous_hosts():
    p, _ = retry_policy_from_istio(None, consistent_hash=True)
    assert p is DEFAULT_CONSISTENT_HASH_POLICY
    assert not p.previous_hosts and p.host_selection_retry_max_attempts == 5
    assert replace(p, previous_hosts=True) == DEFAULT_POLICY


def test_attempts_zero_disables():
    assert retry_policy_from_istio(http_retry(attempts=0), False) == (None, [])


def test_attempts_zero_with_other_fields_warns():
    p, w = retry_policy_from_istio(http_retry(attempts=0, retryOn="5xx", perTryTimeout="1s"), False)
    assert p is None and [f for f, _ in w] == ["attempts"]
    assert "attempts are set to 0" in w[0][1]


def test_attempts_unset_is_zero():
    p, w = retry_policy_from_istio(http_retry(retryOn="5xx"), False)
    assert p is None and w[0][0] == "attempts" and "unset" in w[0][1]


def test_negative_attempts():
    p, w = retry_policy_from_istio(http_retry(attempts=-1), False)
    assert p is None and "negative" in w[0][1]


def test_explicit_block_starts_from_default():
    p, w = retry_policy_from_istio(http_retry(attempts=3), False)
    assert w == [] and p == replace(DEFAULT_POLICY, num_retries=3)
    p, _ = retry_policy_from_istio(http_retry(attempts=3), True)
    assert p == replace(DEFAULT_CONSISTENT_HASH_POLICY, num_retries=3)


def test_empty_retry_on_keeps_default_string():
    p, w = retry_policy_from_istio(http_retry(attempts=1, retryOn=""), False)
    assert w == [] and p.retry_on == DEFAULT_POLICY.retry_on


def test_retry_on_replaces_default():
    p, _ = retry_policy_from_istio(http_retry(attempts=2, retryOn="5xx"), False)
    assert p.retry_on == R.RETRY_ON_5XX and p.retriable_status_codes == ()
    p, _ = retry_policy_from_istio(http_retry(attempts=2, retryOn="gateway-error,503"), False)
    assert p.retry_on == R.RETRY_ON_GATEWAY_ERROR | R.RETRY_ON_RETRIABLE_STATUS_CODES
    assert p.retriable_status_codes == (503,)
    p, w = retry_policy_from_istio(http_retry(attempts=2, retryOn="503"), False)
    assert w == [] and p.retry_on == R.RETRY_ON_RETRIABLE_STATUS_CODES
    assert p.retriable_status_codes == (503,)


def test_blank_retry_on_disables_every_condition():
    p, w = retry_policy_from_istio(http_retry(attempts=2, retryOn=" "), False)
    assert p.retry_on == 0 and w == [("retryOn", "no valid retry condition: nothing will be retried")]


def test_unknown_retry_on_warns():
    p, w = retry_policy_from_istio(http_retry(attempts=2, retryOn="5xx,bogus"), False)
    assert p.retry_on == R.RETRY_ON_5XX
    assert w == [("retryOn", "'bogus' is not a valid retryOn policy; ignored")]


def test_per_try_timeout():
    p, _ = retry_policy_from_istio(http_retry(attempts=2, perTryTimeout="250ms"), False)
    assert p.per_try_timeout == 0.25 and p.retry_on == DEFAULT_POLICY.retry_on
    p, w = retry_policy_from_istio(http_retry(attempts=2, perTryTimeout="500us"), False)
    assert p.per_try_timeout == 0 and w[0][0] == "perTryTimeout"


def test_plain_object_and_string_durations():
    class Plain:
        attempts = 4
        retry_on = "reset"
        per_try_timeout = "1.5s"
        retry_remote_localities = None
        retry_ignore_previous_hosts = None
        backoff = "50ms"

    p, _ = retry_policy_from_istio(Plain(), False)
    assert (p.num_retries, p.retry_on, p.per_try_timeout) == (4, R.RETRY_ON_RESET, 1.5)
    assert (p.base_interval_ms, p.max_interval_ms) == (50, 500)


@pytest.mark.parametrize("hash_,flag,expect", [
    (False, None, True), (True, None, False),
    (False, False, False), (True, False, False),
    (False, True, True), (True, True, True),
])
def test_retry_ignore_previous_hosts(hash_, flag, expect):
    fields = {"attempts": 2}
    if flag is not None:
        fields["retryIgnorePreviousHosts"] = flag
    p, _ = retry_policy_from_istio(http_retry(**fields), hash_)
    assert p.previous_hosts is expect


@pytest.mark.parametrize("text,base", [("100ms", 100), ("1s", 1000), ("1500us", 1), ("500us", 1)])
def test_backoff(text, base):
    p, w = retry_policy_from_istio(http_retry(attempts=2, backoff=text), False)
    assert (p.base_interval_ms, p.max_interval_ms) == (base, 10 * base) and w == []


def test_backoff_zero_warns():
    p, w = retry_policy_from_istio(http_retry(attempts=2, backoff="0s"), False)
    assert p.base_interval_ms == 25 and w[0][0] == "backoff"


def test_retry_remote_localities_is_recorded_with_a_warning():
    p, w = retry_policy_from_istio(http_retry(attempts=2, retryRemoteLocalities=True), False)
    assert p.retry_remote_localities and w[0][0] == "retryRemoteLocalities"


def test_policies_pickle():
    import pickle

    for p in (DEFAULT_POLICY, DEFAULT_CONSISTENT_HASH_POLICY, ENVOY_EMPTY_POLICY,
              policy("5xx,503", per_try_timeout=0.5, retriable_header_names=(b"x-a",))):
        assert pickle.loads(pickle.dumps(p)) == p


def test_policy_validation():
    with pytest.raises(ValueError):
        RetryPolicy(num_retries=-1)
    with pytest.raises(ValueError):
        RetryPolicy(base_interval_ms=0)
    with pytest.raises(ValueError):
        RetryPolicy(base_interval_ms=100, max_interval_ms=50)


# === request header overrides (semantics.md §3.1) =============================================


def test_strip_list():
    assert set(RETRY_REQUEST_HEADERS) == {
        b"x-envoy-retry-on", b"x-envoy-retry-grpc-on", b"x-envoy-max-retries",
        b"x-envoy-retriable-status-codes", b"x-envoy-retriable-header-names",
        b"x-envoy-upstream-rq-per-try-timeout-ms", b"x-envoy-hedge-on-per-try-timeout"}


def test_no_override_headers_returns_same_object():
    hdr = H({b"host": b"x", b"x-envoy-attempt-count": b"4"})
    assert merge_request_overrides(DEFAULT_POLICY, hdr.get) is DEFAULT_POLICY
    assert merge_request_overrides(None, hdr.get) is None


def test_ineffective_headers_return_same_object():
    hdr = H({b"x-envoy-retry-on": b"connect-failure"})
    assert merge_request_overrides(DEFAULT_POLICY, hdr.get) is DEFAULT_POLICY
    hdr = H({b"x-envoy-max-retries": b"5", b"x-envoy-hedge-on-per-try-timeout": b"true"})
    assert merge_request_overrides(None, hdr.get) is None  # no retry_on: max-retries ignored


def test_retry_on_header_or_merges_http_tokens_only():
    p = merge_request_overrides(DEFAULT_POLICY, H({b"x-envoy-retry-on": b"5xx, reset,bogus,503,unavailable"}).get)
    assert p.retry_on == DEFAULT_POLICY.retry_on | R.RETRY_ON_5XX | R.RETRY_ON_RESET
    assert p.retriable_status_codes == () and p.num_retries == 2 and p.previous_hosts


def test_retry_grpc_on_header():
    p = merge_request_overrides(policy("5xx"), H({b"x-envoy-retry-grpc-on": b"internal,5xx"}).get)
    assert p.retry_on == R.RETRY_ON_5XX | R.RETRY_ON_GRPC_INTERNAL


def test_headers_on_route_without_policy_use_envoy_empty_policy():
    p = merge_request_overrides(None, H({b"x-envoy-retry-on": b"5xx"}).get)
    assert p == replace(ENVOY_EMPTY_POLICY, retry_on=R.RETRY_ON_5XX)
    assert p.num_retries == 1 and not p.previous_hosts


@pytest.mark.parametrize("value,expect", [(b"5", 5), (b"0", 0), (b" +3 ", 3), (b"x", 2), (b"-1", 2),
                                          (b"", 2)])
def test_max_retries_header_replaces(value, expect):
    p = merge_request_overrides(DEFAULT_POLICY, H({b"x-envoy-max-retries": value}).get)
    assert p.num_retries == expect


def test_retriable_status_codes_header_appends():
    p = merge_request_overrides(policy("503"), H({b"x-envoy-retriable-status-codes": b"409, 418,abc,,-1"}).get)
    assert p.retriable_status_codes == (503, 409, 418)


def test_retriable_header_names_header():
    base = policy("retriable-headers")
    p = merge_request_overrides(base, H({b"x-envoy-retriable-header-names": b"X-Retry-Me, foo,,"}).get)
    assert p.retriable_header_names == (b"x-retry-me", b"foo")
    assert retried(p, OK, H({b"x-retry-me": b"1"}))
    assert not retried(p, OK, H({b"x-other": b"1"}))
    assert not retried(base, OK, H({b"x-retry-me": b"1"}))


def test_per_try_header():
    p = merge_request_overrides(DEFAULT_POLICY, H({b"x-envoy-upstream-rq-per-try-timeout-ms": b"150"}).get)
    assert p.per_try_timeout == 0.15 and p.retry_on == DEFAULT_POLICY.retry_on
    p = merge_request_overrides(None, H({b"x-envoy-upstream-rq-per-try-timeout-ms": b"150"}).get)
    assert p.per_try_timeout == 0.15 and p.retry_on == 0  # timeout applies, nothing retried
    with_ptt = replace(DEFAULT_POLICY, per_try_timeout=1.0)
    p = merge_request_overrides(with_ptt, H({b"x-envoy-upstream-rq-per-try-timeout-ms": b"0"}).get)
    assert p.per_try_timeout == 0
    p = merge_request_overrides(with_ptt, H({b"x-envoy-upstream-rq-per-try-timeout-ms": b"soon"}).get)
    assert p is with_ptt


# === RetryState: conditions (semantics.md §3.2) ===============================================


def test_success_is_done_without_allocation():
    st_ = RetryState(DEFAULT_POLICY)
    d = st_.on_outcome(OK, False, 1.0, 7, headers=H())
    assert d is R.DONE_SUCCESS and st_.attempt_count == 1 and not st_.retry_success


def test_default_policy_retries_connect_failures_then_urx():
    st_ = RetryState(DEFAULT_POLICY)
    counts = [st_.attempt_count]
    for _ in range(2):
        d = st_.on_outcome(CF, False, 0.0, 3, host=0)
        assert d.retry and d.reason is Reason.RETRY and d.stat == "upstream_rq_retry"
        counts.append(st_.attempt_count)
    d = st_.on_outcome(CF, False, 0.0, 3)
    assert d is R.DONE_EXHAUSTED and d.flag == "URX"
    assert counts == [1, 2, 3]
    assert final_flags(d, CF) == "URX,UF"


def test_default_policy_does_not_retry_503_nor_per_try_timeout():
    assert decide(DEFAULT_POLICY, R503) is R.DONE_SUCCESS  # 1.24+: 503 not retried
    d = decide(DEFAULT_POLICY, PTT)
    assert d is R.DONE_NOT_RETRIABLE and final_flags(d, PTT) == "UT"  # §1.23 gotcha
    assert decide(DEFAULT_POLICY, CT).retry
    assert not retried(DEFAULT_POLICY, RESET)
    assert not retried(DEFAULT_POLICY, UPE)


@pytest.mark.parametrize("token", ["5xx", "gateway-error", "reset"])
def test_reset_family_retries_every_failure_but_overflow(token):
    p = policy(token)
    for o in (CF, CT, RESET, RESET_UNSENT, PTT, UPE):
        assert retried(p, o), o
    assert decide(p, OVF) is R.DONE_NOT_RETRIABLE


def test_per_try_timeout_exhausted_flags():
    st_ = RetryState(policy("5xx", n=2))
    assert st_.on_outcome(PTT, False, 0, 0).retry
    assert st_.on_outcome(PTT, False, 0, 0).retry
    d = st_.on_outcome(PTT, False, 0, 0)
    assert final_flags(d, PTT) == "URX,UT"


def test_overflow_is_never_retried():
    p = policy("5xx,gateway-error,reset,reset-before-request,connect-failure,retriable-status-codes,503")
    assert decide(p, OVF) is R.DONE_NOT_RETRIABLE


def test_5xx_responses():
    p = policy("5xx")
    assert all(retried(p, classify_response(s)) for s in (500, 501, 502, 503, 504, 599))
    assert not any(retried(p, classify_response(s)) for s in (200, 404, 409, 429, 499))


def test_gateway_error_responses():
    p = policy("gateway-error")
    assert [s for s in range(200, 600) if retried(p, classify_response(s))] == [502, 503, 504]


def test_retriable_4xx_is_409_only():
    p = policy("retriable-4xx")
    assert [s for s in range(200, 600) if retried(p, classify_response(s))] == [409]
    assert not retried(p, CF) and not retried(p, RESET)


def test_retriable_status_codes():
    assert [s for s in range(100, 1000) if retried(policy("503,429"), classify_response(s))] == [429, 503]
    no_bit = RetryPolicy(num_retries=2, retriable_status_codes=(503,))
    assert not retried(no_bit, R503)
    assert not retried(policy("retriable-status-codes"), R503)


def test_425_is_retried_immediately_without_advancing_backoff():
    st_ = RetryState(policy("425,503", n=5))
    d = st_.on_outcome(classify_response(425), False, 2.0, 24)
    assert d.retry and d.delay == 0 and d.at == 2.0
    d = st_.on_outcome(R503, False, 2.0, 24)
    assert d.delay == 0.024  # first backoff window [0,25) still


def test_connect_failure_token():
    p = policy("connect-failure")
    assert retried(p, CF) and retried(p, CT)
    for o in (RESET, RESET_UNSENT, PTT, UPE, OVF, R503):
        assert not retried(p, o)


@pytest.mark.parametrize("token", ["refused-stream", "http3-post-connect-failure"])
def test_transport_specific_tokens_never_match_http1(token):
    p = policy(token)
    for o in (CF, CT, RESET, RESET_UNSENT, PTT, UPE, OVF, R503, OK):
        assert not retried(p, o, H())


def test_reset_before_request():
    p = policy("reset-before-request")
    assert retried(p, CF) and retried(p, CT) and retried(p, RESET_UNSENT)
    assert not retried(p, RESET)
    assert not retried(p, classify_failure(Kind.PER_TRY_TIMEOUT))
    assert retried(p, classify_failure(Kind.PER_TRY_TIMEOUT, request_bytes_sent=False))
    assert not retried(p, R503)


def test_reset_before_request_is_sticky_across_attempts():
    # Like Envoy's upstream_request_started_: once a reset attempt sent bytes, no later reset of
    # the same request counts as "before request".
    st_ = RetryState(policy("reset-before-request", n=5), idempotent=True)
    stale = classify_failure(Kind.RESET_BEFORE_RESPONSE, True, True, False)
    assert st_.on_outcome(stale, False, 0, 0).reason is Reason.RETRY_STALE_CONNECTION
    assert st_.on_outcome(CF, False, 0, 0) is R.DONE_NOT_RETRIABLE


def test_envoy_ratelimited():
    limited = H({b"x-envoy-ratelimited": b"true"})
    assert not retried(policy("5xx"), R503, limited)  # header vetoes every other condition
    assert not retried(policy("503"), R503, limited)
    assert retried(policy("5xx"), R503, H())
    p = policy("envoy-ratelimited")
    assert retried(p, classify_response(429), limited)
    assert retried(p, OK, limited)
    assert not retried(p, classify_response(429), H())
    assert not retried(p, CF)


@pytest.mark.parametrize("token,code", [("cancelled", 1), ("deadline-exceeded", 4),
                                        ("resource-exhausted", 8), ("internal", 13),
                                        ("unavailable", 14)])
def test_grpc_tokens(token, code):
    p = policy(token)
    for c in range(0, 17):
        assert retried(p, OK, H({b"grpc-status": str(c).encode()})) == (c == code)
    assert not retried(p, OK, H())
    assert not retried(p, OK)  # no headers given: nothing to match
    assert not retried(p, CF)


def test_grpc_status_parsing():
    p = policy("unavailable")
    assert retried(p, OK, H({b"grpc-status": b" 14 "}))
    assert retried(p, OK, H({b"grpc-status": b"014"}))
    assert not retried(p, OK, H({b"grpc-status": b"14x"}))
    assert not retried(p, OK, H({b"grpc-status": b""}))


def test_policy_none_never_retries_by_policy():
    for o in (CF, RESET, PTT, R503, OVF):
        d = decide(None, o)
        assert not d.retry and d.reason in (Reason.SUCCESS, Reason.NOT_RETRIABLE)


# === RetryState: limits, overflow, replay ======================================================


def test_zero_retries_gives_urx_at_once():
    p = merge_request_overrides(policy("5xx"), H({b"x-envoy-max-retries": b"0"}).get)
    d = decide(p, R503)
    assert d is R.DONE_EXHAUSTED and final_flags(d, R503) == "URX"


def test_retries_exhausted_on_responses_returns_last_response_with_urx():
    st_ = RetryState(policy("503", n=1))
    assert st_.on_outcome(R503, False, 0, 0).retry
    d = st_.on_outcome(R503, False, 0, 0)
    assert d.reason is Reason.EXHAUSTED and d.stat == "upstream_rq_retry_limit_exceeded"
    assert final_flags(d, R503) == "URX"


class Breaker:
    def __init__(self, allow):
        self.allow = list(allow)
        self.active = 0

    def try_acquire(self):
        ok = self.allow.pop(0)
        self.active += ok
        return ok

    def release(self):
        self.active -= 1


def test_retry_overflow_returns_current_outcome_with_uo():
    b = Breaker([False])
    st_ = RetryState(policy("5xx", n=3), try_acquire_retry=b.try_acquire, release_retry=b.release)
    d = st_.on_outcome(R503, False, 0, 0)
    assert d is R.DONE_OVERFLOW and d.stat == "upstream_rq_retry_overflow"
    assert final_flags(d, R503) == "UO"
    assert st_.retries_remaining == 2  # Envoy consumes the retry before asking the breaker
    assert final_flags(d, CF) == "UO,UF"


def test_retry_token_held_until_next_outcome_or_release():
    b = Breaker([True, True])
    st_ = RetryState(policy("5xx", n=3), try_acquire_retry=b.try_acquire, release_retry=b.release)
    assert st_.on_outcome(R503, False, 0, 0).retry and b.active == 1
    assert st_.on_outcome(R503, False, 0, 0).retry and b.active == 1  # released, re-acquired
    st_.release()
    st_.release()
    assert b.active == 0
    b = Breaker([True])
    st_ = RetryState(policy("5xx", n=3), try_acquire_retry=b.try_acquire, release_retry=b.release)
    st_.on_outcome(R503, False, 0, 0)
    assert st_.on_outcome(OK, False, 0, 0) is R.DONE_SUCCESS and b.active == 0
    assert st_.retry_success


def test_body_not_replayable():
    st_ = RetryState(policy("5xx"), body_replayable=False)
    d = st_.on_outcome(R503, False, 0, 0)
    assert d is R.DONE_BODY_NOT_REPLAYABLE and d.flag == "" and d.stat == "retry_or_shadow_abandoned"
    assert final_flags(d, CF) == "UF"
    st_ = RetryState(policy("5xx"))
    assert st_.on_outcome(R503, False, 0, 0).retry
    st_.body_replayable = False  # the body outgrew the replay buffer meanwhile
    assert st_.on_outcome(R503, False, 0, 0) is R.DONE_BODY_NOT_REPLAYABLE
    assert R.REPLAY_BUFFER_LIMIT == 1 << 20


def test_response_started_is_never_retried():
    p = policy("5xx,reset,connect-failure")
    for o in (R503, RESET, PTT, CF):
        assert RetryState(p, idempotent=True).on_outcome(o, True, 0, 0) is R.DONE_RESPONSE_STARTED
    stale = classify_failure(Kind.RESET_BEFORE_RESPONSE, True, True, False)
    assert RetryState(DEFAULT_POLICY, idempotent=True).on_outcome(stale, True, 0, 0) is R.DONE_RESPONSE_STARTED


# === the stale keep-alive rule (hardening.md §5) ==============================================

STALE = classify_failure(Kind.RESET_BEFORE_RESPONSE, True, True, False)
STALE_UNSENT = classify_failure(Kind.RESET_BEFORE_RESPONSE, False, True, False)


def test_stale_connection_idempotent_replayed_once_on_fresh_connection():
    st_ = RetryState(DEFAULT_POLICY, idempotent=True)
    d = st_.on_outcome(STALE, False, 5.0, 99, host=1)
    assert d.retry and d.reason is Reason.RETRY_STALE_CONNECTION and d.fresh_connection
    assert (d.delay, d.at, d.flag, d.stat) == (0.0, 5.0, "", "")
    assert st_.retries_remaining == 2 and st_.attempt_count == 2 and st_.exclude is None
    d = st_.on_outcome(STALE, False, 5.0, 99)
    assert d is R.DONE_NOT_RETRIABLE and final_flags(d, STALE) == "UC"


def test_stale_connection_post():
    assert not retried(DEFAULT_POLICY, STALE, idempotent=False)  # POST may have been processed
    assert retried(DEFAULT_POLICY, STALE_UNSENT, idempotent=False)  # nothing was written


def test_stale_rule_needs_reuse_zero_response_bytes_and_replayable_body():
    got_bytes = classify_failure(Kind.RESET_BEFORE_RESPONSE, True, True, True)
    assert not retried(DEFAULT_POLICY, got_bytes, idempotent=True)
    assert not retried(DEFAULT_POLICY, RESET, idempotent=True)  # fresh connection
    assert not retried(DEFAULT_POLICY, STALE, idempotent=True, body_replayable=False)
    assert not retried(DEFAULT_POLICY, classify_failure(Kind.PROTOCOL_ERROR), idempotent=True)
    assert retried(None, STALE, idempotent=True)  # applies without a retry policy too


def test_policy_that_covers_the_reset_wins_over_the_stale_rule():
    st_ = RetryState(policy("reset", n=1), idempotent=True)
    d = st_.on_outcome(STALE, False, 0, 10)
    assert d.reason is Reason.RETRY and not d.fresh_connection and d.delay == 0.010
    d = st_.on_outcome(STALE, False, 0, 10)
    assert d is R.DONE_EXHAUSTED  # no extra stale replay once the policy owned the outcome
    st_ = RetryState(policy("reset", n=1), idempotent=False)  # POST too: Envoy parity
    assert st_.on_outcome(STALE, False, 0, 0).reason is Reason.RETRY


# === backoff (semantics.md §3.3) ==============================================================


def windows(base, top, n):
    out, i = [], base
    for _ in range(n):
        out.append(i)
        i = i * 2 if i < top // 2 else top
    return out


def test_default_windows():
    assert windows(25, 250, 7) == [25, 50, 100, 200, 250, 250, 250]
    assert windows(100, 1000, 6) == [100, 200, 400, 800, 1000, 1000]
    assert windows(30, 300, 6) == [30, 60, 120, 240, 300, 300]


@pytest.mark.parametrize("rnd,expect_ms", [
    (0, [0, 0, 0, 0, 0, 0, 0]),
    (37, [12, 37, 37, 37, 37, 37, 37]),
    (249, [24, 49, 49, 49, 249, 249, 249]),
    (10**12 + 7, [7, 7, 7, 7, 7, 7, 7]),
    (199, [24, 49, 99, 199, 199, 199, 199]),
])
def test_backoff_delays_exact(rnd, expect_ms):
    st_ = RetryState(policy("5xx", n=7))
    got = []
    for _ in range(7):
        d = st_.on_outcome(R503, False, 100.0, rnd)
        assert d.retry and d.at == pytest.approx(100.0 + d.delay)
        got.append(round(d.delay * 1000))
    assert got == expect_ms
    assert st_.on_outcome(R503, False, 0, rnd) is R.DONE_EXHAUSTED


def test_max_window_rnd():
    st_ = RetryState(policy("5xx", n=6))
    got = [st_.on_outcome(R503, False, 0, w - 1).delay for w in windows(25, 250, 6)]
    assert got == [0.024, 0.049, 0.099, 0.199, 0.249, 0.249]


def test_custom_backoff_from_istio():
    p, _ = retry_policy_from_istio(http_retry(attempts=5, retryOn="5xx", backoff="100ms"), False)
    st_ = RetryState(p)
    got = [st_.on_outcome(R503, False, 0, 10**6 - 1).delay for _ in range(5)]
    assert got == [0.099, 0.199, 0.399, 0.799, 0.999]


@given(st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=1, max_size=12),
       st.integers(1, 500))
def test_backoff_always_inside_its_window(rnds, base):
    p = RetryPolicy(num_retries=len(rnds), retry_on=R.RETRY_ON_5XX, base_interval_ms=base,
                    max_interval_ms=10 * base)
    st_ = RetryState(p)
    for rnd, w in zip(rnds, windows(base, 10 * base, len(rnds))):
        d = st_.on_outcome(R503, False, 0, rnd)
        assert round(d.delay * 1000) == rnd % w < w


# === previous hosts (semantics.md §3.6) ========================================================


def test_previous_hosts_exclusion():
    st_ = RetryState(DEFAULT_POLICY)
    assert st_.exclude is None and st_.host_selection_retry_max_attempts == 5
    st_.on_outcome(CF, False, 0, 0, host=3)
    assert st_.exclude == {3} and st_.should_select_another_host(3)
    st_.on_outcome(CF, False, 0, 0, host=1)
    assert st_.exclude == {1, 3} and not st_.should_select_another_host(0)


def test_previous_hosts_off():
    st_ = RetryState(DEFAULT_CONSISTENT_HASH_POLICY)
    assert st_.host_selection_retry_max_attempts == 0
    st_.on_outcome(CF, False, 0, 0, host=3)
    assert st_.exclude is None and not st_.should_select_another_host(3)


def test_no_exclusion_recorded_without_a_retry():
    st_ = RetryState(DEFAULT_POLICY)
    st_.on_outcome(OK, False, 0, 0, host=3)
    assert st_.exclude is None


def test_balancer_integration():
    """Two hosts, round robin, 2 retries of connect failures: previous_hosts makes the retry avoid
    the tried host (semantics.md §3.6: e.g. 37082, 37081, 37081)."""
    import random

    from meshcore.upstream.balancer import make_balancer

    b = make_balancer("ROUND_ROBIN", [1, 1], random.Random(1))
    st_ = RetryState(DEFAULT_POLICY)
    first = b.pick(None, st_.exclude)
    st_.on_outcome(CF, False, 0, 0, host=first)
    second = b.pick(None, st_.exclude)
    assert second != first
    st_.on_outcome(CF, False, 0, 0, host=second)
    assert st_.exclude == {0, 1}
    b.pick(None, st_.exclude)  # every host tried: the balancer keeps its last pick


# === misc ======================================================================================


def test_final_flags():
    assert final_flags(R.DONE_SUCCESS, OK) == ""
    assert final_flags(R.DONE_NOT_RETRIABLE, CF) == "UF"
    assert final_flags(R.DONE_EXHAUSTED, RESET) == "URX,UC"
    assert final_flags(R.DONE_OVERFLOW, R503) == "UO"
    assert final_flags(R.DONE_EXHAUSTED, PTT) == "URX,UT"


def test_is_idempotent():
    assert all(R.is_idempotent(m) for m in (b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
    assert not any(R.is_idempotent(m) for m in (b"POST", b"PATCH", b"CONNECT", b"get"))
