"""hardening.md §2.2's 80 cases against meshcore (tests/integration/hardening_corpus.py), each
sent right after a valid request that leaves a warm pooled upstream connection: every case gets
the strict answer (status, close, what the origin received), leaks nothing upstream, whole or
partial (a malformed chunked body already buffered with its head is refused before the head is
forwarded), and a valid request is served after it.
"""
import pytest

from hardening_corpus import CORPUS, RecordingOrigin, mesh_yaml, run_all, summary
from harness import Proxy, write_config

IDS = [c[0] for c in CORPUS]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    origin = RecordingOrigin()
    px = Proxy([write_config(str(tmp_path_factory.mktemp("corpus")), mesh_yaml(origin.port))],
               workers=1, extra=["--no-access-log"])
    try:
        yield {r.case_id: r for r in run_all(px.port, origin)}
    finally:
        px.stop()
        origin.close()


def test_all_80_cases_ran(reports):
    assert len(reports) == 80 == len(set(IDS))


@pytest.mark.parametrize("case_id", IDS)
def test_case_is_clean(reports, case_id):
    r = reports[case_id]
    assert r.problems == [], r.result
    assert not (r.whole_leak or r.partial_leak), f"leaked upstream: {r.result.upstream}"
    assert r.fresh_request_after, "the next valid request was not served"


def test_issue_9_done_when(reports):
    assert summary(reports.values()) == {"cases": 80, "deviations": 0, "whole_leaks": 0,
                                         "partial_leaks": 0, "unserved_after": 0}
