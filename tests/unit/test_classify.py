"""The one outcome classifier (meshcore.policy.classify)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcore.policy.classify import (Kind, Outcome, classify, classify_failure,
                                      classify_response)

FAILURES = [k for k in Kind if k is not Kind.RESPONSE]


def test_response_outcomes_are_cached_constants():
    assert classify_response(200) is classify_response(200)
    assert classify(200) is classify_response(200)
    o = classify_response(204)
    assert o.kind is Kind.RESPONSE and o.is_response and o.status == 204
    assert o.flag == "" and o.outlier_code == 204 and not o.local_origin
    assert o.request_bytes_sent and not o.is_failure


@given(st.integers(min_value=100, max_value=999))
def test_response_fields_follow_status(status):
    o = classify_response(status)
    assert o.status == status == o.outlier_code
    assert o.is_5xx == (500 <= status <= 599)
    assert o.is_gateway_error == (status in (502, 503, 504))
    assert o.is_failure == (500 <= status <= 599)


@pytest.mark.parametrize("status", [0, 99, 1000, -1])
def test_invalid_status_rejected(status):
    with pytest.raises(ValueError):
        classify_response(status)


@pytest.mark.parametrize("kind,status,flag,code", [
    (Kind.CONNECT_FAILURE, 503, "UF", 503),
    (Kind.CONNECT_TIMEOUT, 503, "UF", 503),
    (Kind.RESET_BEFORE_RESPONSE, 503, "UC", 503),
    (Kind.PER_TRY_TIMEOUT, 504, "UT", 504),
    (Kind.OVERFLOW, 503, "UO", 0),
    (Kind.PROTOCOL_ERROR, 502, "UPE", 503),
])
def test_failure_table(kind, status, flag, code):
    o = classify_failure(kind)
    assert (o.kind, o.status, o.flag, o.outlier_code) == (kind, status, flag, code)
    assert o.local_origin and o.is_failure and not o.is_response
    assert o.is_5xx == (code != 0)
    assert o.is_gateway_error == (code in (502, 503, 504))


def test_overflow_not_reported_to_outlier_detection():
    o = classify_failure(Kind.OVERFLOW)
    assert o.outlier_code == 0 and not o.is_5xx and not o.is_gateway_error


@pytest.mark.parametrize("kind", [Kind.CONNECT_FAILURE, Kind.CONNECT_TIMEOUT, Kind.OVERFLOW])
def test_nothing_sent_kinds_ignore_flags(kind):
    a = classify_failure(kind, request_bytes_sent=True, reused_connection=True,
                         response_bytes_received=True)
    assert a is classify_failure(kind, False)
    assert not a.request_bytes_sent and not a.reused_connection


@pytest.mark.parametrize("kind", [Kind.PER_TRY_TIMEOUT, Kind.PROTOCOL_ERROR])
def test_sent_flag_kept_reuse_dropped(kind):
    assert classify_failure(kind).request_bytes_sent
    assert not classify_failure(kind, request_bytes_sent=False).request_bytes_sent
    o = classify_failure(kind, True, True, True)
    assert o is classify_failure(kind, True) and not o.reused_connection


def test_reset_carries_all_three_flags():
    seen = set()
    for sent in (False, True):
        for reused in (False, True):
            for got in (False, True):
                o = classify_failure(Kind.RESET_BEFORE_RESPONSE, sent, reused, got)
                assert (o.request_bytes_sent, o.reused_connection, o.response_bytes_received) == (
                    sent, reused, got)
                assert o is classify(Kind.RESET_BEFORE_RESPONSE, sent, reused, got)
                seen.add(id(o))
    assert len(seen) == 8


def test_failure_defaults_and_errors():
    assert classify_failure(Kind.RESET_BEFORE_RESPONSE).request_bytes_sent
    with pytest.raises(ValueError):
        classify_failure(Kind.RESPONSE)


def test_outcomes_are_frozen():
    with pytest.raises(AttributeError):
        classify_response(200).status = 500  # type: ignore[misc]
    assert isinstance(classify_failure(Kind.OVERFLOW), Outcome)


@pytest.mark.parametrize("module", ["classify", "retry", "timeout", "fault"])
def test_modules_are_t1(module):
    """T1 cores import no trio/socket/time/os/multiprocessing (architecture.md tiers)."""
    import ast
    import importlib

    m = importlib.import_module(f"meshcore.policy.{module}")
    with open(m.__file__) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"trio", "socket", "time", "os", "multiprocessing", "random"}


def test_package_exports_submodule_not_function():
    import meshcore.policy
    import meshcore.policy.classify as m

    assert hasattr(m, "classify_response")
    assert meshcore.policy.classify is m
