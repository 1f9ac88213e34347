"""Worker process: its own SO_REUSEPORT listener, one trio run, config pushed by the supervisor.

The data path is the C event loop of meshcore._ext.loop (one per worker), driven by a single trio
task (`drive`): it waits for the loop's epoll fd to become readable, then lets the loop handle
what is ready in a bounded batch, so trio's other tasks (control channel, housekeeping, capture
flushers) stay responsive. The loop's timers sit in a timerfd inside its epoll set, so a deadline
wakes the same task.

Control messages arrive over a multiprocessing pipe as (verb, payload) tuples:
  ("config", (snapshot, slots))  swap in a Snapshot the supervisor compiled and validated;
                                 `slots` maps its clusters to shared-memory rows
Workers never parse YAML (nor import the config compiler): that keeps their memory small.
  ("drain", grace_seconds)           stop accepting, finish in-flight requests, exit
Replies: ("ready", pid) once listening; ("loaded", generation) or ("error", text) after a config;
("fatal", text) when it cannot listen at all (then it exits: a restart would fail the same way).
"""
from __future__ import annotations

import os
import signal
import sys
import time

import trio

from meshcore.io.sockets import reuseport_listener
from meshcore.metrics.istio import AcceptOverflow
from meshcore.shm.segment import Segment
from meshcore.startup import listen_problem

IDLE_SWEEP_INTERVAL = 5.0
LOG_FLUSH_INTERVAL = 0.2
MAX_EVENTS = 256  # sockets handled per batch before trio's other tasks get a turn


def worker_main(conn, index: int, segment_name: str, listen: tuple[str, int], snapshot,
                slots: dict, options: dict) -> None:
    """Entry point of a spawned worker process (`index`: its stats row in shared memory)."""
    # The supervisor owns signals: Ctrl-C on a terminal reaches the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from meshcore.io.dataplane import Dataplane
    segment = Segment.attach(segment_name)
    inbound_at = (options.get("sidecar") or {}).get("inbound_listen")  # run --sidecar
    where = listen
    try:
        listener = reuseport_listener(*listen)
        inbound = None
        if inbound_at is not None:
            where = inbound_at
            inbound = reuseport_listener(*inbound_at)
    except OSError as exc:  # said once, over the pipe: the supervisor stops instead of looping
        conn.send(("fatal", listen_problem(where, exc)))
        segment.close()
        return
    dp = Dataplane(snapshot, slots, segment, index,
                   access_log=options.get("access_log", True),
                   access_log_file=options.get("access_log_file"),
                   access_log_encoding=options.get("access_log_encoding", "text"),
                   access_log_format=options.get("access_log_format"),
                   use_remote_address=options.get("use_remote_address", False),
                   header_timeout=options.get("request_headers_timeout", 10.0),
                   max_connections=options.get("max_connections", 0),
                   stream_idle_timeout=options.get("stream_idle_timeout", 300.0),
                   request_timeout=options.get("request_timeout", 300.0),
                   max_events=MAX_EVENTS,
                   # run --sidecar: plain values for the data path (meshcore.config.sidecar)
                   **_sidecar_arguments(options.get("sidecar")),
                   # MESHCORE_METRICS=off: a developer aid to measure what recording costs
                   metrics=os.environ.get("MESHCORE_METRICS") != "off")
    if inbound is not None:  # captured connections: routed by their original destination first
        dp.loop.add_listener(listener, "outbound")
        dp.loop.add_listener(inbound, "inbound")
        inbound.close()
    else:
        dp.loop.add_listener(listener)
    listener.close()
    profile_to = os.environ.get("MESHCORE_PROFILE")  # developer aid: cProfile one worker
    try:
        if profile_to:
            import cProfile
            cProfile.runctx("trio.run(serve, dp, conn)", globals(), locals(),
                            f"{profile_to}.{os.getpid()}")
        else:
            trio.run(serve, dp, conn)
    except KeyboardInterrupt:
        pass
    finally:
        dp.close()


