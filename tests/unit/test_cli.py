"""The command line reads well: every subcommand and flag says what it does and its default."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from meshcore import __version__, replay
from meshcore.cli import build_parser, round_robin_notes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action


def _replay_parser(monkeypatch):
    grabbed = {}

    def grab(self, args=None, namespace=None):
        grabbed["parser"] = self
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(SystemExit):
        replay._parse_args([])
    return grabbed["parser"]


def _flag_parsers(monkeypatch):
    sub = _subparsers(build_parser())
    parsers = {name: p for name, p in sub.choices.items()
               if name not in ("bench", "replay", "top")}
    parsers["replay"] = _replay_parser(monkeypatch)
    from meshcore.top import build_parser as top_parser
    parsers["top"] = top_parser()
    return parsers


def test_every_subcommand_has_a_one_line_description():
    sub = _subparsers(build_parser())
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert set(helps) == {"run", "check", "demo", "bench", "replay", "top", "envoy-config",
                          "iptables"}
    for name, text in helps.items():
        assert text and "\n" not in text and len(text) < 120, name


def test_every_flag_has_a_one_line_help_with_its_default(monkeypatch):
    for name, parser in _flag_parsers(monkeypatch).items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where}: no help"
            assert "\n" not in action.help, where
            assert "default" in action.help or "required" in action.help, \
                f"{where}: the help does not state its default: {action.help!r}"


def test_help_has_no_internal_wording():
    for argv in (["--help"], ["run", "--help"], ["check", "--help"], ["demo", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "meshcore", *argv], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        for phrase in ("fixed interface", "T0", "T1", "sans-IO", "hot path"):
            assert phrase not in proc.stdout, (argv, phrase)


@pytest.mark.parametrize("env, expected", [
    ({}, "compiled extensions loaded ("),
    ({"MESHCORE_NO_EXTENSIONS": "1"}, "compiled extensions disabled by MESHCORE_NO_EXTENSIONS=1"),
])
def test_version_says_whether_the_extensions_are_loaded(env, expected):
    proc = subprocess.run([sys.executable, "-m", "meshcore", "--version"], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "MESHCORE_NO_EXTENSIONS"} | env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"meshcore {__version__}, {expected}"), proc.stdout


def test_version_names_every_extension_built_here():
    from meshcore.buildinfo import extension_names, extensions
    names = extension_names()
    assert {"h1parse", "pool", "ring", "shmatomic"} <= set(names)
    assert set(extensions()) == set(names)


def _snapshot(lb, subset=""):
    from meshcore.config.policy import ClusterPolicy, Endpoint, Snapshot
    eps = tuple(Endpoint("127.0.0.1", p, 1, (), f"127.0.0.1:{p}") for p in (1, 2))
    cluster = ClusterPolicy(f"outbound|80|{subset}|web", "web", 80, subset, eps, lb=lb)
    return Snapshot(1, "h", {}, {cluster.name: cluster})


def test_check_explains_round_robin_per_worker_only_when_it_applies():
    notes = " ".join(round_robin_notes(_snapshot("ROUND_ROBIN", "v1"), 2))
    assert "ROUND_ROBIN with 2 workers (web subset v1)" in notes
    assert "each worker keeps its own cursor" in notes
    assert round_robin_notes(_snapshot("ROUND_ROBIN"), 1) == []
    assert round_robin_notes(_snapshot("RANDOM"), 2) == []


def test_check_prints_the_note_for_the_seed_round_robin_folder():
    proc = subprocess.run([sys.executable, "-m", "meshcore", "check", "--workers", "2",
                           "examples/seed/3-lb-round-robin"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("note: ROUND_ROBIN with 2 workers (myweb-service, myweb-service subset v1)")
    assert proc.stdout.splitlines()[-1].startswith("ok: ")
