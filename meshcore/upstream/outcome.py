"""What one upstream attempt produced, as the outlier detector sees it (T0/T1, no I/O).

Rules of this module:

* One value per attempt that reached a host (Envoy reports every attempt, retries included).
  Local replies that never picked a host (overflow 503, no healthy upstream) are not outcomes.
* HTTP responses: `outcome_for_status(status)`:
    not 500..599              -> SUCCESS        (any non-5xx resets the 5xx and gateway counters)
    502, 503, 504             -> GATEWAY_ERROR  (counts as 5xx AND as gateway failure)
    any other 5xx             -> HTTP_5XX       (counts as 5xx, resets the gateway counter)
* Locally originated failures (Envoy `Outlier::Result`) and Envoy's mapping (semantics §4.1-4.2);
  which attempt failure maps to which value is a column of meshcore.policy.classify.FAILURES:
    CONNECT_FAILURE  connect refused / unreachable / connect timeout   (LocalOriginConnectFailed)
    TIMEOUT          request or per-try timeout on a made connection   (LocalOriginTimeout)
    RESET            reset or closed before a complete response        (LocalOriginConnectFailed)
  Default (non-split) mode: CONNECT_FAILURE and RESET count as a 503, TIMEOUT as a 504, so all
  three increment BOTH the 5xx and the gateway-failure counters.
  Split mode (`splitExternalLocalOriginErrors`): they go only to the local-origin counter. The
  router reports "connection established" (LocalOriginConnectSuccess) for every attempt that got a
  connection, which resets the local-origin counter; so TIMEOUT and RESET (connection made, then
  failed) leave the counter at 1, and only consecutive CONNECT_FAILUREs accumulate past 1.
"""
from __future__ import annotations

from enum import IntEnum

__all__ = ["Outcome", "outcome_for_status", "LOCAL_ORIGIN_FAILURES",
           "is_local_origin"]


class Outcome(IntEnum):
    SUCCESS = 0
    HTTP_5XX = 1
    GATEWAY_ERROR = 2
    CONNECT_FAILURE = 3
    TIMEOUT = 4
    RESET = 5


LOCAL_ORIGIN_FAILURES = frozenset({Outcome.CONNECT_FAILURE, Outcome.TIMEOUT, Outcome.RESET})

_SUCCESS = Outcome.SUCCESS
_HTTP_5XX = Outcome.HTTP_5XX
_GATEWAY = Outcome.GATEWAY_ERROR


def outcome_for_status(status: int) -> Outcome:
    """Outcome of an upstream HTTP response with this status code."""
    if status < 500 or status >= 600:
        return _SUCCESS
    if 502 <= status <= 504:
        return _GATEWAY
    return _HTTP_5XX


def is_local_origin(outcome: Outcome) -> bool:
    return outcome >= Outcome.CONNECT_FAILURE