def _sidecar_arguments(sidecar: dict | None) -> dict:
    """Dataplane's sidecar-mode arguments from the supervisor's options["sidecar"] (None: explicit
    mode)."""
    if not sidecar:
        return {"sidecar": False}
    return {"sidecar": True, "inbound_listen": sidecar["inbound_listen"],
            "outbound_traffic_policy": sidecar["outbound_traffic_policy"]}


async def serve(dp, conn) -> None:
    async with trio.open_nursery() as nursery:
        dp.start_background(nursery.start_soon)
        nursery.start_soon(drive, dp.loop)
        nursery.start_soon(housekeeping, dp)
        return_freed_memory()
        conn.send(("ready", os.getpid()))
        grace = await control_loop(dp, conn)
        # Drain: stop accepting, let keep-alive connections finish their current request.
        dp.drain()
        loop = dp.loop
        with trio.move_on_after(grace):
            while loop.connections or loop.shadows_in_flight:
                await trio.sleep(0.02)
        dp.flush_log()
        nursery.cancel_scope.cancel()


def return_freed_memory() -> None:
    """Give the heap pages freed by start-up (imports, the unpickled config's temporaries) back
    to the kernel: glibc keeps them otherwise, and they are about 1.4 MB of every worker's
    resident memory. A no-op where the C library has no malloc_trim (musl)."""
    import ctypes  # already loaded by trio: costs nothing here
    import gc
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


async def drive(loop) -> None:
    """Run the C event loop under trio: wait for readiness, then one bounded batch at a time."""
    fd = loop.fileno()
    run_once = loop.run_once
    wait_readable = trio.lowlevel.wait_readable
    checkpoint = trio.lowlevel.checkpoint
    while True:
        if run_once() >= MAX_EVENTS:
            await checkpoint()  # more is ready: let trio's other tasks run first
        else:
            await wait_readable(fd)


async def housekeeping(dp) -> None:
    """Flush the access log often, sweep idle connections now and then, publish the loop's
    accept overflows (a listener stat)."""
    ticks_per_sweep = int(IDLE_SWEEP_INTERVAL / LOG_FLUSH_INTERVAL)
    tick = 0
    overflow = AcceptOverflow(dp.segment.cells, dp.segment.layout, dp.worker)
    # MESHCORE_LOOP_STATS=PATH (a developer and bench aid): time the policy calls and the access
    # log, and write the loop's counters with this process's CPU times to PATH.<pid> each tick.
    stats_path = os.environ.get("MESHCORE_LOOP_STATS")
    if stats_path:
        dp.loop.profile = True
    while True:
        await trio.sleep(LOG_FLUSH_INTERVAL)
        dp.flush_log()
        overflow.publish(dp.loop.n_accept_overflow)
        tick += 1
        if tick % ticks_per_sweep == 0:
            dp.sweep()
        if stats_path:
            write_loop_stats(dp.loop, f"{stats_path}.{os.getpid()}")


def write_loop_stats(loop, path: str) -> None:
    import json
    times = os.times()
    stats = dict(loop.statistics(), cpu_user=times.user, cpu_sys=times.system,
                 monotonic=time.monotonic())
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f)
    os.replace(tmp, path)


async def control_loop(dp, conn) -> float:
    """Apply config pushes until told to drain; returns the drain grace period."""
    while True:
        await trio.lowlevel.wait_readable(conn.fileno())
        try:
            verb, payload = conn.recv()
        except EOFError:  # the supervisor is gone: drain quickly
            return 1.0
        if verb == "config":
            snapshot, slots = payload
            try:
                dp.install(snapshot, slots)
            except Exception as exc:  # keep serving the running config
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
                print(f"meshcore worker {os.getpid()}: config not installed: {exc}",
                      file=sys.stderr)
                continue
            return_freed_memory()  # the old config's objects
            conn.send(("loaded", snapshot.generation))
        elif verb == "drain":
            return float(payload)
