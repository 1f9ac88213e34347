"""Route and per-try deadlines (semantics.md §1.16-1.19, §3.4; Envoy `FilterUtility::finalTimeout`).

Rules of this module:

* Times are float seconds on the caller's monotonic clock; `now` is passed in. No deadline is
  `math.inf` (trio's `move_on_at(inf)` never fires).
* The route timeout (0 = none, Istio's default) is one global deadline over all attempts and
  backoff, armed when the downstream request is complete (Envoy arms it at end of request; after an
  injected fault delay). Expiry -> 504 `upstream request timeout`, flag UT, `response_timeout`.
* The per-try timeout (0 = none) is a fresh timer per attempt. Envoy arms it when the attempt's
  connection is ready and the request is complete, so connect time is bounded by the cluster
  connect timeout, not by it. A per-try timeout >= a non-zero route timeout is ignored.
  Expiry -> outcome `Kind.PER_TRY_TIMEOUT` (retried only under 5xx/gateway-error/reset); final:
  504, flag UT, details `upstream_per_try_timeout`.
* `x-envoy-expected-rq-timeout-ms` sent upstream on each attempt: the per-try timeout if set, else
  the route timeout, capped by what is left of the route timeout (1 when already past it);
  absent when no timeout applies.
* T1: no clock, no I/O.
"""
from __future__ import annotations

import re
from math import inf
from typing import Callable, NamedTuple, Optional

__all__ = [
    "Deadlines",
    "NO_DEADLINES",
    "plan_deadlines",
    "H_UPSTREAM_RQ_TIMEOUT_MS",
    "H_EXPECTED_RQ_TIMEOUT_MS",
    "TIMEOUT_REQUEST_HEADERS",
    "route_timeout_override",
]

H_UPSTREAM_RQ_TIMEOUT_MS = b"x-envoy-upstream-rq-timeout-ms"  # request override of the route timeout
H_EXPECTED_RQ_TIMEOUT_MS = b"x-envoy-expected-rq-timeout-ms"  # written upstream by the proxy
# Consumed by the router and stripped before forwarding (the per-try header lives in
# meshcore.policy.retry.RETRY_REQUEST_HEADERS).
TIMEOUT_REQUEST_HEADERS = (H_UPSTREAM_RQ_TIMEOUT_MS,)

_ABSL_UINT = re.compile(rb"\s*\+?([0-9]+)\s*")


def _ms(seconds: float) -> int:
    """Envoy's duration-to-milliseconds (truncating), robust to float noise (0.3 s -> 300)."""
    return int(round(seconds * 1e6)) // 1000


class Deadlines(NamedTuple):
    global_deadline: float  # absolute; inf = no route timeout
    per_try_timeout: float  # seconds, after Envoy's ">= route timeout -> ignored" rule; 0 = none
    start: float  # when the route timer was armed
    global_timeout_ms: int  # 0 = none
    per_try_timeout_ms: int  # 0 = none

    def per_try_deadline(self, attempt_start: float) -> float:
        """Absolute per-try deadline of an attempt armed at `attempt_start` (inf = none). Not
        clamped to the global deadline: nest the scopes (global outside) and the earlier wins;
        when both are due the route timeout is the one reported."""
        return attempt_start + self.per_try_timeout if self.per_try_timeout_ms else inf

    def expected_timeout_ms(self, now: float) -> int:
        """Value of `x-envoy-expected-rq-timeout-ms` for an attempt starting at `now`; 0 = omit."""
        expected = self.per_try_timeout_ms or self.global_timeout_ms
        if expected and self.global_timeout_ms:
            elapsed = _ms(now - self.start) if now > self.start else 0
            if elapsed >= self.global_timeout_ms:
                return 1  # out of time; 0 would mean "infinite" to the upstream
            left = self.global_timeout_ms - elapsed
            if left < expected:
                expected = left
        return expected


NO_DEADLINES = Deadlines(inf, 0.0, 0.0, 0, 0)


def plan_deadlines(route_timeout: float, per_try_timeout: float, now: float) -> Deadlines:
    """The deadlines of one request whose route timer is armed at `now`.

    `route_timeout` and `per_try_timeout` are seconds, 0 = none (`RoutePolicy.timeout`, possibly
    overridden by `route_timeout_override`; `RetryPolicy.per_try_timeout` after
    `merge_request_overrides`, or 0 without a policy). With neither set the constant
    `NO_DEADLINES` is returned (no allocation).
    """
    global_ms = _ms(route_timeout) if route_timeout > 0 else 0
    per_try_ms = _ms(per_try_timeout) if per_try_timeout > 0 else 0
    if global_ms and per_try_ms >= global_ms:
        per_try_ms = 0
    if not global_ms and not per_try_ms:
        return NO_DEADLINES
    return Deadlines(now + global_ms / 1000.0 if global_ms else inf,
                     per_try_ms / 1000.0, now, global_ms, per_try_ms)


def route_timeout_override(route_timeout: float,
                           get_header: Callable[[bytes], Optional[bytes]]) -> float:
    """`x-envoy-upstream-rq-timeout-ms` replaces the route timeout when it parses as an unsigned
    integer (0 = none); otherwise the route timeout stands. Strip the header either way."""
    value = get_header(H_UPSTREAM_RQ_TIMEOUT_MS)
    if value is None:
        return route_timeout
    m = _ABSL_UINT.fullmatch(value)
    return int(m.group(1)) / 1000.0 if m else route_timeout
