"""Pick the compiled twin of a pure module when it is built and allowed.

Every compiled module in ext/ has a pure-Python twin with the same API; the twin is the fallback
and the test oracle. MESHCORE_NO_EXTENSIONS=1 forces the pure versions at import time.
"""
import importlib
import os

DISABLED = bool(os.environ.get("MESHCORE_NO_EXTENSIONS"))


def load(name):
    """Return meshcore._ext.<name>, or None when it is missing or disabled."""
    if DISABLED:
        return None
    try:
        return importlib.import_module(f"meshcore._ext.{name}")
    except ImportError:
        return None
