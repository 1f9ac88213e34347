"""Turn the raw runs into medians, per-round ratios and target checks, and write them as a
terminal table, results.json, results.md and PNG plots."""
from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict

PCTS = ["p50", "p90", "p99", "p99.9"]
ALL_PCTS = ["p50", "p75", "p90", "p99", "p99.9", "p99.99"]
RSS_GOAL_MB = 30.0
BREAKDOWN = ("requests", "worker_us", "user_us", "kernel_us", "loop_us", "policy_us", "log_us",
             "policy_calls_per_request")
# Issue 8's targets against Envoy --concurrency 1 in the same run, per --profile.
GOALS = {"bare": {"rps": 2.0, "cpu": 0.4}, "istio": {"rps": 1.5, "cpu": 0.6}}


def _ok(r: dict) -> bool:
    return "error" not in r


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _bad(r: dict) -> int:
    return sum(int(r.get(k) or 0) for k in ("errors", "non2xx", "timeouts", "dropped"))


def max_rps(runs: list[dict]) -> dict:
    """(target, conns) -> median closed-loop rps by the built-in generator."""
    acc = defaultdict(list)
    for r in runs:
        if _ok(r) and r["mode"] == "closed" and r.get("generator") != "wrk" and r.get("rps"):
            acc[(r["target"], r["conns"])].append(r["rps"])
    return {k: statistics.median(v) for k, v in acc.items()}


def summarize(runs: list[dict]) -> dict:
    groups = defaultdict(list)
    failures = defaultdict(int)
    for r in runs:
        if _ok(r):
            groups[(r["target"], r["scenario"])].append(r)
        else:
            failures[(r["target"], r["scenario"])] += 1
    out: dict = {}
    for (t, s), rs in groups.items():
        out.setdefault(t, {})[s] = {
            "n": len(rs),
            "failed_runs": failures.get((t, s), 0),
            "generator": rs[0].get("generator"),
            "conns": rs[0]["conns"],
            "rate": _med(r.get("requested_rate") for r in rs),
            "rps": _med(r.get("rps") for r in rs),
            "rps_range": [min(r["rps"] for r in rs), max(r["rps"] for r in rs)],
            "latency_us": {p: _med(r["latency_us"].get(p) for r in rs)
                           for p in ALL_PCTS + ["mean", "max"]},
            "cpu_per_1k_s": _med(r.get("target_cpu_per_1k_s") for r in rs),
            "cpu_util": _med(r.get("target_cpu_util") for r in rs),
            "backend_cpu_per_1k_s": _med(r.get("backend_cpu_per_1k_s") for r in rs),
            "errors": sum(_bad(r) for r in rs),
            "generator_cpu_util": max((r.get("generator_cpu_util") or 0) for r in rs),
            "sched_lag_us": _med((r.get("sched_lag_us") or {}).get("mean") for r in rs),
            "breakdown": {k: _med((r.get("breakdown") or {}).get(k) for r in rs)
                          for k in BREAKDOWN} if any(r.get("breakdown") for r in rs) else None,
        }
    for (t, s), n in failures.items():
        out.setdefault(t, {}).setdefault(s, {"n": 0, "failed_runs": n})
    return out


def ratios(runs: list[dict], scenarios: list[dict], reference: str) -> dict:
    """Per round: target vs direct and vs the reference (Envoy, or the matrix baseline) of the
    same round and load point; the median over rounds is reported."""
    idx = {(r["round"], r["scenario"], r["target"]): r for r in runs if _ok(r)}
    kinds = {s["key"]: s for s in scenarios}
    acc: dict = defaultdict(lambda: defaultdict(list))
    for (rnd, sk, t), r in idx.items():
        sc = kinds.get(sk)
        if sc is None or sc.get("frac"):
            continue  # at a % of each target's own max the rates differ: no cross ratios
        d = idx.get((rnd, sk, "direct"))
        e = idx.get((rnd, sk, reference))
        a = acc[(t, sk)]
        if sc["mode"] == "closed":
            if d and d.get("rps"):
                a["rps_vs_direct"].append(r["rps"] / d["rps"])
            if e and e.get("rps"):
                a["rps_vs_ref"].append(r["rps"] / e["rps"])
            if e and e.get("target_cpu_per_1k_s") and r.get("target_cpu_per_1k_s"):
                a["cpu_vs_ref"].append(r["target_cpu_per_1k_s"] / e["target_cpu_per_1k_s"])
            continue
        for p in PCTS:
            v = r["latency_us"].get(p)
            if d and v is not None and d["latency_us"].get(p):
                dv = d["latency_us"][p]
                a[f"{p}_vs_direct"].append(v / dv)
                a[f"added_{p}_us"].append(v - dv)
                if e and e["latency_us"].get(p) is not None and e["latency_us"][p] - dv > 0:
                    a[f"added_{p}_vs_ref"].append((v - dv) / (e["latency_us"][p] - dv))
        if e and e.get("target_cpu_per_1k_s") and r.get("target_cpu_per_1k_s"):
            a["cpu_vs_ref"].append(r["target_cpu_per_1k_s"] / e["target_cpu_per_1k_s"])
    out: dict = {}
    for (t, sk), a in acc.items():
        out.setdefault(t, {})[sk] = {k: statistics.median(v) for k, v in a.items() if v}
    return out


