"""What this installation runs: the version and which compiled extensions load.

Used by `meshcore --version` and by the bench's header, so both say the same thing.
"""
from __future__ import annotations

import os

from meshcore import __version__, _accel

_EXT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext")


def extension_names() -> list[str]:
    """Every compiled extension meshcore ships: a stub (.pyi) or a built module in meshcore/_ext."""
    names = set()
    try:
        entries = os.listdir(_EXT_DIR)
    except OSError:
        return []
    for entry in entries:
        if entry.endswith((".pyi", ".so", ".pyd")) and not entry.startswith("__"):
            names.add(entry.split(".", 1)[0])
    return sorted(names)


def extensions() -> dict[str, str]:
    """name -> "loaded", "disabled" (MESHCORE_NO_EXTENSIONS=1) or "not built"."""
    out = {}
    for name in extension_names():
        if _accel.DISABLED:
            out[name] = "disabled"
        else:
            out[name] = "loaded" if _accel.load(name) is not None else "not built"
    return out


def extensions_summary() -> str:
    status = extensions()
    loaded = [n for n, s in status.items() if s == "loaded"]
    if status and len(loaded) == len(status):
        return f"compiled extensions loaded ({', '.join(loaded)})"
    if _accel.DISABLED:
        return "compiled extensions disabled by MESHCORE_NO_EXTENSIONS=1 (pure Python)"
    missing = [n for n, s in status.items() if s != "loaded"]
    if not loaded:
        return ("compiled extensions not built (pure Python; build them with "
                "`bash scripts/bootstrap.sh`)")
    return f"compiled extensions partly loaded ({', '.join(loaded)}; not built: {', '.join(missing)})"


def version_line() -> str:
    return f"meshcore {__version__}, {extensions_summary()}"
