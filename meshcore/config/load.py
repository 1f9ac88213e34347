"""Read configuration sources from disk.

`read_sources(paths)` returns `{display name: bytes}`; decoding and validation happen in
`meshcore.config.compile.compile_sources`, which names problems by these display names.
A directory expands to its `*.yaml`, `*.yml` and `*.json` files (not recursive), sorted by name;
its display names are `<dir>/<file>` as the directory was given.
"""
from __future__ import annotations

import os

from meshcore.errors import ConfigError

__all__ = ["CONFIG_SUFFIXES", "read_sources"]

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def _read(path: str, display: str, problems: list[str], out: dict[str, bytes]) -> None:
    try:
        with open(path, "rb") as f:
            out[display] = f.read()
    except OSError as e:
        problems.append(f"{display}: cannot read: {e.strerror or e}")


def read_sources(paths: list[str]) -> dict[str, bytes]:
    """Read files, or directories expanded to their config files, in the order given.

    Raises ConfigError naming every path that cannot be read (missing, permission denied, a
    directory without config files is not an error: it simply contributes nothing).
    """
    out: dict[str, bytes] = {}
    problems: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            try:
                names = sorted(os.listdir(p))
            except OSError as e:
                problems.append(f"{p}: cannot read: {e.strerror or e}")
                continue
            for name in names:
                if name.startswith(".") or not name.endswith(CONFIG_SUFFIXES):
                    continue
                full = os.path.join(p, name)
                if os.path.isdir(full):
                    continue
                _read(full, full, problems, out)
        else:
            _read(p, p, problems, out)
    if problems:
        raise ConfigError(problems)
    return out