def _workers_scaling(runs: list[dict], key: str) -> dict:
    idx = {(r["round"], r["target"]): r for r in runs if _ok(r) and r["scenario"] == key}
    acc = defaultdict(list)
    for (rnd, t), r in idx.items():
        if t.startswith("meshcore-") and t.endswith("w"):
            one = idx.get((rnd, "meshcore"))
            if one and one.get("rps"):
                acc[t].append(r["rps"] / one["rps"])
    return {t: statistics.median(v) for t, v in acc.items()}


def analyse(data: dict) -> dict:
    runs, ref = data["runs"], data["reference"]
    summary = summarize(runs)
    rat = ratios(runs, data["scenarios"], ref)
    many = next(s["key"] for s in data["scenarios"] if s["mode"] == "closed")
    scaling = _workers_scaling(runs, many)
    checks = []

    def check(target, figure, value, goal, ok, unit=""):
        checks.append({"target": target, "figure": figure, "value": value, "goal": goal,
                       "ok": None if value is None else ok, "unit": unit,
                       "note": "" if value is not None else "not measured in this run"})

    conns = data["options"]["conns"]
    mem = data.get("memory") or {}
    if data["mode"] == "matrix":
        for t in summary:
            if t.startswith("mx-") and t != ref:
                v = rat.get(t, {}).get(many, {}).get("rps_vs_ref")
                check(t, f"throughput vs baseline, {conns} conns", v, ">= 0.90",
                      v is not None and v >= 0.90, "x")
    else:
        profile = data["options"].get("profile") or "bare"
        goal = GOALS[profile]
        for t in [t for t in summary if t.startswith("meshcore")]:
            r = rat.get(t, {})
            if t == "meshcore":
                v = r.get(many, {}).get("rps_vs_ref")
                check(t, f"closed-loop rps, 1 worker, {conns} conns, vs Envoy ({profile})", v,
                      f">= {goal['rps']}", v is not None and v >= goal["rps"], "x")
                v = r.get(many, {}).get("cpu_vs_ref")
                check(t, f"CPU per request at that maximum, vs Envoy's ({profile})", v,
                      f"<= {goal['cpu']}", v is not None and v <= goal["cpu"], "x")
                v = r.get("open-1c-1000", {}).get("added_p50_vs_ref")
                check(t, "added p50, 1 conn @1000 rps, vs Envoy's added p50", v, "<= 0.7",
                      v is not None and v <= 0.7, "x")
                for key in ("open-1c-1000", f"open-{conns}c-1000"):
                    v = r.get(key, {}).get("added_p99_vs_ref")
                    if key in summary.get(t, {}):
                        check(t, f"added p99 @1000 rps, {key.split('-')[1][:-1]} conn(s), vs "
                              "Envoy's", v, "<= 1.0", v is not None and v <= 1.0, "x")
                mine = r.get("open-1c-1000", {}).get("added_p50_us")
                ng = rat.get("nginx", {}).get("open-1c-1000", {}).get("added_p50_us")
                if ng is not None:
                    check(t, "stretch: added p50, 1 conn @1000 rps, vs nginx's (µs)",
                          mine, f"<= {ng:.0f} µs", mine is not None and mine <= ng, "µs")
            for key in ("open-1c-1000", f"open-{conns}c-1000"):
                v = r.get(key, {}).get("added_p99_us")
                if key in summary.get(t, {}):
                    check(t, f"added p99 @1000 rps, {key.split('-')[1][:-1]} conn(s)", v,
                          "<= 1000 µs", v is not None and v <= 1000, "µs")
            m = mem.get(t)
            if m:
                v = m["peak_rss_per_worker_mb"]
                check(t, "peak RSS per worker under load", v, f"<= {RSS_GOAL_MB:g} MB",
                      v <= RSS_GOAL_MB, "MB")
            if t in scaling:
                v = scaling[t]
                cores = data["machine"].get("cores_usable") or 0
                check(t, f"{t[9:-1]} workers vs 1 worker, closed-loop rps", v,
                      ">= 1.6 (where cores allow)", v >= 1.6, "x")
                if cores <= 2:
                    checks[-1]["note"] = (f"{cores} cores shared with the generator and the "
                                          "backend: the goal assumes spare cores")
                if data["pinning"].get("targets"):
                    checks[-1]["note"] = "--pin put all workers on " + \
                        f"CPU {data['pinning']['targets']}"
    saturated = sorted({r["target"] for r in runs if _ok(r) and r["mode"] == "closed"
                        and (r.get("generator_cpu_util") or 0) > 0.9})
    note = ("generator busy > 90 % of a core during the closed-loop runs of "
            f"{', '.join(saturated)}: there the maximum may be the generator's, not the target's")
    if saturated and note not in data["notes"]:
        data["notes"].append(note)
    return {"summary": summary, "ratios": rat, "workers_scaling": scaling, "checks": checks,
            "max_rps": {f"{t}@{c}c": v for (t, c), v in max_rps(runs).items()}}


