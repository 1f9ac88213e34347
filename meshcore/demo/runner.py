"""`python -m meshcore demo [SCENARIO] [--walkthrough]`: list, run or walk through a scenario."""
from __future__ import annotations

import http.client
import os
import shutil
import signal
import sys
import tempfile
import textwrap
import threading
import time

from meshcore.demo import render
from meshcore.demo.kubelet import LogPump, PodSet, format_ports_taken, probe_port
from meshcore.demo.scenarios import (DEFAULT_POD_PORT_BASE, POD_BY_NAME, SCENARIOS, commands,
                                     examples_root, listing, pod_ports)
from meshcore.demo.sidecar import Sidecar
from meshcore.demo.walkthrough import PART_STEPS, Context, Step


class Printer:
    """Lines from the pods, the proxy and the demo itself, never interleaved mid-line."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.lock = threading.Lock()
        self.pods = None
        self.quiet = True

    def say(self, *lines: str) -> None:
        with self.lock:
            for line in lines:
                print(line, file=self.stream)
            self.stream.flush()

    def on_line(self, line) -> None:
        if self.pods is not None:
            self.pods.mark_ready_from(line)
        if self.quiet:
            return
        pod = self.pods.pods.get(line.source) if self.pods is not None else None
        prefix = pod.spec.label if pod is not None else line.source
        self.say(f"[{prefix}] {line.text}")


def _rel(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def run_demo(args) -> int:
    if args.scenario is None:
        if args.walkthrough:
            print("meshcore demo: --walkthrough needs a SCENARIO (one of: "
                  f"{', '.join(SCENARIOS)})", file=sys.stderr)
            return 2
        print(listing())
        return 0
    scenario = SCENARIOS[args.scenario]
    root = examples_root()
    if root is None:
        print("meshcore demo: examples/seed not found; run it from the repository root",
              file=sys.stderr)
        return 2
    printer = Printer()
    pump = LogPump(printer.on_line)
    specs = [POD_BY_NAME[n] for n in scenario.pods]
    pods = PodSet(specs, pod_ports(scenario.pods, args.pod_port_base), pump)
    printer.pods = pods
    problems = pods.bind()
    for addr, what in ((args.listen, "proxy"), (args.admin, "proxy admin")):
        reason = probe_port(*addr)
        if reason is None and addr == args.listen and args.listen == args.admin:
            reason = "the proxy and its admin need two ports"
        if reason is not None:
            problems.append((f"{addr[0]}:{addr[1]}", what, reason))
    if problems:
        pods.release()
        pump.close()
        print(f"meshcore demo: {format_ports_taken(problems)}", file=sys.stderr)
        return 1

    source = os.path.join(root, scenario.folder)
    files = render.read_folder(source)
    defaults = {DEFAULT_POD_PORT_BASE + POD_BY_NAME[n].offset: port for n, port in pods.ports().items()}
    moved = render.remap_ports(files, defaults)
    shortened = render.shorten_ejections(files) if args.walkthrough else []
    tmp = None
    config = source
    if moved or shortened:
        tmp = tempfile.mkdtemp(prefix="meshcore-demo-")
        config = os.path.join(tmp, os.path.basename(scenario.folder))
        render.write_folder(files, config)
    sidecar = Sidecar(config, args.listen, args.admin, args.workers, pump,
                      access_log=not args.no_access_log)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if args.walkthrough:
            return _walkthrough(args, scenario, source, shortened, pods, pump, sidecar, printer)
        return _interactive(args, scenario, source, config, pods, sidecar, printer)
    except KeyboardInterrupt:
        printer.say("meshcore demo: interrupted")
        return 130
    finally:
        printer.quiet = True
        sidecar.stop()
        pods.stop()
        pump.close()
        signal.signal(signal.SIGTERM, previous)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _start(pods, sidecar, printer) -> bool:
    pods.start()
    if not pods.wait_ready(60):
        printer.say("meshcore demo: the pods did not start within 60 s")
        return False
    sidecar.start()
    problem = sidecar.wait_ready()
    if problem is not None:
        printer.quiet = True
        tail = [ln.text for ln in sidecar.pump.since(0, "sidecar")][-15:]
        printer.say(f"meshcore demo: {problem}", *(f"  {t}" for t in tail))
        return False
    return True


def _interactive(args, scenario, source, config, pods, sidecar, printer) -> int:
    listen, admin = args.listen, args.admin
    printer.say(f"meshcore demo {scenario.name}: {scenario.title}",
                "pods: one process each, restarted when it exits, as Kubernetes restarts a crashed "
                "container:", *(f"  {row}" for row in pods.table()))
    if config == source:
        printer.say(f"proxy: http://{listen[0]}:{listen[1]} (admin http://{admin[0]}:{admin[1]}), "
                    f"{args.workers} worker(s), config {_rel(source)}/ (edit a file there and the "
                    "proxy reloads it, as `kubectl apply` would)")
    else:
        printer.say(f"proxy: http://{listen[0]}:{listen[1]} (admin http://{admin[0]}:{admin[1]}), "
                    f"{args.workers} worker(s), config {_rel(source)}/ with this run's pod ports, "
                    f"written to {config}/")
    printer.say("", "logs, as `kubectl logs -f --prefix` shows them ([pod version]; [sidecar] is the "
                "proxy's access log):")
    printer.quiet = False
    if not _start(pods, sidecar, printer):
        return 1
    with printer.lock:
        out = printer.stream
        print("\nready. The article's commands, to paste in another terminal:", file=out)
        for cmd in commands(scenario, listen, admin):
            print(f"  {cmd}", file=out)
        print("Ctrl-C stops the proxy and the pods.\n", file=out)
        out.flush()
    try:
        while sidecar.proc.poll() is None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        printer.quiet = True
        printer.say("meshcore demo: stopping the proxy and the pods")
        return 0
    printer.say(f"meshcore demo: the proxy exited with code {sidecar.proc.returncode}")
    return 1


def _walkthrough(args, scenario, source, shortened, pods, pump, sidecar, printer) -> int:
    started = time.monotonic()
    names = ", ".join(scenario.pods)
    printer.say(f"meshcore demo {scenario.name} --walkthrough: the article's steps, run against "
                f"meshcore ({_rel(source)}/)",
                f"  pods: {names} (one process each)",
                f"  proxy: http://{args.listen[0]}:{args.listen[1]}, {args.workers} worker(s)")
    if shortened:
        printer.say("  shortened for the walkthrough (the article's times would take minutes):",
                    *(f"    {c}" for c in shortened))
    if not _start(pods, sidecar, printer):
        return 1
    note = ", ".join(c.split(": ", 1)[1] for c in shortened if "baseEjectionTime" in c)
    ctx = Context(sidecar, pods, pump, scenario.hosts, note)
    results: dict[str, list[Step]] = {}
    for part in scenario.parts:
        results[part] = steps = []
        printer.say("", f"== {part} ({scenario.hosts[part]})")
        pods.wait_ready(60)
        for step in _run_steps(PART_STEPS[part], ctx):
            steps.append(step)
            printer.say(*_render_step(part, len(steps), step))
    printer.say("")
    total = sum(len(s) for s in results.values())
    matched = sum(1 for s in results.values() for step in s if step.ok)
    if len(results) > 1:
        for part, steps in results.items():
            ok = sum(1 for step in steps if step.ok)
            printer.say(f"  {part:<16} {ok} of {len(steps)} steps match the article")
    verdict = "matches the article" if matched == total else "DIFFERS from the article"
    printer.say(f"{scenario.name}: {matched} of {total} steps match the article; meshcore "
                f"{verdict} ({time.monotonic() - started:.1f} s)")
    return 0 if matched == total else 1


def _run_steps(steps_of, ctx):
    """The part's steps; a step that raises (the proxy gone, a refused connection) fails, the rest
    of the part is skipped."""
    gen = steps_of(ctx)
    while True:
        try:
            step = next(gen)
        except StopIteration:
            return
        except (OSError, http.client.HTTPException, ValueError) as exc:
            yield Step("(the next step)", "", here=f"{type(exc).__name__}: {exc}",
                       why="the step could not talk to the proxy")
            return
        yield step


def _render_step(part: str, number: int, step: Step) -> list[str]:
    wrap = {"width": 100, "subsequent_indent": " " * 12, "break_on_hyphens": False}
    lines = [f"{part} {number}: {step.title}",
             *textwrap.wrap(f"  article:  {step.article}", **wrap),
             *textwrap.wrap(f"  meshcore: {step.here}", **wrap)]
    lines += [f"    {d}" for d in step.details]
    lines.append("  => matches the article" if step.ok else f"  => DIFFERS: {step.why}")
    return lines
