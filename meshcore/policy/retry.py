"""Retry policy (frozen, compiled from Istio config) and per-request retry state (Envoy semantics).

Rules of this module:

* `RetryPolicy` is built once at config compile time (`retry_policy_from_istio`) and never mutated.
  `merge_request_overrides` folds the `x-envoy-*` retry request headers into it per request and
  returns the *same object* when none is present, so the common path allocates nothing.
* `RetryState` is made per request; `on_outcome` is called once per finished attempt with the
  `Outcome` from `meshcore.policy.classify` and answers with a `Decision`. It never sleeps, never
  reads a clock and never draws randomness: callers pass `now` (float seconds) and `rnd` (a
  non-negative int, e.g. `random.getrandbits(32)`).
* T1: no trio, socket, time, os imports.

Envoy semantics reproduced (semantics.md §1.20-1.24, §3; Envoy `retry_state_impl.cc`):

* `retry_on` tokens, see `parse_retry_on`. A response carrying `x-envoy-ratelimited` is retried
  if and only if `envoy-ratelimited` is set, whatever else matches. A response matching
  `retriable-status-codes` with status 425 is retried immediately (no backoff), as Envoy does.
* Failures: overflow is never retried. Connect failure/timeout: `connect-failure`. Then, for every
  failure kind (connect failures included): `reset-before-request` if no request byte was ever
  sent upstream on a reset attempt of this request (sticky, like Envoy's
  `upstream_request_started_`), `reset`, `5xx`, `gateway-error`. `refused-stream` never matches
  (HTTP/2 only); `http3-post-connect-failure` never matches (HTTP/3 only).
* A retriable outcome with no retries left -> DONE, flag URX (stat upstream_rq_retry_limit_exceeded).
  Otherwise one retry is consumed, then the `maxRetries` circuit breaker is asked
  (`try_acquire_retry`); a refusal -> DONE, flag UO, the current outcome is returned as is
  (upstream response passed through, §3.7). An accepted retry holds the breaker token until the
  next `on_outcome` or `release()` (Envoy holds it across backoff and the retried attempt).
* Backoff: full jitter. The n-th backoff waits `min(rnd % I_n, max)` ms with `I_1 = base` and
  `I_{k+1} = 2*I_k` while `I_k < max // 2`, else `max` (defaults 25/250 ms: windows [0,25) [0,50)
  [0,100) [0,200) [0,250) [0,250)...).
* `previous_hosts` predicate: every host that got a retried attempt is added to `exclude`, which the
  balancer (`pick(book, exclude)`) re-picks away from, up to `host_selection_retry_max_attempts`.

Safe replay (hardening.md §5) and how it combines with `retryOn` -- checked in this order:

1. `response_started` (a response byte already went downstream) -> DONE RESPONSE_STARTED. Nothing
   overrides this.
2. The policy decides whether the outcome is retriable (above). If it is:
   2a. the request body is not replayable (over `REPLAY_BUFFER_LIMIT`, or the caller set
       `body_replayable = False` because it already streamed more than it kept) ->
       DONE BODY_NOT_REPLAYABLE, no flag (Envoy drops its retry state: `retry_or_shadow_abandoned`);
   2b. else the normal retry path (URX / UO / RETRY). The method does *not* matter here: a policy
       that says `5xx` or `reset` retries POST too, exactly like Envoy.
3. If the policy does not retry it, meshcore adds one extension Envoy lacks, the stale keep-alive
   rule: a RESET_BEFORE_RESPONSE on a *reused* pooled connection with *zero response bytes* is
   retried once per request, immediately, on a fresh connection to the same host, when the body is
   replayable and either no request byte was written or the method is idempotent. It consumes no
   `num_retries`, takes no breaker token, sets no flag and counts no Envoy stat, but it does bump
   `attempt_count`. It is skipped when the policy already retries the outcome (then 2 applies,
   including URX when retries are exhausted).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Callable, Optional

from meshcore.durations import to_seconds
from meshcore.policy.classify import Kind, Outcome

__all__ = [
    # retry_on bits
    "RETRY_ON_5XX", "RETRY_ON_GATEWAY_ERROR", "RETRY_ON_CONNECT_FAILURE", "RETRY_ON_RETRIABLE_4XX",
    "RETRY_ON_REFUSED_STREAM", "RETRY_ON_RETRIABLE_STATUS_CODES", "RETRY_ON_RETRIABLE_HEADERS",
    "RETRY_ON_ENVOY_RATE_LIMITED", "RETRY_ON_RESET", "RETRY_ON_RESET_BEFORE_REQUEST",
    "RETRY_ON_HTTP3_POST_CONNECT_FAILURE", "RETRY_ON_GRPC_CANCELLED",
    "RETRY_ON_GRPC_DEADLINE_EXCEEDED", "RETRY_ON_GRPC_INTERNAL", "RETRY_ON_GRPC_RESOURCE_EXHAUSTED",
    "RETRY_ON_GRPC_UNAVAILABLE", "RETRY_ON_GRPC_ANY",
    "HTTP_TOKENS", "GRPC_TOKENS",
    "parse_retry_on", "format_retry_on",
    # policy
    "RetryPolicy", "DEFAULT_RETRY_ON", "DEFAULT_POLICY", "DEFAULT_CONSISTENT_HASH_POLICY",
    "ENVOY_EMPTY_POLICY", "retry_policy_from_istio",
    # request headers
    "RETRY_REQUEST_HEADERS", "merge_request_overrides",
    # state
    "REPLAY_BUFFER_LIMIT", "IDEMPOTENT_METHODS", "is_idempotent",
    "Reason", "Decision", "RetryState", "final_flags",
    "DONE_SUCCESS", "DONE_NOT_RETRIABLE", "DONE_EXHAUSTED", "DONE_OVERFLOW",
    "DONE_BODY_NOT_REPLAYABLE", "DONE_RESPONSE_STARTED",
]

# ---------------------------------------------------------------------------------------------
# retry_on vocabulary

RETRY_ON_5XX = 1 << 0
RETRY_ON_GATEWAY_ERROR = 1 << 1
RETRY_ON_CONNECT_FAILURE = 1 << 2
RETRY_ON_RETRIABLE_4XX = 1 << 3
RETRY_ON_REFUSED_STREAM = 1 << 4
RETRY_ON_RETRIABLE_STATUS_CODES = 1 << 5
RETRY_ON_RETRIABLE_HEADERS = 1 << 6
RETRY_ON_ENVOY_RATE_LIMITED = 1 << 7
RETRY_ON_RESET = 1 << 8
RETRY_ON_RESET_BEFORE_REQUEST = 1 << 9
RETRY_ON_HTTP3_POST_CONNECT_FAILURE = 1 << 10
RETRY_ON_GRPC_CANCELLED = 1 << 11
RETRY_ON_GRPC_DEADLINE_EXCEEDED = 1 << 12
RETRY_ON_GRPC_INTERNAL = 1 << 13
RETRY_ON_GRPC_RESOURCE_EXHAUSTED = 1 << 14
RETRY_ON_GRPC_UNAVAILABLE = 1 << 15
RETRY_ON_GRPC_ANY = (RETRY_ON_GRPC_CANCELLED | RETRY_ON_GRPC_DEADLINE_EXCEEDED
                     | RETRY_ON_GRPC_INTERNAL | RETRY_ON_GRPC_RESOURCE_EXHAUSTED
                     | RETRY_ON_GRPC_UNAVAILABLE)
_RESETS_ANY = RETRY_ON_RESET | RETRY_ON_5XX | RETRY_ON_GATEWAY_ERROR

# Envoy's `x-envoy-retry-on` vocabulary (RetryStateImpl::parseRetryOn).
HTTP_TOKENS = {
    "5xx": RETRY_ON_5XX,
    "gateway-error": RETRY_ON_GATEWAY_ERROR,
    "connect-failure": RETRY_ON_CONNECT_FAILURE,
    "envoy-ratelimited": RETRY_ON_ENVOY_RATE_LIMITED,
    "retriable-4xx": RETRY_ON_RETRIABLE_4XX,
    "refused-stream": RETRY_ON_REFUSED_STREAM,
    "retriable-status-codes": RETRY_ON_RETRIABLE_STATUS_CODES,
    "retriable-headers": RETRY_ON_RETRIABLE_HEADERS,
    "reset": RETRY_ON_RESET,
    "reset-before-request": RETRY_ON_RESET_BEFORE_REQUEST,
    "http3-post-connect-failure": RETRY_ON_HTTP3_POST_CONNECT_FAILURE,
}
# Envoy's `x-envoy-retry-grpc-on` vocabulary (RetryStateImpl::parseRetryGrpcOn).
GRPC_TOKENS = {
    "cancelled": RETRY_ON_GRPC_CANCELLED,
    "deadline-exceeded": RETRY_ON_GRPC_DEADLINE_EXCEEDED,
    "internal": RETRY_ON_GRPC_INTERNAL,
    "resource-exhausted": RETRY_ON_GRPC_RESOURCE_EXHAUSTED,
    "unavailable": RETRY_ON_GRPC_UNAVAILABLE,
}
_ALL_TOKENS = {**HTTP_TOKENS, **GRPC_TOKENS}
# gRPC status codes (grpc-status header) matched by the gRPC tokens.
_GRPC_STATUS_BITS = {
    1: RETRY_ON_GRPC_CANCELLED,
    4: RETRY_ON_GRPC_DEADLINE_EXCEEDED,
    8: RETRY_ON_GRPC_RESOURCE_EXHAUSTED,
    13: RETRY_ON_GRPC_INTERNAL,
    14: RETRY_ON_GRPC_UNAVAILABLE,
}

# Go's net/http StatusText table: the integers Istio moves from `retryOn` into
# `retriable_status_codes` (`http.StatusText(i) != ""`). 306, 419, 420, 509 ... are not in it.
_GO_STATUS_CODES = frozenset(
    (100, 101, 102, 103,
     200, 201, 202, 203, 204, 205, 206, 207, 208, 226,
     300, 301, 302, 303, 304, 305, 307, 308,
     400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417, 418,
     421, 422, 423, 424, 425, 426, 428, 429, 431, 451,
     500, 501, 502, 503, 504, 505, 506, 507, 508, 510, 511))
_GO_ATOI = re.compile(r"[+-]?[0-9]+")  # strconv.Atoi: optional sign, ASCII digits only
_ABSL_UINT = re.compile(rb"\s*\+?([0-9]+)\s*")  # absl::SimpleAtoi for unsigned values


def parse_retry_on(text: str) -> tuple[int, tuple[int, ...], bool, tuple[str, ...]]:
    """Parse an Istio `retryOn` string as Istio + Envoy do.

    Returns `(bits, status_codes, all_valid, unknown_tokens)`:

    * tokens are split on `,`, whitespace-trimmed, empty ones dropped;
    * an integer token that is a known HTTP status (Go's table) goes to `status_codes` (Istio);
      when any code is present and the remaining text does not contain `retriable-status-codes`,
      that token is appended (Istio >= 1.12), so `retryOn: "503"` alone retries 503;
    * every other token must be one of Envoy's HTTP or gRPC tokens; the rest are `unknown_tokens`
      (Envoy ignores them; Istio's validation rejects them) and make `all_valid` False.
    """
    bits = 0
    codes: list[int] = []
    kept: list[str] = []
    unknown: list[str] = []
    for part in text.split(","):
        token = part.strip()
        if not token:
            continue
        if _GO_ATOI.fullmatch(token) and int(token) in _GO_STATUS_CODES:
            codes.append(int(token))
            continue
        kept.append(token)
        bit = _ALL_TOKENS.get(token)
        if bit is None:
            unknown.append(token)
        else:
            bits |= bit
    if codes and "retriable-status-codes" not in ",".join(kept):
        bits |= RETRY_ON_RETRIABLE_STATUS_CODES
    return bits, tuple(codes), not unknown, tuple(unknown)


def _parse_envoy_tokens(value: bytes, table: dict) -> int:
    """Envoy's header flavour: known tokens of one table OR-ed, anything else ignored."""
    bits = 0
    for part in value.decode("latin-1").split(","):
        bits |= table.get(part.strip(), 0)
    return bits


def format_retry_on(bits: int) -> str:
    """The Envoy `retry_on` string of `bits` (for config dumps and messages)."""
    return ",".join(name for name, bit in _ALL_TOKENS.items() if bits & bit)


# ---------------------------------------------------------------------------------------------
# Policy


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """An Envoy route retry policy. Istio's defaults are `DEFAULT_POLICY`; what request headers
    merge into on a route without a policy is `ENVOY_EMPTY_POLICY` (Envoy: 1 retry, no
    conditions, no host predicate)."""

    num_retries: int = 1  # retries, not attempts: total attempts = num_retries + 1
    retry_on: int = 0  # RETRY_ON_* bits
    retriable_status_codes: tuple[int, ...] = ()
    retriable_header_names: tuple[bytes, ...] = ()  # lowercase; matched by presence
    per_try_timeout: float = 0.0  # seconds; 0 = none (bounded only by the route timeout)
    host_selection_retry_max_attempts: int = 5  # extra picks to avoid tried hosts (Istio: 5)
    previous_hosts: bool = False  # envoy.retry_host_predicates.previous_hosts
    retry_remote_localities: bool = False  # previous_priorities (no effect: one priority)
    base_interval_ms: int = 25  # runtime upstream.base_retry_backoff_ms default
    max_interval_ms: int = 250  # default 10 x base

    def __post_init__(self):
        if self.num_retries < 0:
            raise ValueError("num_retries must be >= 0")
        if self.base_interval_ms < 1 or self.max_interval_ms < self.base_interval_ms:
            raise ValueError("backoff needs 1 <= base_interval_ms <= max_interval_ms")
        if self.per_try_timeout < 0:
            raise ValueError("per_try_timeout must be >= 0")

    @property
    def retry_on_string(self) -> str:
        return format_retry_on(self.retry_on)


DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"

# Istio >= 1.24 default (semantics.md §1.20): 2 retries, no retriable status codes
# (EXCLUDE_UNSAFE_503_FROM_DEFAULT_RETRY), previous_hosts, 5 host re-picks.
DEFAULT_POLICY = RetryPolicy(
    num_retries=2,
    retry_on=parse_retry_on(DEFAULT_RETRY_ON)[0],
    host_selection_retry_max_attempts=5,
    previous_hosts=True,
)
# Istio >= 1.23 drops the previous_hosts predicate when the destination uses consistent hashing.
DEFAULT_CONSISTENT_HASH_POLICY = replace(DEFAULT_POLICY, previous_hosts=False)
# What Envoy uses when the route has no retry policy and the request carries retry headers.
ENVOY_EMPTY_POLICY = RetryPolicy(host_selection_retry_max_attempts=1)


_seconds = to_seconds  # one duration grammar for config and policy


def _duration_ms(seconds: float) -> int:
    """Envoy's DurationUtil::durationToMilliseconds (truncates), robust to float noise."""
    return int(round(seconds * 1e6)) // 1000


def retry_policy_from_istio(retries, consistent_hash: bool = False):
    """Translate a VirtualService `retries` block (an `HTTPRetry` Struct or None) like current Istio
    (1.24+, `retry.ConvertPolicy`).

    Returns `(policy_or_None, warnings)` where `warnings` is a list of `(field, message)` pairs,
    `field` being the camelCase field under `retries` (the compiler prefixes its own path).

    * `retries` unset -> `DEFAULT_POLICY` (or `DEFAULT_CONSISTENT_HASH_POLICY`).
    * `attempts` unset, 0 or negative -> None: no retry policy at all (proto3 int32: unset is 0).
    * otherwise start from the default and override: `attempts` -> num_retries; a non-empty
      `retryOn` replaces the default string and codes (`parse_retry_on`); `perTryTimeout`;
      `retryIgnorePreviousHosts` true/false turns the predicate on/off (even with consistent hash);
      `retryRemoteLocalities`; `backoff` -> base interval (max = 10 x base).
    """
    base = DEFAULT_CONSISTENT_HASH_POLICY if consistent_hash else DEFAULT_POLICY
    warnings: list[tuple[str, str]] = []
    if retries is None:
        return base, warnings

    attempts = getattr(retries, "attempts", None)
    retry_on_text = getattr(retries, "retry_on", None)
    per_try = getattr(retries, "per_try_timeout", None)
    remote_localities = getattr(retries, "retry_remote_localities", None)
    ignore_previous = getattr(retries, "retry_ignore_previous_hosts", None)
    backoff = getattr(retries, "backoff", None)

    if attempts is None or attempts <= 0:
        if attempts is not None and attempts < 0:
            warnings.append(("attempts", "attempts cannot be negative; retries disabled"))
        elif attempts is None:
            warnings.append(("attempts", "attempts unset counts as 0: retries disabled for this route"))
        if per_try is not None or retry_on_text or remote_localities is not None:
            warnings.append(("attempts", "http retry policy configured when attempts are set to 0 "
                             "(disabled); the other retry fields are ignored"))
        return None, warnings

    fields: dict = {"num_retries": int(attempts)}

    if retry_on_text:  # Go: in.RetryOn != "" (a blank string still replaces the default)
        bits, codes, _valid, unknown = parse_retry_on(retry_on_text)
        for token in unknown:
            warnings.append(("retryOn", f"{token!r} is not a valid retryOn policy; ignored"))
        if not bits:
            warnings.append(("retryOn", "no valid retry condition: nothing will be retried"))
        fields["retry_on"] = bits
        fields["retriable_status_codes"] = codes

    if per_try is not None:
        seconds = _seconds(per_try)
        if seconds < 0.001:
            warnings.append(("perTryTimeout", "duration must be at least 1ms; ignored"))
        else:
            fields["per_try_timeout"] = seconds

    if ignore_previous is not None:
        fields["previous_hosts"] = bool(ignore_previous)

    if remote_localities:
        fields["retry_remote_localities"] = True
        warnings.append(("retryRemoteLocalities",
                         "previous_priorities has no effect: meshcore routes over a single priority"))

    if backoff is not None:
        ms = _duration_ms(_seconds(backoff))
        if _seconds(backoff) <= 0:
            warnings.append(("backoff", "backoff must be greater than 0; default 25ms kept"))
        else:
            ms = max(ms, 1)  # Envoy rounds a sub-millisecond base interval up to 1 ms
            fields["base_interval_ms"] = ms
            fields["max_interval_ms"] = 10 * ms

    return replace(base, **fields), warnings


# ---------------------------------------------------------------------------------------------
# Request header overrides (semantics.md §3.1)

H_RETRY_ON = b"x-envoy-retry-on"
H_RETRY_GRPC_ON = b"x-envoy-retry-grpc-on"
H_MAX_RETRIES = b"x-envoy-max-retries"
H_RETRIABLE_STATUS_CODES = b"x-envoy-retriable-status-codes"
H_RETRIABLE_HEADER_NAMES = b"x-envoy-retriable-header-names"
H_PER_TRY_TIMEOUT_MS = b"x-envoy-upstream-rq-per-try-timeout-ms"
H_HEDGE_ON_PER_TRY_TIMEOUT = b"x-envoy-hedge-on-per-try-timeout"

# Consumed by the router: the proxy must strip these before forwarding (Envoy removes them
# whether or not they parsed). Hedging is not implemented; its header is stripped only.
RETRY_REQUEST_HEADERS = (
    H_RETRY_ON, H_RETRY_GRPC_ON, H_MAX_RETRIES, H_RETRIABLE_STATUS_CODES,
    H_RETRIABLE_HEADER_NAMES, H_PER_TRY_TIMEOUT_MS, H_HEDGE_ON_PER_TRY_TIMEOUT,
)


def _absl_uint(value: bytes) -> Optional[int]:
    m = _ABSL_UINT.fullmatch(value)
    return int(m.group(1)) if m else None


def merge_request_overrides(policy: Optional[RetryPolicy],
                            get_header: Callable[[bytes], Optional[bytes]]) -> Optional[RetryPolicy]:
    """Fold the request's retry headers into `policy` (Envoy `RetryStateImpl` constructor and
    `FilterUtility::finalTimeout`). `get_header(name)` returns the first value (bytes) or None;
    a parsed `RequestHead.get` fits.

    * no retry header present -> returns `policy` itself (None stays None): no allocation;
    * `policy` None (route retries disabled) -> headers merge into `ENVOY_EMPTY_POLICY`
      (1 retry, no conditions, no host predicate), as Envoy does for a route without a policy;
    * `x-envoy-retry-on` / `x-envoy-retry-grpc-on`: known tokens OR-ed into retry_on (bare status
      codes are not tokens there; unknown tokens are ignored);
    * `x-envoy-max-retries`: *replaces* num_retries, only when the merged retry_on is non-zero and
      the value is an unsigned integer;
    * `x-envoy-retriable-status-codes`: comma list, parsable entries appended to the codes (they
      only matter with `retriable-status-codes` set);
    * `x-envoy-retriable-header-names`: comma list of names appended (presence match);
    * `x-envoy-upstream-rq-per-try-timeout-ms`: replaces per_try_timeout (0 = none) when it parses.
    """
    retry_on = get_header(H_RETRY_ON)
    grpc_on = get_header(H_RETRY_GRPC_ON)
    max_retries = get_header(H_MAX_RETRIES)
    codes = get_header(H_RETRIABLE_STATUS_CODES)
    names = get_header(H_RETRIABLE_HEADER_NAMES)
    per_try = get_header(H_PER_TRY_TIMEOUT_MS)
    if (retry_on is None and grpc_on is None and max_retries is None and codes is None
            and names is None and per_try is None):
        return policy
    base = ENVOY_EMPTY_POLICY if policy is None else policy
    bits = base.retry_on
    if retry_on is not None:
        bits |= _parse_envoy_tokens(retry_on, HTTP_TOKENS)
    if grpc_on is not None:
        bits |= _parse_envoy_tokens(grpc_on, GRPC_TOKENS)
    num_retries = base.num_retries
    if bits and max_retries is not None:
        n = _absl_uint(max_retries)
        if n is not None:
            num_retries = n
    status_codes = base.retriable_status_codes
    if codes is not None:
        extra = []
        for part in codes.split(b","):
            n = _absl_uint(part)
            if n is not None and n <= 0xFFFFFFFF:
                extra.append(n)
        status_codes = status_codes + tuple(extra)
    header_names = base.retriable_header_names
    if names is not None:
        header_names = header_names + tuple(
            n.strip().lower() for n in names.split(b",") if n.strip())
    per_try_timeout = base.per_try_timeout
    if per_try is not None:
        ms = _absl_uint(per_try)
        if ms is not None:
            per_try_timeout = ms / 1000.0
    if (bits == base.retry_on and num_retries == base.num_retries
            and status_codes == base.retriable_status_codes
            and header_names == base.retriable_header_names
            and per_try_timeout == base.per_try_timeout):
        return policy  # nothing effective (None stays None)
    return replace(base, retry_on=bits, num_retries=num_retries,
                   retriable_status_codes=status_codes, retriable_header_names=header_names,
                   per_try_timeout=per_try_timeout)


# ---------------------------------------------------------------------------------------------
# Per-request state

REPLAY_BUFFER_LIMIT = 1 << 20  # Envoy's per-connection buffer limit default (1 MiB), §3.10
# RFC 9110 §9.2.2 idempotent methods.
IDEMPOTENT_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))