# ------------------------------------------------------------------------------- rendering

def _n(v, digits=0, suffix=""):
    if v is None:
        return "–"
    if isinstance(v, float) and digits == 0:
        return f"{v:,.0f}{suffix}"
    return f"{v:,.{digits}f}{suffix}"


def _sig(v, sig=3):
    if v is None:
        return "–"
    if v == 0:
        return "0"
    return f"{v:.{sig}g}" if abs(v) < 1 else f"{v:.{max(0, sig - len(str(int(abs(v)))))}f}"


def _x(v):
    return "–" if v is None else f"{v:.2f}×"


def _signed(v):
    return "–" if v is None else f"{v:+,.0f}"


def tables(data: dict) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, footnote) for the terminal and markdown."""
    an = data["analysis"]
    S, R = an["summary"], an["ratios"]
    ref = data["reference"]
    ref_name = "baseline" if data["mode"] == "matrix" else "Envoy"
    scen = data["scenarios"]
    names = [t for t in data["targets"] if t in S]
    mem = data.get("memory") or {}
    gen = data["generator"]["builtin_name"]
    out = []

    closed = [s for s in scen if s["mode"] == "closed"]
    many = closed[0]["key"]
    conns = closed[0]["conns"]
    one = next((s["key"] for s in closed if s["conns"] == 1 and s["generator"] != "wrk"), None)
    wrk = next((s["key"] for s in closed if s["generator"] == "wrk"), None)
    head = ["target", f"rps {conns}c [{gen}]"]
    if wrk:
        head.append(f"rps {conns}c [wrk]")
    has_ref = ref in S
    head += ["× direct"] + ([f"× {ref_name}"] if has_ref else [])
    if one:
        head.append(f"rps 1c [{gen}]")
    head += ["CPU s/1k req", "CPU cores"] + ([f"CPU ÷ {ref_name}'s"] if has_ref else []) + \
        ["peak RSS/worker MB", "errors"]
    rows = []
    for t in names:
        s = S[t].get(many, {})
        r = R.get(t, {}).get(many, {})
        row = [t, _n(s.get("rps"))]
        if wrk:
            row.append(_n(S[t].get(wrk, {}).get("rps")))
        row += [_x(r.get("rps_vs_direct"))] + ([_x(r.get("rps_vs_ref"))] if has_ref else [])
        if one:
            row.append(_n(S[t].get(one, {}).get("rps")))
        m = mem.get(t)
        errs = sum(S[t].get(c["key"], {}).get("errors", 0) +
                   S[t].get(c["key"], {}).get("failed_runs", 0) for c in closed)
        row += [_sig(s.get("cpu_per_1k_s")), _n(s.get("cpu_util"), 2)]
        if has_ref:
            row.append(_x(r.get("cpu_vs_ref")) if t != ref else "–")
        row += [_n(m["peak_rss_per_worker_mb"], 1) if m else "–", str(errs)]
        rows.append(row)
    out.append((f"Maximum throughput, closed loop (median of {data['options']['rounds']} "
                f"round(s))", head, rows,
                f"× direct / × {ref_name}: median of per-round ratios. CPU s/1k req: CPU seconds "
                f"of all the target's processes per 1000 requests at that maximum; CPU cores: "
                f"their CPU use during the run."))

    fixed = [s for s in scen if s["mode"] == "open" and not s.get("frac")]
    if fixed:
        head = ["load", "target", "rps"] + [f"{p} µs" for p in PCTS] + ["+p50", "+p99"] + \
               ([f"+p50 ÷ {ref_name}'s", f"+p99 ÷ {ref_name}'s"] if has_ref else []) + \
               ["CPU s/1k req", "errors"]
        rows = []
        for sc in fixed:
            for t in names:
                s = S[t].get(sc["key"])
                if not s or not s.get("n"):
                    continue
                r = R.get(t, {}).get(sc["key"], {})
                lat = s["latency_us"]
                row = [sc["label"], t, _n(s["rps"])] + [_n(lat.get(p)) for p in PCTS] + \
                    [_signed(r.get("added_p50_us")) if t != "direct" else "–",
                     _signed(r.get("added_p99_us")) if t != "direct" else "–"]
                if has_ref:
                    row += [_x(r.get("added_p50_vs_ref")) if t not in ("direct", ref) else "–",
                            _x(r.get("added_p99_vs_ref")) if t not in ("direct", ref) else "–"]
                rows.append(row + [_sig(s.get("cpu_per_1k_s")), str(s.get("errors", 0))])
        out.append(("Latency at a fixed rate, open loop (µs from each request's scheduled send "
                    f"time; {gen})", head, rows,
                    "+p50/+p99: added over direct in the same round (median over rounds); "
                    f"÷ {ref_name}'s: that added latency over {ref_name}'s added latency."))

    frac = [s for s in scen if s["mode"] == "open" and s.get("frac")]
    if frac:
        head = ["load", "target", "rate", "achieved rps"] + [f"{p} µs" for p in PCTS] + \
               ["CPU s/1k req", "errors"]
        rows = []
        for sc in frac:
            for t in names:
                s = S[t].get(sc["key"])
                if not s or not s.get("n"):
                    continue
                lat = s["latency_us"]
                rows.append([sc["label"], t, _n(s.get("rate")), _n(s["rps"])] +
                            [_n(lat.get(p)) for p in PCTS] +
                            [_sig(s.get("cpu_per_1k_s")), str(s.get("errors", 0))])
        out.append((f"Latency at a fraction of each target's own maximum, open loop ({gen})",
                    head, rows, "The maximum is the same target's closed-loop rps at the same "
                    "connection count, so rates differ between targets. A fixed rate pays "
                    "wake-ups that a closed loop avoids, so on a small VM (above all with 1 "
                    "connection) even 50 % of that maximum can saturate: then latency is "
                    "queueing, and errors count requests unanswered by the end of the drain."))

    brk = [(t, S[t][many]["breakdown"]) for t in names
           if (S[t].get(many) or {}).get("breakdown")]
    if brk:
        head = ["target", "requests", "worker CPU µs/req", "user", "kernel", "loop (user)",
                "policy calls", "access log", "policy calls/req"]
        rows = [[t, _n(b["requests"]), _n(b["worker_us"], 2), _n(b["user_us"], 2),
                 _n(b["kernel_us"], 2), _n(b["loop_us"], 2), _n(b["policy_us"], 2),
                 _n(b["log_us"], 2), _n(b["policy_calls_per_request"], 2)] for t, b in brk]
        out.append((f"Where a request's CPU goes, closed loop {conns} conns (--breakdown)", head,
                    rows, "Per request, workers only (the supervisor is idle): user and kernel "
                    "CPU from the workers' own times; policy calls (decide, on_outcome) and "
                    "access log timed around each call, with the clock only while --breakdown "
                    "is on; loop = user - policy - access log (parsing, pools, relay, timers, "
                    "counters, trio). Kernel = the syscalls (recv/send/epoll)."))

    if an["checks"]:
        rows = []
        for c in an["checks"]:
            v = c["value"]
            val = "–" if v is None else (f"{v:.2f}×" if c["unit"] == "x" else
                                         f"{v:,.1f} {c['unit']}")
            verdict = {True: "meets", False: "MISSES", None: "n/a"}[c["ok"]]
            rows.append([c["target"], c["figure"], val, c["goal"], verdict, c.get("note", "")])
        out.append(("Targets from docs/performance.md and issue 8 (informational, never "
                    "asserted)",
                    ["target", "figure", "value", "goal", "verdict", "note"], rows, ""))
    return out


def _text_table(title, head, rows, foot) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else \
        [len(h) for h in head]
    right = _numeric_columns(head, rows)

    def line(cells):
        return "  ".join(str(c).rjust(w) if right[i] else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    parts = [title, "-" * len(title), line(head), line(["-" * w for w in widths])]
    parts += [line(r) for r in rows] or ["(no results)"]
    if foot:
        parts.append(foot)
    return "\n".join(parts)


def _numeric_columns(head, rows) -> list[bool]:
    return [bool(rows) and all(_numeric(r[i]) for r in rows) for i in range(len(head))]


def _numeric(c) -> bool:
    c = str(c).strip()
    if c == "–":
        return True
    for unit in (" µs", " MB", "×"):
        c = c.removesuffix(unit)
    try:
        float(c.replace(",", ""))
        return True
    except ValueError:
        return False


def _md_table(title, head, rows, foot) -> str:
    parts = [f"### {title}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join("---:" if r else "---" for r in _numeric_columns(head, rows)) + "|"]
    parts += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    if foot:
        parts += ["", foot]
    return "\n".join(parts)


def _context_lines(data: dict) -> list[tuple[str, str]]:
    m, v = data["machine"], data["versions"]
    lines = [
        ("machine", f"{m['cpu_model']}, {m['cores']} cores ({m['cores_usable']} usable), kernel "
                    f"{m['kernel']}, {m.get('os') or '?'}, {m.get('memory_gb')} GB"
                    + (f", {m['virtualization']}" if m.get("virtualization") else "")),
        ("versions", ", ".join(f"{k} {val}" for k, val in v.items() if val and k != "extensions")),
        ("meshcore", v.get("extensions") or "compiled extensions: not recorded"),
        ("not installed", ", ".join(k for k, val in v.items() if not val and k != "extensions") or "–"),
        ("backend", f"{data['backend']['kind']}: {data['backend']['note']}"),
        ("generator", data["generator"]["builtin"]
         + (f"; {data['generator']['wrk']}" if data["generator"]["wrk"] else "")),
        ("latency", data["generator"]["latency"]),
        ("load", f"{data['options']['rounds']} round(s), {data['options']['duration']:g} s per "
                 f"point after {data['options']['warmup']:g} s warm-up, targets alternated"),
    ]
    if data["pinning"]["generator"]:
        lines.append(("pinning", f"generator on CPU {data['pinning']['generator']}, backend and "
                                 f"targets on CPU {data['pinning']['targets']}"))
    return lines


def _commands(data: dict) -> list[str]:
    cmds = [f"# backend\n{data['backend']['command']}"]
    for name, t in data["targets"].items():
        if t.get("command"):
            cmds.append(f"# {name}\n{t['command']}")
    seen = set()
    for r in data["runs"]:
        key = (r["scenario"], r.get("generator"))
        if "command" in r and key not in seen:
            seen.add(key)
            cmds.append(f"# {r['scenario']} ({r['generator']}; -p/-r vary by target)\n"
                        f"{r['command']}")
    return cmds


def smoke_note(data: dict) -> str | None:
    """The warning a --quick run's outputs carry: its numbers only show that the bench runs."""
    opts = data.get("options") or {}
    if not opts.get("quick"):
        return None
    return (f"SMOKE RUN (--quick: {opts.get('duration', 0):g} s per point, {opts.get('rounds', 1)} "
            "round): checks that the bench works, not a measurement")


