"""The bench's outputs are honest at a glance: a --quick run says it is a smoke run, a panel at a
fraction of each target's own maximum names each target's rate, and the header says whether
meshcore's compiled extensions load (not whether Cython, a build-only tool, is importable)."""
from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import report, sysinfo  # noqa: E402

matplotlib = pytest.importorskip("matplotlib")


def _data(quick: bool) -> dict:
    lat = {p: 100.0 * (i + 1) for i, p in enumerate(report.ALL_PCTS)}
    scenarios = [
        {"key": "open-1c-1000", "label": "1 conn, 1000 rps", "mode": "open", "conns": 1,
         "generator": "cgen", "rate": 1000.0, "frac": None},
        {"key": "open-1c-50%", "label": "1 conn, 50% of max", "mode": "open", "conns": 1,
         "generator": "cgen", "rate": None, "frac": 0.5},
    ]
    summary = {
        "direct": {"open-1c-1000": {"n": 10, "latency_us": lat, "rate": 1000.0, "rps": 1000.0},
                   "open-1c-50%": {"n": 10, "latency_us": lat, "rate": 21000.0, "rps": 20500.0}},
        "meshcore": {"open-1c-1000": {"n": 10, "latency_us": lat, "rate": 1000.0, "rps": 990.0},
                     "open-1c-50%": {"n": 10, "latency_us": lat, "rate": 2500.0, "rps": 2400.0}},
    }
    return {"options": {"quick": quick, "duration": 0.4, "rounds": 1},
            "analysis": {"summary": summary}, "scenarios": scenarios,
            "targets": {"direct": {}, "meshcore": {}}, "generator": {"builtin_name": "cgen"}}


def _figures(monkeypatch, data, tmp_path):
    from matplotlib.figure import Figure
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    report.make_plots(data, str(tmp_path))
    return saved


def test_quick_latency_plot_says_it_is_a_smoke_run_and_names_each_rate(monkeypatch, tmp_path):
    fig, = _figures(monkeypatch, _data(quick=True), tmp_path)
    assert fig._suptitle.get_text().startswith("SMOKE RUN (--quick: 0.4 s per point, 1 round)")
    fixed, frac = fig.axes
    assert fixed.get_title() == "1 conn, 1000 rps: the same rate for every target"
    assert [t.get_text() for t in fixed.get_legend().get_texts()] == ["direct", "meshcore"]
    assert frac.get_title() == "1 conn, 50% of max: each target at its own rate"
    assert [t.get_text() for t in frac.get_legend().get_texts()] == \
        ["direct at 21,000 rps", "meshcore at 2,500 rps"]


def test_a_full_run_is_not_called_a_smoke_run(monkeypatch, tmp_path):
    fig, = _figures(monkeypatch, _data(quick=False), tmp_path)
    assert "SMOKE" not in fig._suptitle.get_text()
    assert report.smoke_note(_data(quick=False)) is None


def test_header_reports_the_extensions_not_cython():
    versions = sysinfo.versions({})
    assert versions["extensions"].startswith("compiled extensions loaded (")
    data = {"machine": {"cpu_model": "x", "cores": 2, "cores_usable": 2, "kernel": "k", "os": "o",
                        "memory_gb": 1}, "versions": versions,
            "backend": {"kind": "builtin", "note": ""}, "generator": {"builtin": "g", "wrk": None,
                                                                   "latency": "l"},
            "options": {"rounds": 1, "duration": 0.4, "warmup": 0.1}, "pinning": {"generator": None}}
    lines = dict(report._context_lines(data))
    assert lines["meshcore"] == versions["extensions"]
    assert "cython" not in lines["not installed"] and "extensions" not in lines["not installed"]
