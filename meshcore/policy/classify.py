"""The one classifier of upstream attempt outcomes, shared by retries, outlier detection and stats.

Rules of this module:

* Every upstream attempt ends in exactly one `Outcome`: a response head arrived (`Kind.RESPONSE`,
  with its status), or one failure `Kind`. Retry (`policy.retry`), outlier detection and stats all
  read the same object, so they cannot disagree on what counts as a failure (architecture.md,
  "one classifier of outcomes").
* Outcomes are immutable module-level constants. `classify_response(status)` is one list index and
  allocates nothing; `classify_failure(...)` is one list index too. Response *headers* are not part
  of an outcome (that would force an allocation per response); the few consumers that need them
  (`grpc-status`, `x-envoy-ratelimited`, retriable header names) receive the response head next to
  the outcome, see `RetryState.on_outcome(..., headers=...)`.
* T1: no I/O, no clock, no randomness; nothing is imported from the shell.

Failure kinds and what they imply (semantics.md §3.2, §9; Envoy's router):

==========================  ======  =====  ============  ============  ===========================
kind                        status  flag   outlier code  local origin  Envoy reset reason
==========================  ======  =====  ============  ============  ===========================
CONNECT_FAILURE             503     UF     503           yes           remote connection failure
CONNECT_TIMEOUT             503     UF     503           yes           connection timeout
RESET_BEFORE_RESPONSE       503     UC     503           yes           connection termination
PER_TRY_TIMEOUT             504     UT     504           yes           (per-try timer; local reset)
OVERFLOW                    503     UO     0 (none)      yes           overflow (circuit breaker)
PROTOCOL_ERROR              502     UPE    503           yes           protocol error
==========================  ======  =====  ============  ============  ===========================

The table is `FAILURES` below; every consumer reads its columns through the `Outcome`:
`stat` (the worker stats row counter an attempt with this outcome increments, -1 for none),
`outlier` (the meshcore.upstream.outcome value reported to outlier detection, None for none) and
`reply` (the Envoy local reply a final failure is answered with). Responses carry their counter
and their outlier value too, so stats, outlier detection, retries and local
replies all read one row per outcome. (A response's counter is upstream_rq_total; its status class,
upstream_rq_<N>xx, is charged once per request on the final response, as Envoy does.)

* `status` is the local reply status the failure produces when it is final (§9).
* `outlier_code` is the HTTP code Envoy's outlier detector sees in its default (non-split) mode:
  every upstream reset is reported as `LocalOriginConnectFailed` (503), a timeout as
  `LocalOriginTimeout` with the router's timeout code (504); overflow is not reported at all
  (the breaker is cluster-wide, not the host's fault). For responses it is the response status.
  In split mode (`splitExternalLocalOriginErrors`) failures with `local_origin` go only to the
  local-origin counter and responses only to the 5xx/gateway counters (semantics.md §4.1-4.2).
* `request_bytes_sent`: whether any request byte was written upstream in this attempt (Envoy's
  `upstream_request_started`, which gates `reset-before-request`). Connect failures and overflow
  never sent anything.
* `reused_connection` / `response_bytes_received` describe a reset on a pooled keep-alive connection
  (the stale-connection race, hardening.md §5): only RESET_BEFORE_RESPONSE carries them.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple, Optional

from meshcore import local_reply as lr
from meshcore.shm.layout import W_INDEX
from meshcore.upstream.outcome import Outcome as OutlierOutcome, outcome_for_status

__all__ = [
    "Kind",
    "Outcome",
    "FailureRow",
    "FAILURES",
    "classify",
    "classify_response",
    "classify_failure",
    "GATEWAY_ERROR_CODES",
]

GATEWAY_ERROR_CODES = (502, 503, 504)


class Kind(IntEnum):
    """How one upstream attempt ended."""

    RESPONSE = 0  # a complete response head arrived (any status)
    CONNECT_FAILURE = 1  # connect refused / unreachable / reset during connect: nothing sent
    CONNECT_TIMEOUT = 2  # the connect timer (cluster connectTimeout) fired: nothing sent
    RESET_BEFORE_RESPONSE = 3  # connection closed/reset before a complete response head
    PER_TRY_TIMEOUT = 4  # the per-try timer fired before the response head
    OVERFLOW = 5  # a circuit breaker refused the attempt (never retried)
    PROTOCOL_ERROR = 6  # the upstream sent an invalid response head (-> 502)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The classified result of one upstream attempt. Compare with `is`/`==`; never mutate."""

    kind: Kind
    status: int  # the response status, or the local reply status a final failure produces
    flag: str  # Envoy response flag a final failure contributes ("" for a response)
    outlier_code: int  # code reported to outlier detection in non-split mode; 0 = not reported
    local_origin: bool  # a locally detected failure (split-mode local-origin counter)
    request_bytes_sent: bool
    reused_connection: bool = False
    response_bytes_received: bool = False
    stat: int = -1  # worker stats row counter (meshcore.shm.layout W_* index); -1 = none
    outlier: Optional[OutlierOutcome] = None  # what outlier detection sees; None = not reported
    reply: Optional[lr.LocalReply] = None  # local reply of a final failure; None for responses

    @property
    def is_response(self) -> bool:
        return self.kind is Kind.RESPONSE

    @property
    def is_5xx(self) -> bool:
        """Counts for outlier detection's consecutive_5xx (non-split mode)."""
        return 500 <= self.outlier_code <= 599

    @property
    def is_gateway_error(self) -> bool:
        """Counts for outlier detection's consecutive_gateway_failure (non-split mode)."""
        return self.outlier_code in GATEWAY_ERROR_CODES

    @property
    def is_failure(self) -> bool:
        """A failure for stats/success-rate purposes: any failure kind or a 5xx response."""
        return self.kind is not Kind.RESPONSE or 500 <= self.status <= 599


