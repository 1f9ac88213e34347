"""Envoy outlier detection over shared-memory host rows (sans-IO; `now_ms` is always an argument).

Rules of this module (semantics.md §2c, §4; the row layout is meshcore.shm.layout):

* Policy: `OutlierPolicy` is frozen, compiled once from the DestinationRule by
  `outlier_policy_from_istio`. Its defaults are Envoy's defaults as Istio applies them when an
  `outlierDetection` block exists: interval 10 s, baseEjectionTime 30 s, max ejection time 300 s,
  maxEjectionPercent 10, 5 consecutive 5xx (enforced), 5 consecutive gateway failures (detected,
  NOT enforced), 5 consecutive local-origin failures (split mode only, enforced), healthy panic
  threshold 0 (= panic disabled). Without a block there is no detector (`DISABLED`; Envoy's 50 %
  panic threshold). Success-rate and failure-percentage ejection are not implemented.
* Counting (`on_result`, called by every worker for every attempt that reached a host):
  - non-5xx response: clear the 5xx and gateway counters (load first; store only when non-zero, so
    the common case writes nothing to the shared line);
  - 502/503/504: +1 gateway, +1 5xx; other 5xx: +1 5xx and clear gateway;
  - local-origin failures (see meshcore.upstream.outcome): non-split mode counts them as 503/504
    (both counters); split mode counts them only as local-origin, and any attempt that got a
    connection first clears the local-origin counter.
  - Detection fires on the result that makes a counter EQUAL to its threshold (threshold 0 never
    fires), atomically across workers (fetch-add), so exactly one worker handles each run.
* Detection (Envoy `onConsecutiveErrorWorker`): if the host is flagged ejected (even an expired,
  not yet swept ejection) the detection is ignored and the counter keeps counting. Otherwise
  `ejections_detected_<type>` +1 (and the deprecated `ejections_consecutive_5xx` for 5xx), then
  the ejection attempt below, then that type's counter is cleared whatever the attempt decided.
* Ejection (Envoy `ejectHost`), immediate, on the detecting worker:
  1. maxEjectionPercent over `n_hosts` (all hosts of the cluster), `a` = ejections_active:
     - Envoy < 1.28 (Istio 1.4 .. 1.19; `check_mep_on_first_eject=False`, the default here):
       allowed while `100*a < mep*n_hosts`: the first ejection is always allowed even when the
       percentage rounds down to zero hosts, and the limit can be exceeded by one host;
     - Envoy >= 1.28 (`check_mep_on_first_eject=True`): allowed when `100*(a+1) <= mep*n_hosts`;
       with `always_eject_one_host` also whenever a == 0.
     Refused -> `ejections_overflow` +1.
  2. deprecated `ejections_total` +1 for the 5xx type; then enforcement: `enforcing_*` percent,
     compared with `rand100` (0..99, supplied by the caller; 0 and 100 need no randomness).
  3. Reserve: CAS loop on the cluster's `ejections_active` (re-checking step 1 on every retry), so
     the limit holds exactly across workers. 4. Publish: one 64-bit CAS of the host state word
     from 0 (ACTIVE) to `ejected_until_ms` (EJECTED). Losing that CAS (another worker ejected the
     host first) gives the reservation back. 5. Winner: backoff multiplier, stats
     `ejections_enforced_total` and `ejections_enforced_<type>`.
* Ejection time = base x n, n = Envoy's backoff multiplier: +1 per ejection while
  `n*base < max + base`, -1 per sweep while the host is healthy; capped at max(max, base). So the
  first ejection lasts `base` (n counts from 1). Jitter is 0 (Istio does not set it).
* Availability (`is_available`): state word 0, or `ejected_until_ms <= now_ms` (an expired
  ejection counts as available at once, before the sweep clears it). One 64-bit load.
* Sweep (supervisor, every `interval_ms`; the only writer of un-ejections): for each ejected host
  whose time is up: clear the three consecutive counters, CAS the state word back to 0, decrement
  `ejections_active`. For each healthy host: decrement the backoff multiplier (not for a host
  un-ejected in the same sweep).
* Accepted imprecision (all transient, none unbounded): a worker that loses the publish CAS holds
  its reservation for a few hundred ns, during which another worker's ejection may be refused
  (`ejections_overflow`) although it would have fitted; the sweep decrements `ejections_active`
  after un-flagging a host, with the same effect; the multiplier store after an ejection can
  overwrite a concurrent sweep decrement (the next ejection is one step longer). A worker killed
  between step 3 and step 4 leaks one unit of `ejections_active`: `recount_ejections` repairs it.
* Panic (`healthy_set_or_panic`): Envoy's per-priority rule for one priority: if
  min(100, 140*healthy//total) == 100 nothing panics; else if healthy% < threshold the balancer
  picks among ALL hosts (lb_healthy_panic); threshold 0 and nobody healthy -> no host (503 UH).
"""
from __future__ import annotations

