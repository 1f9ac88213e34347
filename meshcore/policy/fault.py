"""Fault injection (VirtualService `fault`), Envoy `envoy.filters.http.fault` semantics.

Rules of this module (semantics.md §1.27-1.28, Istio `route.TranslateFault`):

* Percentages become Envoy fractional percents: `percentage.value` (double 0-100) ->
  `int(value * 10000)` per MILLION (Go's truncating float->uint32, so 0.57 % -> 5699/1e6); a delay
  without `percentage` falls back to the deprecated int `percent` per HUNDRED; no percentage at
  all -> 0 % -> never injected (an abort without percentage returns the upstream's answer).
* A draw is `rnd % denominator < numerator` with one independent random value per fault (Envoy's
  `evaluateFractionalPercent`). The delay runs first; the abort is decided after it; both can hit.
* Delay: only `fixedDelay` (`exponentialDelay` is unsupported, the delay is dropped). Flag DI,
  stat `fault.delays_injected`. The route timeout starts after the delay (§1.18).
* Abort: only `httpStatus` in 200..599 (gRPC status and HTTP/2 errors are unsupported on an HTTP/1.1
  proxy; the abort is dropped). Local reply: that status, body `fault filter abort`,
  `content-type: text/plain`, flag FI, details `fault_filter_abort`, stat `fault.aborts_injected`;
  the upstream is never contacted, so it is never retried.
* T1: callers pass the random values; nothing here draws them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from meshcore.durations import to_seconds

__all__ = [
    "HUNDRED",
    "MILLION",
    "FaultPolicy",
    "AbortReply",
    "fault_policy_from_istio",
    "decide_fault",
    "fraction_hit",
    "NO_FAULT",
    "ABORT_BODY",
    "ABORT_FLAG",
    "ABORT_DETAILS",
    "DELAY_FLAG",
    "STAT_DELAYS_INJECTED",
    "STAT_ABORTS_INJECTED",
]

HUNDRED = 100
MILLION = 1_000_000

ABORT_BODY = b"fault filter abort"
ABORT_FLAG = "FI"
ABORT_DETAILS = "fault_filter_abort"
DELAY_FLAG = "DI"
STAT_DELAYS_INJECTED = "fault.delays_injected"
STAT_ABORTS_INJECTED = "fault.aborts_injected"

NO_FAULT = (0.0, None)


class AbortReply(NamedTuple):
    """Same fields, same order as `meshcore.local_reply.LocalReply` (usable where one is)."""

    status: int
    body: bytes
    flag: str
    details: str


def fraction_hit(numerator: int, denominator: int, rnd: int) -> bool:
    """Envoy's evaluateFractionalPercent: `rnd % denominator < numerator`."""
    return numerator > 0 and rnd % denominator < numerator


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    delay: float = 0.0  # seconds; 0 = no delay fault
    delay_numerator: int = 0
    delay_denominator: int = MILLION
    abort_status: int = 0  # 0 = no abort fault
    abort_numerator: int = 0
    abort_denominator: int = MILLION
    # Precomputed results of decide_fault and the abort reply (no allocation per request).
    _results: tuple = field(default=(), init=False, repr=False, compare=False)
    abort_reply: Optional[AbortReply] = field(default=None, init=False, compare=False)

    def __post_init__(self):
        if self.delay < 0:
            raise ValueError("delay must be >= 0")
        if self.abort_status and not 200 <= self.abort_status <= 599:
            raise ValueError("abort status must be in 200..599")
        if self.delay_denominator not in (HUNDRED, MILLION) or self.abort_denominator not in (
                HUNDRED, MILLION):
            raise ValueError("denominator must be HUNDRED or MILLION")
        status = self.abort_status or None
        object.__setattr__(self, "_results", (
            NO_FAULT, (self.delay, None), (0.0, status), (self.delay, status)))
        if status is not None:
            body = b"" if status in (204, 304) else ABORT_BODY  # no body allowed on 204/304
            object.__setattr__(self, "abort_reply",
                               AbortReply(status, body, ABORT_FLAG, ABORT_DETAILS))

    @property
    def delay_percent(self) -> float:
        return 100.0 * self.delay_numerator / self.delay_denominator

    @property
    def abort_percent(self) -> float:
        return 100.0 * self.abort_numerator / self.abort_denominator


