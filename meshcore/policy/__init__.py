"""Sans-IO policy cores (T1): outcome classification, retries, timeouts, fault injection.

* `classify` — the one classifier of upstream attempt outcomes (retry, outlier detection, stats).
* `retry` — `RetryPolicy` from Istio `retries`, request-header overrides, per-request `RetryState`.
* `timeout` — route and per-try deadlines, `x-envoy-expected-rq-timeout-ms`.
* `fault` — `FaultPolicy` from Istio `fault` and the per-request draw.

The generic `classify()` helper is not re-exported here, because the name would shadow the
`meshcore.policy.classify` submodule: import it from there.

Nothing here imports trio, socket, time or os; callers pass `now` and random values.
"""
from meshcore.policy.classify import Kind, Outcome, classify_failure, classify_response
from meshcore.policy.fault import FaultPolicy, decide_fault, fault_policy_from_istio
from meshcore.policy.retry import (Decision, Reason, RetryPolicy, RetryState, final_flags,
                                   merge_request_overrides, parse_retry_on, retry_policy_from_istio)
from meshcore.policy.timeout import Deadlines, plan_deadlines

__all__ = [
    "Kind", "Outcome", "classify_failure", "classify_response",
    "FaultPolicy", "decide_fault", "fault_policy_from_istio",
    "Decision", "Reason", "RetryPolicy", "RetryState", "final_flags", "merge_request_overrides",
    "parse_retry_on", "retry_policy_from_istio",
    "Deadlines", "plan_deadlines",
]