from dataclasses import dataclass

from meshcore.durations import to_seconds
from meshcore.shm.layout import (
    C_EJECTIONS_ACTIVE,
    C_EJECTIONS_CONSECUTIVE_5XX,
    C_EJECTIONS_DETECTED_CONSECUTIVE_5XX,
    C_EJECTIONS_DETECTED_CONSECUTIVE_GATEWAY_FAILURE,
    C_EJECTIONS_DETECTED_CONSECUTIVE_LOCAL_ORIGIN_FAILURE,
    C_EJECTIONS_ENFORCED_CONSECUTIVE_5XX,
    C_EJECTIONS_ENFORCED_CONSECUTIVE_GATEWAY_FAILURE,
    C_EJECTIONS_ENFORCED_CONSECUTIVE_LOCAL_ORIGIN_FAILURE,
    C_EJECTIONS_ENFORCED_TOTAL,
    C_EJECTIONS_OVERFLOW,
    C_EJECTIONS_TOTAL,
    H_CONSECUTIVE_5XX,
    H_CONSECUTIVE_GATEWAY,
    H_CONSECUTIVE_LOCAL_ORIGIN,
    H_EJECTIONS_TOTAL,
    H_N_EJECTIONS,
    H_STATE,
)
from meshcore.upstream.outcome import Outcome

__all__ = [
    "OutlierPolicy", "DISABLED", "EjectionType", "outlier_policy_from_istio", "on_result",
    "is_available", "availability", "healthy_set_or_panic", "sweep", "recount_ejections",
    "ejection_ms", "next_backoff", "mep_allows", "OVERPROVISIONING_FACTOR",
]

OVERPROVISIONING_FACTOR = 140  # Envoy default (percent)


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    enabled: bool = True
    interval_ms: int = 10_000
    base_ejection_time_ms: int = 30_000
    max_ejection_time_ms: int = 300_000
    max_ejection_percent: int = 10
    consecutive_5xx: int = 5
    enforcing_consecutive_5xx: int = 100
    consecutive_gateway_failure: int = 5
    enforcing_consecutive_gateway_failure: int = 0
    split_external_local_origin_errors: bool = False
    consecutive_local_origin_failure: int = 5
    enforcing_consecutive_local_origin_failure: int = 100
    healthy_panic_threshold: float = 0.0      # percent; Istio writes minHealthPercent (default 0)
    check_mep_on_first_eject: bool = False    # False: Envoy < 1.28 rule; True: Envoy >= 1.28
    always_eject_one_host: bool = False       # Envoy 1.31+ option (Istio never sets it)


DISABLED = OutlierPolicy(enabled=False, healthy_panic_threshold=50.0)
"""No outlierDetection block: no detector at all, and Envoy's default 50 % panic threshold."""


class EjectionType:
    """Consecutive-error ejection types: (counter offset, detected stat, enforced stat)."""

    CONSECUTIVE_5XX = 0
    CONSECUTIVE_GATEWAY_FAILURE = 1
    CONSECUTIVE_LOCAL_ORIGIN_FAILURE = 2


_COUNTER = (H_CONSECUTIVE_5XX, H_CONSECUTIVE_GATEWAY, H_CONSECUTIVE_LOCAL_ORIGIN)
_DETECTED = (C_EJECTIONS_DETECTED_CONSECUTIVE_5XX, C_EJECTIONS_DETECTED_CONSECUTIVE_GATEWAY_FAILURE,
             C_EJECTIONS_DETECTED_CONSECUTIVE_LOCAL_ORIGIN_FAILURE)
_ENFORCED = (C_EJECTIONS_ENFORCED_CONSECUTIVE_5XX, C_EJECTIONS_ENFORCED_CONSECUTIVE_GATEWAY_FAILURE,
             C_EJECTIONS_ENFORCED_CONSECUTIVE_LOCAL_ORIGIN_FAILURE)

_SUCCESS = int(Outcome.SUCCESS)
_GATEWAY = int(Outcome.GATEWAY_ERROR)
_CONNECT_FAILURE = int(Outcome.CONNECT_FAILURE)
_H_PAIR = H_CONSECUTIVE_5XX  # 8-byte word holding consecutive_5xx and consecutive_gateway
assert H_CONSECUTIVE_GATEWAY == H_CONSECUTIVE_5XX + 4 and H_CONSECUTIVE_5XX % 8 == 0


