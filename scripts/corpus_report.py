"""Count how `meshcore check` judges every document and file of a config corpus.

    .venv/bin/python scripts/corpus_report.py tests/data/istio-corpus [--list]

Per document: each YAML document is checked alone (as `check` on a file holding only it):
accepted (no warning), warned (accepted with warnings) or rejected (an error). Per file: `check`
on the whole file. Empty documents are not counted. Names are never resolved (`_no_dns`). Uses only `compile_sources`, so the same
script measures older commits too (PYTHONPATH=<export of the commit>).
"""
from __future__ import annotations

import os
import sys

import orjson

from meshcore.config.compile import compile_sources, parse_documents
from meshcore.errors import ConfigError


def _no_dns(name: str, port: int) -> list[str]:
    """Never touch the network: every name "resolves" to a documentation address (RFC 5737)."""
    return ["192.0.2.1"]


def _judge(sources) -> tuple[str, list[str]]:
    try:
        snap = compile_sources(sources, resolver=_no_dns)
    except ConfigError as exc:
        return "rejected", list(exc.problems)
    return ("warned" if snap.warnings else "accepted"), list(snap.warnings)


def corpus_files(root: str) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.join(d, n) for n in names if n.endswith((".yaml", ".yml"))]
    return sorted(out)


def main(argv) -> int:
    root = argv[0]
    listing = "--list" in argv
    docs = {"accepted": 0, "warned": 0, "rejected": 0}
    files = {"accepted": 0, "warned": 0, "rejected": 0}
    for path in corpus_files(root):
        rel = os.path.relpath(path, root)
        data = open(path, "rb").read()
        verdict, _ = _judge({rel: data})
        files[verdict] += 1
        parsed, _ = parse_documents(rel, data)
        for number, obj in parsed:
            if obj is None:
                continue
            verdict, notes = _judge({f"{rel}#{number}.json": orjson.dumps(obj)})
            docs[verdict] += 1
            if listing:
                print(f"{verdict:8} {rel}#{number}" + (f"  {notes[0]}" if notes else ""))
    total = sum(docs.values())
    print(f"documents: {total}  accepted {docs['accepted']}  warned {docs['warned']}  "
          f"rejected {docs['rejected']}")
    print(f"files: {sum(files.values())}  accepted {files['accepted']}  warned {files['warned']}  "
          f"rejected {files['rejected']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
