"""Problem reporting shared by the config compiler's stages, and the decoded-document record.

Every problem is `<file>: <Kind> <name>: <field path>: <problem>` (or `<file>: document <N>: ...`
when the document has no usable kind/name); `Report.sorted_*` lists them in source order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

__all__ = ["NOT_IMPLEMENTED", "Report", "Doc", "key"]

NOT_IMPLEMENTED = "not implemented yet; ignored"


class Report:
    """Collects problems; `sorted_*` lists them in source order (file, then document), each once."""

    def __init__(self):
        self.errors: list[tuple[str, str]] = []  # (label, message)
        self.warnings: list[tuple[str, str]] = []
        self.order: dict[str, int] = {}  # document label -> position in the sources

    @staticmethod
    def _fmt(label: str, path: str, problem: str) -> str:
        return f"{label}: {path}: {problem}" if path else f"{label}: {problem}"

    def error(self, label: str, path: str, problem: str) -> None:
        self.errors.append((label, self._fmt(label, path, problem)))

    def warn(self, label: str, path: str, problem: str = NOT_IMPLEMENTED) -> None:
        self.warnings.append((label, self._fmt(label, path, problem)))

    def checks(self, label: str, checks) -> bool:
        """Report a meshcore.config.validate.Checks; True when it holds no error."""
        for path, msg in checks.errors:
            self.error(label, path, msg)
        for path, msg in checks.warnings:
            self.warn(label, path, msg)
        return not checks.errors

    def _sorted(self, items) -> list[str]:
        big = len(self.order)
        ranked = sorted(enumerate(items), key=lambda x: (self.order.get(x[1][0], big), x[0]))
        return list(dict.fromkeys(msg for _, (_, msg) in ranked))

    def sorted_errors(self) -> list[str]:
        return self._sorted(self.errors)

    def sorted_warnings(self) -> list[str]:
        return self._sorted(self.warnings)


@dataclass
class Doc:
    """One decoded document of a kind meshcore reads."""

    file: str
    number: int
    kind: str
    name: str
    namespace: str
    label: str
    obj: object  # meshcore.config.istio.*Resource
    raw: dict = None  # the validated document, for telling identical redefinitions from conflicts


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


def key(path: str, k) -> str:
    """`path.k`, or `path["k"]` when k is not an identifier (header names, label keys ...)."""
    if isinstance(k, str) and _IDENT.match(k):
        return f"{path}.{k}" if path else k
    return f"{path}[{orjson.dumps(k, default=str).decode()}]" if isinstance(k, str) else f"{path}[{k!r}]"