# ------------------------------------------------------------------------------------------------
# Pure arithmetic


def next_backoff(n: int, base_ms: int, max_ms: int) -> int:
    """Envoy's eject-time backoff after one more ejection: +1 while n*base < max + base."""
    return n + 1 if n * base_ms < max_ms + base_ms else n


def ejection_ms(n: int, base_ms: int, max_ms: int) -> int:
    """Length of an ejection with backoff multiplier n: min(base*n, max(max, base))."""
    return min(base_ms * n, max(max_ms, base_ms))


def mep_allows(active: int, n_hosts: int, policy: OutlierPolicy) -> bool:
    """Whether maxEjectionPercent allows one more ejection with `active` hosts already ejected."""
    if n_hosts <= 0:
        return False
    mep = min(100, policy.max_ejection_percent)
    if policy.check_mep_on_first_eject:
        if 100 * (active + 1) <= mep * n_hosts:
            return True
        return policy.always_eject_one_host and active == 0
    return 100 * active < mep * n_hosts


# ------------------------------------------------------------------------------------------------
# Hot path (workers)


def is_available(host, now_ms: int) -> bool:
    """True unless the host is ejected and its ejection has not expired yet."""
    until = host.cells.load64(host.off)
    return until == 0 or until <= now_ms


def on_result(host, cluster, outcome, now_ms: int, policy: OutlierPolicy, n_hosts: int,
              rand100: int = 0) -> bool:
    """Record one attempt's outcome for `host` (a HostRow) of `cluster` (a ClusterRow).

    Returns True when this call ejected the host. `n_hosts`: hosts in the cluster (the
    maxEjectionPercent denominator). `rand100`: uniform 0..99, used only for enforcing_* values
    strictly between 0 and 100.
    """
    if not policy.enabled:
        return False
    c = host.cells
    o = host.off
    if outcome == _SUCCESS:
        if c.load64(o + _H_PAIR):
            c.store64(o + _H_PAIR, 0)
        if policy.split_external_local_origin_errors and c.load32(o + H_CONSECUTIVE_LOCAL_ORIGIN):
            c.store32(o + H_CONSECUTIVE_LOCAL_ORIGIN, 0)
        return False
    if outcome >= _CONNECT_FAILURE:
        if policy.split_external_local_origin_errors:
            lo = o + H_CONSECUTIVE_LOCAL_ORIGIN
            if outcome != _CONNECT_FAILURE:
                c.store32(lo, 0)  # the connection was established (LocalOriginConnectSuccess)
            if c.fetch_add32(lo, 1) + 1 == policy.consecutive_local_origin_failure:
                return _detected(host, cluster, EjectionType.CONSECUTIVE_LOCAL_ORIGIN_FAILURE,
                                 now_ms, policy, n_hosts, rand100)
            return False
        gateway = True  # connect failure / reset count as 503, timeout as 504
    else:
        if policy.split_external_local_origin_errors and c.load32(o + H_CONSECUTIVE_LOCAL_ORIGIN):
            c.store32(o + H_CONSECUTIVE_LOCAL_ORIGIN, 0)
        gateway = outcome == _GATEWAY
    ejected = False
    if gateway:
        if c.fetch_add32(o + H_CONSECUTIVE_GATEWAY, 1) + 1 == policy.consecutive_gateway_failure:
            ejected = _detected(host, cluster, EjectionType.CONSECUTIVE_GATEWAY_FAILURE, now_ms,
                                policy, n_hosts, rand100)
    elif c.load32(o + H_CONSECUTIVE_GATEWAY):
        c.store32(o + H_CONSECUTIVE_GATEWAY, 0)
    if c.fetch_add32(o + H_CONSECUTIVE_5XX, 1) + 1 == policy.consecutive_5xx:
        if _detected(host, cluster, EjectionType.CONSECUTIVE_5XX, now_ms, policy, n_hosts,
                     rand100):
            ejected = True
    return ejected


def _enforcing(policy: OutlierPolicy, kind: int) -> int:
    if kind == EjectionType.CONSECUTIVE_5XX:
        return policy.enforcing_consecutive_5xx
    if kind == EjectionType.CONSECUTIVE_GATEWAY_FAILURE:
        return policy.enforcing_consecutive_gateway_failure
    return policy.enforcing_consecutive_local_origin_failure


