"""Per-process figures from /proc: CPU time of a process tree and peak RSS (VmHWM) per process.

CPU comes from /proc/<pid>/stat (utime + stime, all threads of the process, in clock ticks) and,
where the kernel exposes it, from /proc/<pid>/task/*/schedstat (on-CPU nanoseconds per thread),
which is much finer than the 10 ms tick on short runs. Both are summed over the whole tree (a
supervisor and its workers, nginx master and worker), so "all workers" are counted.
"""
from __future__ import annotations

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    # the command name (field 2) may contain spaces and parentheses
    return text[text.rindex(")") + 2:].split()


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields:
            kids.setdefault(int(fields[1]), []).append(int(name))
    return kids


def tree(root: int) -> list[int]:
    """root and all its live descendants."""
    kids = children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if os.path.exists(f"/proc/{pid}"):
            out.append(pid)
            todo.extend(kids.get(pid, ()))
    return out


def cpu_stat_s(pid: int) -> float:
    fields = _stat_fields(pid)
    if not fields:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def cpu_sched_s(pid: int) -> float | None:
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        text = _read(f"/proc/{pid}/task/{tid}/schedstat")
        if text is None:
            continue
        total += int(text.split()[0])
    return total / 1e9


class CpuSample:
    """CPU seconds consumed by a set of processes, per pid, at one instant."""

    def __init__(self, pids: list[int]):
        self.stat = {p: cpu_stat_s(p) for p in pids}
        self.sched = {p: cpu_sched_s(p) for p in pids}

    def since(self, before: "CpuSample") -> tuple[float, str]:
        """CPU seconds between two samples, preferring schedstat; (seconds, source)."""
        pids = [p for p in self.stat if p in before.stat]
        if pids and all(self.sched[p] is not None and before.sched[p] is not None for p in pids):
            return sum(self.sched[p] - before.sched[p] for p in pids), "schedstat"
        return sum(self.stat[p] - before.stat[p] for p in pids), "stat"


def status_kb(pid: int, key: str) -> int | None:
    text = _read(f"/proc/{pid}/status")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def reset_peak_rss(pids: list[int]) -> bool:
    """Set each process's VmHWM back to its current RSS (`clear_refs` 5, Linux >= 4.0), so a
    peak read later is the peak under load, not a start-up transient (imports, config
    parsing). Done for every target alike; False when the kernel or permissions refuse."""
    ok = True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok


def cmdline(pid: int) -> str:
    text = _read(f"/proc/{pid}/cmdline") or ""
    return " ".join(text.split("\0")).strip()


def memory(root: int) -> dict:
    """Peak and current RSS per process of the tree; 'workers' are the root's descendants
    (or the root itself when it has none)."""
    pids = tree(root)
    procs = []
    for pid in pids:
        hwm = status_kb(pid, "VmHWM")
        if hwm is None:
            continue
        procs.append({"pid": pid, "role": "main" if pid == root else "child",
                      "cmd": cmdline(pid)[:160], "vmhwm_kb": hwm,
                      "vmrss_kb": status_kb(pid, "VmRSS")})
    # helper children that are not workers (multiprocessing's resource tracker) do not count
    workers = [p for p in procs
               if p["role"] == "child" and "resource_tracker" not in p["cmd"]] or procs
    return {
        "processes": procs,
        "peak_rss_per_worker_mb": max((p["vmhwm_kb"] for p in workers), default=0) / 1024,
        "peak_rss_total_mb": sum(p["vmhwm_kb"] for p in procs) / 1024,
    }