def is_idempotent(method: bytes) -> bool:
    return method in IDEMPOTENT_METHODS


class Reason(IntEnum):
    RETRY = 0  # retry per policy after `delay`
    RETRY_STALE_CONNECTION = 1  # meshcore's stale keep-alive replay: now, on a fresh connection
    SUCCESS = 2  # a response the policy does not retry: forward it (details via_upstream)
    NOT_RETRIABLE = 3  # a failure the policy does not retry: its local reply
    EXHAUSTED = 4  # retriable but no retries left: flag URX
    OVERFLOW = 5  # retriable but the maxRetries breaker refused: flag UO, outcome returned as is
    BODY_NOT_REPLAYABLE = 6  # retriable but the request body cannot be replayed
    RESPONSE_STARTED = 7  # a response byte already went downstream: never retried


@dataclass(frozen=True, slots=True)
class Decision:
    retry: bool
    reason: Reason
    delay: float = 0.0  # seconds to wait before the next attempt (RETRY only)
    at: float = 0.0  # now + delay (RETRY only)
    flag: str = ""  # response flag this decision adds: "URX", "UO" or ""
    stat: str = ""  # Envoy cluster stat to increment ("" = none)
    fresh_connection: bool = False  # the next attempt must open a new upstream connection


DONE_SUCCESS = Decision(False, Reason.SUCCESS)
DONE_NOT_RETRIABLE = Decision(False, Reason.NOT_RETRIABLE)
DONE_EXHAUSTED = Decision(False, Reason.EXHAUSTED, flag="URX",
                          stat="upstream_rq_retry_limit_exceeded")