def decide_fault(policy: FaultPolicy, rnd_delay: int, rnd_abort: int):
    """`(delay_seconds, abort_status_or_None)` for one request; `NO_FAULT` = `(0.0, None)`.

    Flags: DI when `delay_seconds > 0` (sleep first, then start the route timer), FI when aborting
    (reply with `policy.abort_reply`, after the delay). Returns a precomputed tuple.
    """
    d = policy.delay > 0 and fraction_hit(policy.delay_numerator, policy.delay_denominator,
                                          rnd_delay)
    a = policy.abort_status != 0 and fraction_hit(policy.abort_numerator,
                                                  policy.abort_denominator, rnd_abort)
    return policy._results[d + 2 * a]


_seconds = to_seconds  # one duration grammar for config and policy


def _percentage(pct, path: str, warnings: list) -> Optional[int]:
    """`Percent{value}` -> numerator per MILLION, as Istio's Go code computes it."""
    value = float(getattr(pct, "value", pct) or 0.0)
    if value < 0.0 or value > 100.0 or 0.0 < value < 0.0001:
        warnings.append((path, f"percentage {value} is neither 0.0, nor in range [0.0001, 100.0]"))
        value = min(max(value, 0.0), 100.0)
    return int(value * 10000)


def fault_policy_from_istio(fault):
    """Translate a VirtualService `fault` block (`HTTPFaultInjection` Struct or None) like current
    Istio. Returns `(FaultPolicy | None, warnings)`, warnings being `(field, message)` pairs with
    `field` relative to `fault` (e.g. `"delay.percentage"`)."""
    warnings: list[tuple[str, str]] = []
    if fault is None:
        return None, warnings
    delay_in = getattr(fault, "delay", None)
    abort_in = getattr(fault, "abort", None)
    if delay_in is None and abort_in is None:
        warnings.append(("", "HTTP fault injection must have an abort and/or a delay; ignored"))
        return None, warnings

    kw: dict = {}
    if delay_in is not None:
        pct = getattr(delay_in, "percentage", None)
        if pct is not None:
            numerator, denominator = _percentage(pct, "delay.percentage", warnings), MILLION
        else:
            percent = getattr(delay_in, "percent", None) or 0
            if not 0 <= percent <= 100:
                warnings.append(("delay.percent", f"percent {percent} is not in range 0..100"))
                percent = min(max(percent, 0), 100)
            numerator, denominator = percent, HUNDRED
        fixed = getattr(delay_in, "fixed_delay", None)
        if fixed is None:
            if getattr(delay_in, "exponential_delay", None) is not None:
                warnings.append(("delay.exponentialDelay", "exponentialDelay is not supported; "
                                 "delay fault dropped"))
            else:
                warnings.append(("delay", "delay has no fixedDelay; delay fault dropped"))
        else:
            seconds = _seconds(fixed)
            if seconds < 0.001:
                warnings.append(("delay.fixedDelay", "duration must be at least 1ms"))
            if numerator == 0:
                warnings.append(("delay.percentage", "no percentage (or 0%): the delay is never "
                                 "injected"))
            kw.update(delay=max(seconds, 0.0), delay_numerator=numerator,
                      delay_denominator=denominator)

    if abort_in is not None:
        pct = getattr(abort_in, "percentage", None)
        numerator = _percentage(pct, "abort.percentage", warnings) if pct is not None else 0
        if pct is None and getattr(abort_in, "percent", None) is not None:
            warnings.append(("abort.percent", "abort.percent (Istio <= 1.4) is ignored by current "
                             "Istio; use abort.percentage"))
        status = getattr(abort_in, "http_status", None)
        if status is not None:
            if not 200 <= status <= 599:
                warnings.append(("abort.httpStatus", f"HTTP status {status} is not in range "
                                 "200-599; abort fault dropped"))
            else:
                if numerator == 0:
                    warnings.append(("abort.percentage", "no percentage (or 0%): the abort is never "
                                     "injected"))
                kw.update(abort_status=status, abort_numerator=numerator,
                          abort_denominator=MILLION)
        elif getattr(abort_in, "grpc_status", None) is not None:
            warnings.append(("abort.grpcStatus", "gRPC aborts are not supported (HTTP/1.1 proxy); "
                             "abort fault dropped"))
        elif getattr(abort_in, "http2_error", None) is not None:
            warnings.append(("abort.http2Error", "HTTP/2 abort fault injection not supported; "
                             "abort fault dropped"))
        else:
            warnings.append(("abort", "abort configured, but error type not set; dropped"))

    if not kw:
        return None, warnings
    return FaultPolicy(**kw), warnings