# ---------------------------------------------------------------------------------------------
# Constant tables

_MAX_STATUS = 999  # the head parser accepts three-digit status codes only


def _response(status: int) -> Outcome:
    # upstream_rq_completed and upstream_rq_<N>xx are charged once per request, on the final
    # response (Envoy's chargeUpstreamCode), not per attempt: an attempt counts upstream_rq_total
    return Outcome(Kind.RESPONSE, status, "", status, False, True,
                   stat=W_INDEX["upstream_rq_total"], outlier=outcome_for_status(status))


_RESPONSES: list = [None] * 100 + [_response(s) for s in range(100, _MAX_STATUS + 1)]


class FailureRow(NamedTuple):
    status: int  # local reply status when final
    flag: str  # Envoy response flag
    outlier_code: int  # code outlier detection sees in non-split mode (0: not reported)
    outlier: Optional[OutlierOutcome]  # the outlier detector's input (None: not reported)
    stat: Optional[str]  # Envoy cluster counter of one attempt ending so (None: none here)
    reply: lr.LocalReply  # Envoy's local reply when the failure is final


# The one table of failure outcomes (semantics.md §3.2, §4.1-4.2, §9).
FAILURES = {
    Kind.CONNECT_FAILURE: FailureRow(503, "UF", 503, OutlierOutcome.CONNECT_FAILURE,
                                     "upstream_cx_connect_fail", lr.CONNECT_FAILURE),
    Kind.CONNECT_TIMEOUT: FailureRow(503, "UF", 503, OutlierOutcome.CONNECT_FAILURE,
                                     "upstream_cx_connect_timeout", lr.CONNECT_TIMEOUT),
    Kind.RESET_BEFORE_RESPONSE: FailureRow(503, "UC", 503, OutlierOutcome.RESET,
                                           "upstream_rq_rx_reset", lr.CONNECTION_TERMINATION),
    Kind.PER_TRY_TIMEOUT: FailureRow(504, "UT", 504, OutlierOutcome.TIMEOUT,
                                     "upstream_rq_per_try_timeout", lr.PER_TRY_TIMEOUT),
    # the breaker refused: not the host's fault, Envoy reports nothing to outlier detection; the
    # overflow counters are counted where the breaker refused
    Kind.OVERFLOW: FailureRow(503, "UO", 0, None, None, lr.OVERFLOW),
    Kind.PROTOCOL_ERROR: FailureRow(502, "UPE", 503, OutlierOutcome.RESET, None,
                                    lr.UPSTREAM_PROTOCOL_ERROR),
}
_NEVER_SENT = (Kind.CONNECT_FAILURE, Kind.CONNECT_TIMEOUT, Kind.OVERFLOW)


def _failure_index(kind: int, sent: bool, reused: bool, got: bool) -> int:
    return kind * 8 + sent * 4 + reused * 2 + got


_FAILURES: list = [None] * (8 * (max(Kind) + 1))
for _kind, _row in FAILURES.items():
    _status, _flag, _code = _row.status, _row.flag, _row.outlier_code
    for _sent in (False, True):
        for _reused in (False, True):
            for _got in (False, True):
                if _kind in _NEVER_SENT:
                    sent_, reused_, got_ = False, False, False
                elif _kind is Kind.RESET_BEFORE_RESPONSE:
                    sent_, reused_, got_ = _sent, _reused, _got
                else:
                    sent_, reused_, got_ = _sent, False, False
                # Canonicalise: one object per distinct field set, so `is` comparisons work.
                _FAILURES[_failure_index(_kind, _sent, _reused, _got)] = (
                    _FAILURES[_failure_index(_kind, sent_, reused_, got_)]
                    or Outcome(_kind, _status, _flag, _code, True, sent_, reused_, got_,
                               stat=W_INDEX[_row.stat] if _row.stat else -1,
                               outlier=_row.outlier, reply=_row.reply))
del _kind, _row, _status, _flag, _code, _sent, _reused, _got


# ---------------------------------------------------------------------------------------------
# Classifiers


def classify_response(status: int) -> Outcome:
    """The outcome of an attempt whose response head arrived. Allocation-free (constant lookup).

    Raises ValueError for a status outside 100..999 (the head parser never produces one).
    """
    if 100 <= status <= _MAX_STATUS:
        return _RESPONSES[status]
    raise ValueError(f"invalid response status {status!r}")


def classify_failure(kind: Kind, request_bytes_sent: bool = True, reused_connection: bool = False,
                     response_bytes_received: bool = False) -> Outcome:
    """The outcome of an attempt that failed before a complete response head. Allocation-free.

    `request_bytes_sent` is ignored (False) for connect failures, connect timeouts and overflow;
    `reused_connection` / `response_bytes_received` only matter for RESET_BEFORE_RESPONSE.
    """
    if kind is Kind.RESPONSE or not 0 < kind <= Kind.PROTOCOL_ERROR:
        raise ValueError(f"not a failure kind: {kind!r}")
    return _FAILURES[kind * 8 + (request_bytes_sent and 4) + (reused_connection and 2)
                     + (response_bytes_received and 1)]


def classify(status_or_kind, request_bytes_sent: bool = True, reused_connection: bool = False,
             response_bytes_received: bool = False) -> Outcome:
    """`classify(200)` -> response outcome; `classify(Kind.CONNECT_FAILURE)` -> failure outcome."""
    if type(status_or_kind) is Kind:
        return classify_failure(status_or_kind, request_bytes_sent, reused_connection,
                                response_bytes_received)
    return classify_response(status_or_kind)
