"""Worker process: its own SO_REUSEPORT listener, one trio run, config pushed by the supervisor.

Control messages arrive over a multiprocessing pipe as (verb, payload) tuples:
  ("config", (snapshot, slots))  swap in a Snapshot the supervisor compiled and validated;
                                 `slots` maps its clusters to shared-memory rows
Workers never parse YAML (nor import the config compiler): that keeps their memory small.
  ("drain", grace_seconds)           stop accepting, finish in-flight requests, exit
Replies: ("ready", pid) once listening; ("loaded", generation) or ("error", text) after a config.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import trio

from meshcore.accesslog import AccessLog
from meshcore.io.proxy import WorkerContext, serve_connection
from meshcore.io.sockets import reuseport_listener
from meshcore.shm.segment import Segment

IDLE_SWEEP_INTERVAL = 5.0
LOG_FLUSH_INTERVAL = 0.2


def worker_main(conn, index: int, segment_name: str, listen: tuple[str, int], snapshot,
                slots: dict, options: dict) -> None:
    """Entry point of a spawned worker process (`index`: its stats row in shared memory)."""
    # The supervisor owns signals: Ctrl-C on a terminal reaches the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    segment = Segment.attach(segment_name)
    listener = reuseport_listener(*listen)
    access_log = AccessLog.from_options(options) if options.get("access_log", True) else None
    ctx = WorkerContext(snapshot, slots, segment, index, access_log,
                        use_remote_address=options.get("use_remote_address", False),
                        header_timeout=options.get("request_headers_timeout", 10.0))
    profile_to = os.environ.get("MESHCORE_PROFILE")  # developer aid: cProfile one worker
    try:
        if profile_to:
            import cProfile
            cProfile.runctx("trio.run(_serve, ctx, listener, conn)", globals(), locals(),
                            f"{profile_to}.{os.getpid()}")
        else:
            trio.run(_serve, ctx, listener, conn)
    except KeyboardInterrupt:
        pass
    finally:
        if access_log is not None:
            access_log.flush()


async def _serve(ctx: WorkerContext, listener, conn) -> None:
    async with trio.open_nursery() as nursery:
        stop_accepting = trio.CancelScope()
        nursery.start_soon(_accept_loop, ctx, listener, nursery, stop_accepting)
        nursery.start_soon(_housekeeping, ctx)
        nursery.start_soon(ctx.mirror.run)
        conn.send(("ready", os.getpid()))
        grace = await _control_loop(ctx, conn)
        # Drain: stop accepting, let keep-alive connections finish their current request.
        stop_accepting.cancel()
        listener.close()
        ctx.drain()
        with trio.move_on_after(grace):
            while ctx.connections:
                await trio.sleep(0.02)
        if ctx.access_log is not None:
            ctx.access_log.flush()
        nursery.cancel_scope.cancel()


async def _accept_loop(ctx, listener, nursery, scope) -> None:
    with scope:
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                continue
            except OSError as exc:
                # EMFILE/ENFILE/ENOBUFS/ENOMEM mean overload: back off instead of spinning.
                print(f"meshcore worker {os.getpid()}: accept failed: {exc}", file=sys.stderr)
                await trio.sleep(0.1)
                continue
            sock.setblocking(False)
            sock.setsockopt(6, 1, 1)  # TCP_NODELAY
            nursery.start_soon(serve_connection, ctx, sock)


async def _housekeeping(ctx) -> None:
    """Flush the access log often, sweep expired idle upstream connections now and then."""
    ticks_per_sweep = int(IDLE_SWEEP_INTERVAL / LOG_FLUSH_INTERVAL)
    tick = 0
    while True:
        await trio.sleep(LOG_FLUSH_INTERVAL)
        if ctx.access_log is not None:
            ctx.access_log.flush()
        tick += 1
        if tick % ticks_per_sweep == 0:
            ctx.sweep_idle()
            ctx.close_idle_downstream(time.monotonic())


async def _control_loop(ctx, conn) -> float:
    """Apply config pushes until told to drain; returns the drain grace period."""
    while True:
        await trio.lowlevel.wait_readable(conn.fileno())
        try:
            verb, payload = conn.recv()
        except EOFError:  # the supervisor is gone: drain quickly
            return 1.0
        if verb == "config":
            snapshot, slots = payload
            ctx.install(snapshot, slots)
            conn.send(("loaded", snapshot.generation))
        elif verb == "drain":
            return float(payload)
