"""The compiled data path appends C string literals with explicit lengths
(`buf_append(b, "server: envoy\\r\\n", 15)`, `head.find("x-request-id", 12)`): a wrong count
sends a NUL byte or a truncated header. Check every such call in ext/*.pyx against its literal."""
from __future__ import annotations

import ast
import pathlib
import re

EXT = pathlib.Path(__file__).resolve().parents[2] / "ext"
CALL = re.compile(r'\b(?:buf_append|find|_log_header)\((?:[^,()"]+,\s*){0,2}'
                  r'("(?:[^"\\]|\\.)*")\s*,\s*(\d+)\)')


def test_every_literal_length_matches():
    checked = 0
    bad = []
    for path in sorted(EXT.glob("*.pyx")):
        text = path.read_text()
        for m in CALL.finditer(text):
            literal = ast.literal_eval(m.group(1))
            checked += 1
            if len(literal.encode("latin-1")) != int(m.group(2)):
                line = text.count("\n", 0, m.start()) + 1
                bad.append(f"{path.name}:{line}: {literal!r} has {len(literal)} bytes, "
                           f"not {m.group(2)}")
    assert checked > 50  # the pattern still finds the calls
    assert not bad, "\n".join(bad)
