"""The machine and tool versions printed with every result."""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys


def _first_line(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout + "\n" + proc.stderr).strip()
    return text.splitlines()[0].strip() if text else None


def machine() -> dict:
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            mem_gb = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    virt = None
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout \
        if os.path.exists("/usr/bin/lscpu") else ""
    m = re.search(r"Hypervisor vendor:\s*(\S+)", lscpu)
    if m:
        virt = f"VM ({m.group(1)})"
    return {
        "cpu_model": model or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "os": _os_release(),
        "memory_gb": mem_gb,
        "virtualization": virt,
        "hostname": platform.node(),
    }


def _os_release() -> str | None:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return None


def meshcore_version() -> str | None:
    try:
        import meshcore
        return getattr(meshcore, "__version__", None)
    except Exception:  # noqa: BLE001 - report, never fail the bench over a version string
        return None


def meshcore_extensions() -> str | None:
    """Whether meshcore's compiled extensions load here, as `meshcore --version` says it. The
    targets run with this interpreter and environment, so this is what they load too."""
    try:
        from meshcore.buildinfo import extensions_summary
        return extensions_summary()
    except Exception:  # noqa: BLE001 - report, never fail the bench over a header line
        return None


def versions(tools: dict[str, str | None]) -> dict:
    """tools: name -> executable path (None when not installed)."""
    out = {"python": sys.version.split()[0] + f" ({sys.executable})",
           "meshcore": meshcore_version(), "extensions": meshcore_extensions()}
    try:
        out["trio"] = __import__("trio").__version__
    except Exception:  # noqa: BLE001
        out["trio"] = None
    try:  # only needed to build the extensions (pip builds them in an isolated environment)
        out["cython"] = __import__("Cython").__version__
    except Exception:  # noqa: BLE001
        pass
    probes = {
        "envoy": ["--version"], "nginx": ["-v"], "haproxy": ["-v"], "wrk": ["-v"],
        "gcc": ["--version"],
    }
    for name, path in tools.items():
        if not path:
            out[name] = None
            continue
        line = _first_line([path, *probes.get(name, ["--version"])]) or "?"
        pattern = r"/(\d+\.\d+\.\d+)/" if name == "envoy" else \
            r"(\d+\.\d+(?:\.\d+)?(?:-[\w.+~]+)?)"
        if name == "gcc":
            pattern = r"\) (\d+\.\d+(?:\.\d+)?)"
        m = re.search(pattern, line)
        out[name] = m.group(1) if m else line
    return out
