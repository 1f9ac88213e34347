"""Compile the C helpers in bench/native/ (load generator, backend) at bench start.

Binaries are cached in bench/_build/ under a name derived from the source and compiler, so a
rerun costs nothing; the build is atomic (compile to a temp name, then rename), so concurrent
bench runs never see a half-written binary. No gcc means no helper: callers fall back.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "native")
BUILD = os.path.join(HERE, "_build")

FLAGS = {
    "loadgen": ["-O2", "-pthread"],
    "backend": ["-O2"],
}


class BuildError(RuntimeError):
    pass


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def build(name: str) -> str:
    """Path of the compiled helper `name`, compiling it when needed; raises BuildError."""
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler (gcc) on PATH")
    src = os.path.join(SRC, name + ".c")
    with open(src, "rb") as f:
        source = f.read()
    flags = FLAGS[name]
    digest = hashlib.sha256(source + repr((cc, flags)).encode()).hexdigest()[:16]
    out = os.path.join(BUILD, f"{name}-{digest}")
    if os.access(out, os.X_OK):
        return out
    os.makedirs(BUILD, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=BUILD)
    os.close(fd)
    cmd = [cc, *flags, "-o", tmp, src]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        os.unlink(tmp)
        raise BuildError(f"{' '.join(cmd)}: {exc}") from None
    if proc.returncode != 0:
        os.unlink(tmp)
        err = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise BuildError(f"{cc} exited with {proc.returncode} compiling {name}.c"
                         + (f": {err[-1].strip()}" if err else ""))
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)
    for stale in os.listdir(BUILD):  # binaries of older sources (a running one is unaffected)
        if stale.startswith(name + "-") and stale != os.path.basename(out):
            try:
                os.unlink(os.path.join(BUILD, stale))
            except OSError:
                pass
    return out
