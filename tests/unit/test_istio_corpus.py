"""Istio's own configuration (tests/data/istio-corpus, see its README) loads as Istio judges it.

- Istio's validator test data (pkg/config/validation/testdata/crds): every document marked `_err`
  is rejected, at the field Istio names; every other document is accepted.
- Every document of the corpus, checked alone (as `meshcore check` on a file holding only it):
  accepted, accepted with warnings, or rejected exactly as listed in expected-verdicts.txt, with
  the first problem of each rejection. Regenerate the list (and review the diff) with
  `.venv/bin/python tests/unit/test_istio_corpus.py > tests/data/istio-corpus/expected-verdicts.txt`.
Names are never resolved: every DNS lookup answers a documentation address (RFC 5737).
"""
from __future__ import annotations

import os
import re
import sys

import orjson
import pytest

from meshcore.config.compile import compile_sources, parse_documents
from meshcore.errors import ConfigError

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "istio-corpus")
EXPECTED = os.path.join(CORPUS, "expected-verdicts.txt")
VALIDATION = os.path.join(CORPUS, "istio", "pkg", "config", "validation", "testdata", "crds")


def _no_dns(name, port):
    return ["192.0.2.1"]


def _files():
    out = []
    for d, _, names in os.walk(CORPUS):
        out += [os.path.join(d, n) for n in names if n.endswith((".yaml", ".yml"))]
    return sorted(out)


def _documents(path):
    rel = os.path.relpath(path, CORPUS)
    with open(path, "rb") as f:
        docs, _ = parse_documents(rel, f.read())
    return rel, [(n, d) for n, d in docs if d is not None]


def verdict(name: str, doc) -> tuple[str, str]:
    """(accepted|warned|rejected, the first problem of a rejection without its file name)."""
    try:
        s = compile_sources({f"{name}.json": orjson.dumps(doc)}, resolver=_no_dns)
    except ConfigError as e:
        return "rejected", e.problems[0].split(": ", 1)[1]
    return ("warned" if s.warnings else "accepted"), ""


def all_verdicts() -> list[str]:
    lines = []
    for path in _files():
        rel, docs = _documents(path)
        for n, doc in docs:
            v, why = verdict(f"{rel}#{n}", doc)
            lines.append(f"{v} {rel}#{n}" + (f" | {why}" if why else ""))
    return lines


def test_every_corpus_document_has_its_expected_verdict():
    with open(EXPECTED) as f:
        expected = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]
    assert all_verdicts() == expected


def test_no_published_sample_is_rejected():
    """Rejections are Istio's own invalid test cases, API-doc fragments, or what Istio rejects too."""
    rejected = [line for line in all_verdicts() if line.startswith("rejected ")]
    assert not [line for line in rejected if line.startswith("rejected istio/samples/")]
    assert not [line for line in rejected if line.startswith("rejected istio/tests/testdata/")]
    assert not [line for line in rejected if "/dataset/" in line]


# PyYAML reads YAML 1.1, where a plain scalar in a flow sequence cannot hold `:`; Go's YAML (kubectl,
# istioctl) reads `[1.2.3.4, 001:db8::]`. meshcore reports the document as invalid YAML (quote the
# address to load it); the other documents of that file are checked one by one.
YAML_11_LIMITS = {("serviceentry-valid.yaml", 1): "found unexpected ':'"}


def _split_documents(path):
    with open(path, "rb") as f:
        texts = re.split(rb"(?m)^---\s*$", f.read())
    out = []
    for n, text in enumerate(texts, 1):
        docs, problems = parse_documents(os.path.basename(path), text)
        docs = [d for _, d in docs if d is not None]
        if docs or problems:
            out.append((n, docs[0] if docs else None, problems))
    return out


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(VALIDATION) if n.endswith(".yaml")))
def test_istio_validator_testdata_parity(name):
    docs = _split_documents(os.path.join(VALIDATION, name))
    assert docs
    for n, doc, problems in docs:
        if (name, n) in YAML_11_LIMITS:
            assert doc is None and YAML_11_LIMITS[name, n] in problems[0]
            continue
        assert doc is not None and not problems, (n, problems)
        want = doc.pop("_err", None)
        v, why = verdict(f"{name}#{n}", doc)
        if want is None:
            assert v != "rejected", (n, why)
            continue
        assert v == "rejected", (n, want)
        field = re.match(r"(spec[\w.\[\]]*): ", want)
        if field:  # Istio names the field: so does meshcore
            assert f": {field.group(1)}" in why, (want, why)


if __name__ == "__main__":
    sys.stdout.write("# verdict path#document | first problem of a rejection (test_istio_corpus.py)\n")
    sys.stdout.write("\n".join(all_verdicts()) + "\n")