DONE_OVERFLOW = Decision(False, Reason.OVERFLOW, flag="UO", stat="upstream_rq_retry_overflow")
DONE_BODY_NOT_REPLAYABLE = Decision(False, Reason.BODY_NOT_REPLAYABLE,
                                    stat="retry_or_shadow_abandoned")
DONE_RESPONSE_STARTED = Decision(False, Reason.RESPONSE_STARTED)

_NO, _BACKOFF, _IMMEDIATE = 0, 1, 2


def final_flags(decision: Decision, outcome: Outcome) -> str:
    """Envoy's response flags for a final (DONE) decision, in Envoy 1.40's order: the retry flag
    first, then the failure's own flag ("URX,UF", "URX,UT", "UO,UC"); "" when none."""
    own = "" if outcome.kind is Kind.RESPONSE else outcome.flag
    if decision.flag:
        return decision.flag + "," + own if own else decision.flag
    return own


class RetryState:
    """Retry bookkeeping for one request (Envoy `RetryStateImpl` + the router's retry checks).

    Per attempt the proxy does::

        st = RetryState(policy, body_replayable=..., idempotent=is_idempotent(head.method),
                        try_acquire_retry=breaker.try_acquire_retry,
                        release_retry=breaker.release_retry)
        while True:
            ep = balancer.pick(book, st.exclude)
            ... attempt with header x-envoy-attempt-count: st.attempt_count ...
            outcome = classify_response(rhead.status)    # or classify_failure(kind, ...)
            d = st.on_outcome(outcome, response_started, now, rnd, headers=rhead, host=ep)
            if not d.retry: break          # forward the response / send the local reply,
                                           # flags = final_flags(d, outcome)
            discard the response (close its connection unless fully read); sleep until d.at
        st.release()                       # in a finally: returns a held breaker token

    `body_replayable` may be set to False at any time (e.g. when the buffered body passes
    `REPLAY_BUFFER_LIMIT`).
    """

    __slots__ = ("policy", "body_replayable", "idempotent", "retries_remaining", "attempt_count",
                 "retry_success", "_interval_ms", "_request_started", "_exclude", "_holding",
                 "_retried", "_stale_used", "_acquire", "_release")

    def __init__(self, policy: Optional[RetryPolicy], body_replayable: bool = True,
                 idempotent: bool = False,
                 try_acquire_retry: Optional[Callable[[], bool]] = None,
                 release_retry: Optional[Callable[[], None]] = None):
        if policy is None:
            policy = _NO_RETRY
        self.policy = policy
        self.body_replayable = body_replayable
        self.idempotent = idempotent
        self.retries_remaining = policy.num_retries
        self.attempt_count = 1  # value of x-envoy-attempt-count for the current attempt
        self.retry_success = False  # stat upstream_rq_retry_success: a retried request ended
        self._interval_ms = policy.base_interval_ms
        self._request_started = False
        self._exclude: Optional[set] = None
        self._holding = False
        self._retried = False
        self._stale_used = False
        self._acquire = try_acquire_retry
        self._release = release_retry

    @property
    def exclude(self):
        """Hosts to avoid on the next pick (previous_hosts predicate), or None."""
        return self._exclude

    @property
    def host_selection_retry_max_attempts(self) -> int:
        return self.policy.host_selection_retry_max_attempts if self.policy.previous_hosts else 0

    def should_select_another_host(self, host) -> bool:
        """Envoy's predicate check for one candidate pick."""
        return self._exclude is not None and host in self._exclude

    def release(self) -> None:
        """Give back a held maxRetries breaker token (idempotent)."""
        if self._holding:
            self._holding = False
            if self._release is not None:
                self._release()

    def next_backoff_ms(self, rnd: int) -> int:
        """Advance Envoy's JitteredExponentialBackOffStrategy and return the next wait in ms."""
        interval = self._interval_ms
        top = self.policy.max_interval_ms
        self._interval_ms = interval * 2 if interval < top // 2 else top
        return min(rnd % interval, top)

    # -- decisions --------------------------------------------------------------------------

    def on_outcome(self, outcome: Outcome, response_started: bool, now: float, rnd: int,
                   headers=None, host=None) -> Decision:
        """Decide what follows one finished attempt. `headers` is the response head (anything
        with `.get(name: bytes) -> bytes | None`) for RESPONSE outcomes; `host` the endpoint
        the attempt used (recorded for previous_hosts when a retry follows)."""
        if self._holding:  # Envoy resetRetry(): the previous retry's token ends here
            self.release()
        if response_started:
            return DONE_RESPONSE_STARTED
        if outcome.kind is Kind.RESPONSE:
            would = self._would_retry_response(outcome.status, headers)
        else:
            if outcome.request_bytes_sent:
                self._request_started = True
            would = self._would_retry_failure(outcome)
        if would == _NO:
            if self._retried:
                self.retry_success = True
            if (outcome.kind is Kind.RESET_BEFORE_RESPONSE and outcome.reused_connection
                    and not outcome.response_bytes_received and not self._stale_used
                    and self.body_replayable
                    and (self.idempotent or not outcome.request_bytes_sent)):
                self._stale_used = True
                self.attempt_count += 1
                return Decision(True, Reason.RETRY_STALE_CONNECTION, 0.0, now,
                                fresh_connection=True)
            return DONE_SUCCESS if outcome.kind is Kind.RESPONSE else DONE_NOT_RETRIABLE
        if not self.body_replayable:
            return DONE_BODY_NOT_REPLAYABLE
        if self.retries_remaining <= 0:
            return DONE_EXHAUSTED
        self.retries_remaining -= 1
        if self._acquire is not None:
            if not self._acquire():
                return DONE_OVERFLOW
            self._holding = True
        self._retried = True
        self.retry_success = False
        if self.policy.previous_hosts and host is not None:
            if self._exclude is None:
                self._exclude = {host}
            else:
                self._exclude.add(host)
        self.attempt_count += 1
        if would == _IMMEDIATE:
            return Decision(True, Reason.RETRY, 0.0, now, stat="upstream_rq_retry")
        delay = self.next_backoff_ms(rnd) / 1000.0
        return Decision(True, Reason.RETRY, delay, now + delay, stat="upstream_rq_retry")

    def _would_retry_response(self, status: int, headers) -> int:
        bits = self.policy.retry_on
        would = _NO
        if bits & RETRY_ON_5XX and 500 <= status <= 599:
            would = _BACKOFF
        elif bits & RETRY_ON_GATEWAY_ERROR and 502 <= status <= 504:
            would = _BACKOFF
        elif bits & RETRY_ON_RETRIABLE_4XX and status == 409:
            would = _BACKOFF
        elif bits & RETRY_ON_RETRIABLE_STATUS_CODES and status in self.policy.retriable_status_codes:
            would = _IMMEDIATE if status == 425 else _BACKOFF
        elif headers is not None:
            if bits & RETRY_ON_RETRIABLE_HEADERS:
                for name in self.policy.retriable_header_names:
                    if headers.get(name) is not None:
                        would = _BACKOFF
                        break
            if would == _NO and bits & RETRY_ON_GRPC_ANY:
                value = headers.get(b"grpc-status")
                if value is not None:
                    code = _absl_uint(value)
                    if code is not None and bits & _GRPC_STATUS_BITS.get(code, 0):
                        would = _BACKOFF
        # x-envoy-ratelimited (from an upstream Envoy) wins over everything else.
        if (would != _NO or bits & RETRY_ON_ENVOY_RATE_LIMITED) and headers is not None:
            if headers.get(b"x-envoy-ratelimited") is not None:
                return _BACKOFF if bits & RETRY_ON_ENVOY_RATE_LIMITED else _NO
        return would

    def _would_retry_failure(self, outcome: Outcome) -> int:
        kind = outcome.kind
        if kind is Kind.OVERFLOW:
            return _NO
        bits = self.policy.retry_on
        if kind is Kind.CONNECT_FAILURE or kind is Kind.CONNECT_TIMEOUT:
            if bits & RETRY_ON_CONNECT_FAILURE:
                return _BACKOFF
        if bits & RETRY_ON_RESET_BEFORE_REQUEST and not self._request_started:
            return _BACKOFF
        if bits & _RESETS_ANY:
            return _BACKOFF
        return _NO


_NO_RETRY = RetryPolicy(num_retries=0)