def _detected(host, cluster, kind: int, now_ms: int, policy: OutlierPolicy, n_hosts: int,
              rand100: int) -> bool:
    c = host.cells
    o = host.off
    if c.load64(o + H_STATE):
        return False  # already flagged: Envoy ignores the detection and keeps the counter
    cc = cluster.cells
    co = cluster.off
    cc.fetch_add32(co + _DETECTED[kind], 1)
    if kind == EjectionType.CONSECUTIVE_5XX:
        cc.fetch_add32(co + C_EJECTIONS_CONSECUTIVE_5XX, 1)  # deprecated stat
    ejected = _eject(host, cluster, kind, now_ms, policy, n_hosts, rand100)
    c.store32(o + _COUNTER[kind], 0)
    return ejected


def _eject(host, cluster, kind: int, now_ms: int, policy: OutlierPolicy, n_hosts: int,
           rand100: int) -> bool:
    cc = cluster.cells
    ea = cluster.off + C_EJECTIONS_ACTIVE
    active = cc.load32(ea)
    if not mep_allows(active, n_hosts, policy):
        cc.fetch_add32(cluster.off + C_EJECTIONS_OVERFLOW, 1)
        return False
    if kind == EjectionType.CONSECUTIVE_5XX:
        cc.fetch_add32(cluster.off + C_EJECTIONS_TOTAL, 1)  # deprecated stat
    enforcing = _enforcing(policy, kind)
    if enforcing <= 0 or (enforcing < 100 and rand100 >= enforcing):
        return False
    # reserve one unit of ejections_active, re-checking the limit against concurrent workers
    while not cc.cas32(ea, active, active + 1):
        active = cc.load32(ea)
        if not mep_allows(active, n_hosts, policy):
            cc.fetch_add32(cluster.off + C_EJECTIONS_OVERFLOW, 1)
            return False
    c = host.cells
    o = host.off
    base = policy.base_ejection_time_ms
    n = next_backoff(c.load32(o + H_N_EJECTIONS), base, policy.max_ejection_time_ms)
    until = max(1, now_ms + ejection_ms(n, base, policy.max_ejection_time_ms))
    if not c.cas64(o + H_STATE, 0, until):
        _dec(cc, ea)  # another worker ejected this host first
        return False
    c.store32(o + H_N_EJECTIONS, n)
    c.fetch_add32(o + H_EJECTIONS_TOTAL, 1)
    cc.fetch_add32(cluster.off + C_EJECTIONS_ENFORCED_TOTAL, 1)
    cc.fetch_add32(cluster.off + _ENFORCED[kind], 1)
    return True


def _dec(cells, off: int) -> None:
    """Decrement a uint32 gauge, never below zero."""
    if cells.fetch_add32(off, -1) == 0:
        cells.fetch_add32(off, 1)


# ------------------------------------------------------------------------------------------------
# Balancer input


def availability(hosts, now_ms: int) -> list[bool]:
    """is_available for each HostRow, in order."""
    return [is_available(h, now_ms) for h in hosts]