def render_text(data: dict) -> str:
    parts = [f"meshcore bench ({data['mode']}) — {data['started']} → {data['finished']}"]
    if smoke_note(data):
        parts.append(f"  {smoke_note(data)}")
    parts += [f"  {k:<13} {v}" for k, v in _context_lines(data)]
    for note in data["notes"]:
        parts.append(f"  note: {note}")
    for tb in tables(data):
        parts += ["", _text_table(*tb)]
    parts += ["", "Commands", "--------"] + _commands(data)
    return "\n".join(parts)


def render_markdown(data: dict) -> str:
    parts = [f"## meshcore bench ({data['mode']}), {data['started']}", ""]
    if smoke_note(data):
        parts += [f"**{smoke_note(data)}**", ""]
    parts += [f"- **{k}**: {v}" for k, v in _context_lines(data)]
    parts += [f"- note: {n}" for n in data["notes"]]
    for tb in tables(data):
        parts += ["", _md_table(*tb)]
    parts += ["", "### Commands", "", "```sh"] + _commands(data) + ["```", ""]
    return "\n".join(parts)


def make_plots(data: dict, out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    an = data["analysis"]
    S = an["summary"]
    names = [t for t in data["targets"] if t in S]
    written = []

    opened = [s for s in data["scenarios"] if s["mode"] == "open"]
    if opened:
        conns = sorted({s["conns"] for s in opened})
        loads = []
        for s in opened:
            k = s["rate"] if s["rate"] else -s["frac"]
            if k not in loads:
                loads.append(k)
        fig, axes = plt.subplots(len(conns), len(loads), squeeze=False,
                                 figsize=(4.2 * len(loads), 3.4 * len(conns)))
        xs = [-__import__("math").log10(1 - float(p[1:]) / 100) for p in ALL_PCTS]
        for i, c in enumerate(conns):
            for j, k in enumerate(loads):
                ax = axes[i][j]
                sc = next((s for s in opened if s["conns"] == c and
                           (s["rate"] if s["rate"] else -s["frac"]) == k), None)
                if sc is None:
                    ax.set_visible(False)
                    continue
                for t in names:
                    s = S[t].get(sc["key"])
                    if not s or not s.get("n"):
                        continue
                    ys = [s["latency_us"].get(p) for p in ALL_PCTS]
                    # at a fraction of each target's own maximum every line has its own rate
                    label = f"{t} at {s['rate']:,.0f} rps" if sc.get("frac") and s.get("rate") else t
                    ax.plot(xs, ys, marker="o", ms=3, label=label)
                ax.set_yscale("log")
                ax.set_xticks(xs, ALL_PCTS, fontsize=7)
                ax.set_title(sc["label"] + (": each target at its own rate" if sc.get("frac") else
                                            ": the same rate for every target"), fontsize=9)
                ax.set_ylabel("latency µs", fontsize=8)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
        title = (f"Latency by percentile, open loop ({data['generator']['builtin_name']}, "
                 "from scheduled send)")
        smoke = smoke_note(data)
        if smoke:
            title = f"{smoke}\n{title}"
        fig.suptitle(title, fontsize=10, color="darkred" if smoke else "black")
        fig.tight_layout()
        path = os.path.join(out_dir, "latency_percentiles.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    closed = sorted((s for s in data["scenarios"] if s["mode"] == "closed"),
                    key=lambda s: (-s["conns"], s["generator"] == "wrk"))
    if closed:
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(names) + 3), 4))
        width = 0.8 / len(closed)
        for j, sc in enumerate(closed):
            vals = [S[t].get(sc["key"], {}).get("rps") or 0 for t in names]
            pos = [i + (j - (len(closed) - 1) / 2) * width for i in range(len(names))]
            bars = ax.bar(pos, vals, width, label=sc["label"])
            ax.bar_label(bars, labels=[f"{v / 1000:.1f}k" if v else "" for v in vals],
                         fontsize=7)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_ylabel("requests/s")
        ax.set_title("Closed-loop throughput (median over rounds)", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, "throughput.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_all(data: dict, out_dir: str, plots: bool = True) -> dict:
    paths: dict = {}
    if plots:
        try:
            written = make_plots(data, out_dir)
            paths.update({os.path.basename(p): p for p in written})
        except ImportError:
            data["notes"].append("plots: skipped, matplotlib is not installed "
                                 "(pip install matplotlib)")
        except Exception as exc:  # noqa: BLE001 - plots are optional
            data["notes"].append(f"plots: failed ({exc})")
    elif "plots: skipped (--no-plots)" not in data["notes"]:
        data["notes"].append("plots: skipped (--no-plots)")
    text = render_text(data)
    with open(os.path.join(out_dir, "results.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(render_markdown(data))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    paths.update({"results.json": os.path.join(out_dir, "results.json"),
                  "results.md": os.path.join(out_dir, "results.md"),
                  "results.txt": os.path.join(out_dir, "results.txt")})
    paths["text_content"] = text
    return paths