def healthy_set_or_panic(available, panic_threshold: float) -> tuple[tuple[int, ...], bool]:
    """Indexes the balancer may pick from, and whether the cluster is in panic.

    `available`: one bool per host in endpoint order. Returns (all indexes, True) in panic,
    (healthy indexes, False) otherwise; () when no host may be picked (503 no healthy upstream).
    """
    total = len(available)
    if total == 0:
        return (), False
    healthy = tuple(i for i, ok in enumerate(available) if ok)
    h = len(healthy)
    if h == total:
        return healthy, False
    if min(100, OVERPROVISIONING_FACTOR * h // total) == 100:
        return healthy, False
    if h == 0 and panic_threshold <= 0:
        return (), False
    if 100.0 * h / total < panic_threshold:
        return tuple(range(total)), True
    return healthy, False


# ------------------------------------------------------------------------------------------------
# Control side (supervisor)


def sweep(hosts, cluster, now_ms: int, policy: OutlierPolicy) -> list[int]:
    """Envoy's interval timer for one cluster; returns the indexes (into `hosts`) un-ejected."""
    unejected = []
    cc = cluster.cells
    ea = cluster.off + C_EJECTIONS_ACTIVE
    for i, host in enumerate(hosts):
        c = host.cells
        o = host.off
        until = c.load64(o + H_STATE)
        if until:
            if until <= now_ms:
                c.store64(o + _H_PAIR, 0)
                c.store32(o + H_CONSECUTIVE_LOCAL_ORIGIN, 0)
                if c.cas64(o + H_STATE, until, 0):
                    _dec(cc, ea)
                    unejected.append(i)
            continue
        n = c.load32(o + H_N_EJECTIONS)
        if n:
            c.cas32(o + H_N_EJECTIONS, n, n - 1)  # lost to a concurrent ejection: skip this round
    return unejected


def recount_ejections(hosts, cluster) -> int:
    """Set `ejections_active` to the number of flagged hosts (repair after a worker crash).

    Racy against ejections in flight (a reservation made just before the store is lost, allowing
    one extra ejection); call it when the cluster's workers are quiet, e.g. after a restart.
    """
    n = sum(1 for h in hosts if h.cells.load64(h.off + H_STATE))
    cluster.cells.store32(cluster.off + C_EJECTIONS_ACTIVE, n)
    return n


# ------------------------------------------------------------------------------------------------
# Istio translation


def _duration_ms(value) -> int:
    """Duration (meshcore.config.istio.Duration), Go duration string or seconds -> whole ms."""
    return int(round(to_seconds(value) * 1000))


def outlier_policy_from_istio(od, *, check_mep_on_first_eject: bool = False,
                              always_eject_one_host: bool = False
                              ) -> tuple[OutlierPolicy, tuple[str, ...]]:
    """DestinationRule `outlierDetection` (meshcore.config.istio.OutlierDetection or None)
    -> (OutlierPolicy, warnings), as Istio translates it (semantics §2.14-2.19).

    The deprecated `consecutiveErrors: N` (N > 0) is applied as Istio 1.1-1.6 did:
    consecutive_gateway_failure N enforced, consecutive_5xx not enforced; `consecutive5xxErrors`
    and `consecutiveGatewayErrors` then override their own parts (as in Istio 1.5/1.6).
    """
    if od is None:
        return DISABLED, ()
    w: list[str] = []
    kw: dict = {"check_mep_on_first_eject": check_mep_on_first_eject,
                "always_eject_one_host": always_eject_one_host}

    for attr, key, yaml in (("interval", "interval_ms", "interval"),
                            ("base_ejection_time", "base_ejection_time_ms", "baseEjectionTime")):
        v = getattr(od, attr, None)
        if v is None:
            continue
        ms = _duration_ms(v)
        if ms < 1:
            w.append(f"outlierDetection.{yaml}: {getattr(v, 'text', v)!s} is below 1ms "
                     f"(Istio rejects it); using the default")
        else:
            kw[key] = ms

    ce = getattr(od, "consecutive_errors", None)
    if ce is not None:
        if ce > 0:
            kw.update(consecutive_gateway_failure=ce, enforcing_consecutive_gateway_failure=100,
                      enforcing_consecutive_5xx=0)
            w.append(f"outlierDetection.consecutiveErrors is deprecated: applied as Istio 1.4 did "
                     f"(consecutive_gateway_failure={ce}, 502/503/504 and connection failures "
                     f"only; 5xx not enforced). Istio >= 1.7 ignores it and falls back to 5 "
                     f"consecutive 5xx; use consecutiveGatewayErrors / consecutive5xxErrors")
        else:
            w.append(f"outlierDetection.consecutiveErrors: {ce} is not positive; ignored")
    c5 = getattr(od, "consecutive_5xx_errors", None)
    if c5 is not None:
        kw.update(consecutive_5xx=c5, enforcing_consecutive_5xx=100 if c5 > 0 else 0)
    cg = getattr(od, "consecutive_gateway_errors", None)
    if cg is not None:
        kw.update(consecutive_gateway_failure=cg,
                  enforcing_consecutive_gateway_failure=100 if cg > 0 else 0)

    clo = getattr(od, "consecutive_local_origin_failures", None)
    if getattr(od, "split_external_local_origin_errors", None):
        kw["split_external_local_origin_errors"] = True
        if clo:
            kw.update(consecutive_local_origin_failure=clo,
                      enforcing_consecutive_local_origin_failure=100)
    elif clo is not None:
        w.append("outlierDetection.consecutiveLocalOriginFailures is ignored unless "
                 "splitExternalLocalOriginErrors is true")

    mep = getattr(od, "max_ejection_percent", None)
    if mep:
        if mep < 0 or mep > 100:
            w.append(f"outlierDetection.maxEjectionPercent: {mep} is outside 0..100 "
                     f"(Istio rejects it); clamped")
        mep = min(100, max(0, mep))
        if mep:
            kw["max_ejection_percent"] = mep
    mhp = getattr(od, "min_health_percent", None)
    if mhp is not None:
        if mhp < 0 or mhp > 100:
            w.append(f"outlierDetection.minHealthPercent: {mhp} is outside 0..100 "
                     f"(Istio rejects it); clamped")
        kw["healthy_panic_threshold"] = float(min(100, max(0, mhp)))

    if getattr(od, "outlier_detection_http_error_codes", ()):
        w.append("outlierDetection.outlierDetectionHttpErrorCodes is not implemented; "
                 "5xx classification applies")
    return OutlierPolicy(**kw), tuple(w)
