"""Supervisor process: validates config, runs N workers, restarts them, reloads, drains, serves admin.

Workers are spawned (not forked) so each starts from a clean interpreter; each binds its own
SO_REUSEPORT socket and receives the validated config sources over a pipe. A config that fails
validation is reported and never reaches a worker.

Error handling: a worker that dies is restarted (with a short backoff when it keeps dying); a
failed reload leaves the running config in place; SIGTERM/SIGINT drain the workers for up to
`grace` seconds, then stop them.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time

import trio

from meshcore.admin import serve_admin
from meshcore.config.compile import compile_sources
from meshcore.config.load import read_sources
from meshcore.errors import ConfigError
from meshcore.worker import worker_main

WATCH_INTERVAL = 1.0
RESTART_BACKOFF_MAX = 5.0


def log(msg: str) -> None:
    print(f"meshcore[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


def _fingerprint(paths: list[str]):
    """A cheap change detector over the config paths (files and directory entries)."""
    items = []
    for path in paths:
        try:
            if os.path.isdir(path):
                for name in sorted(os.listdir(path)):
                    st = os.stat(os.path.join(path, name))
                    items.append((path, name, st.st_mtime_ns, st.st_size))
            else:
                st = os.stat(path)
                items.append((path, st.st_mtime_ns, st.st_size))
        except OSError:
            items.append((path, None))
    return tuple(items)


class WorkerSlot:
    def __init__(self, index: int):
        self.index = index
        self.process = None
        self.conn = None
        self.ready = False
        self.generation = 0
        self.restarts = 0


class Supervisor:
    def __init__(self, config_paths, listen, admin, workers: int, options: dict, grace: float = 5.0,
                 watch: bool = True):
        self.config_paths = list(config_paths)
        self.listen = listen
        self.admin = admin
        self.options = options
        self.grace = grace
        self.watch = watch
        self.slots = [WorkerSlot(i) for i in range(workers)]
        self.mp = multiprocessing.get_context("spawn")
        self.sources = None
        self.snapshot = None
        self.generation = 0
        self.stopping = False
        self.reloads_ok = 0
        self.reloads_rejected = 0

    # === config ===

    def load(self):
        """Read and validate the config; returns (sources, snapshot). Raises ConfigError."""
        sources = read_sources(self.config_paths)
        snapshot = compile_sources(sources, self.generation + 1)
        return sources, snapshot

    def reload(self, why: str) -> bool:
        try:
            sources, snapshot = self.load()
        except ConfigError as exc:
            self.reloads_rejected += 1
            log(f"config rejected ({why}); keeping generation {self.generation}:\n  "
                + "\n  ".join(exc.problems))
            return False
        if self.snapshot is not None and snapshot.config_hash == self.snapshot.config_hash:
            return True
        self.generation += 1
        self.sources, self.snapshot = sources, snapshot
        self.reloads_ok += 1
        for w in snapshot.warnings:
            log(f"warning: {w}")
        log(f"config generation {self.generation} loaded ({why})")
        for slot in self.slots:
            if slot.conn is not None:
                try:
                    slot.conn.send(("config", (self.generation, self.sources)))
                except OSError:
                    pass  # the monitor restarts it with the new config
        return True

    # === run ===

    def run(self) -> int:
        try:
            self.sources, self.snapshot = self.load()
        except ConfigError as exc:
            for p in exc.problems:
                print(p, file=sys.stderr)
            return 2
        self.generation = self.snapshot.generation
        for w in self.snapshot.warnings:
            log(f"warning: {w}")
        try:
            trio.run(self._main)
        except KeyboardInterrupt:
            pass
        return 0

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_admin, self, self.admin)
            for slot in self.slots:
                nursery.start_soon(self._run_slot, slot)
            if self.watch:
                nursery.start_soon(self._watch)
            nursery.start_soon(self._announce)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        self.reload("SIGHUP")
                        continue
                    log(f"received {signal.Signals(signum).name}: draining for up to {self.grace:g}s")
                    break
            await self._drain()
            nursery.cancel_scope.cancel()

    async def _announce(self) -> None:
        while not all(s.ready for s in self.slots):
            await trio.sleep(0.05)
        host, port = self.listen
        log(f"{len(self.slots)} worker(s) ready; proxy on http://{host}:{port} "
            f"admin on http://{self.admin[0]}:{self.admin[1]}")

    def _spawn(self, slot: WorkerSlot) -> None:
        parent, child = self.mp.Pipe()
        proc = self.mp.Process(target=worker_main, name=f"meshcore-worker-{slot.index}",
                               args=(child, self.listen, self.generation, self.sources, self.options))
        proc.start()
        child.close()
        slot.process, slot.conn, slot.ready, slot.generation = proc, parent, False, self.generation

    async def _run_slot(self, slot: WorkerSlot) -> None:
        backoff = 0.0
        while not self.stopping:
            started = time.monotonic()
            self._spawn(slot)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_messages, slot)
                await trio.lowlevel.wait_readable(slot.process.sentinel)
                nursery.cancel_scope.cancel()
            slot.process.join()
            slot.ready = False
            slot.conn.close()
            slot.conn = None
            if self.stopping:
                return
            slot.restarts += 1
            log(f"worker {slot.index} (pid {slot.process.pid}) exited with {slot.process.exitcode}; restarting")
            # Back off only when it keeps dying young, so a crash loop cannot spin the CPU.
            backoff = 0.0 if time.monotonic() - started > 10 else min(RESTART_BACKOFF_MAX, backoff * 2 or 0.1)
            await trio.sleep(backoff)

    async def _read_messages(self, slot: WorkerSlot) -> None:
        conn = slot.conn
        while True:
            await trio.lowlevel.wait_readable(conn.fileno())
            try:
                verb, payload = conn.recv()
            except (EOFError, OSError):
                return
            if verb == "ready":
                slot.ready = True
                if slot.generation != self.generation:  # a reload raced with its start
                    conn.send(("config", (self.generation, self.sources)))
            elif verb == "loaded":
                slot.generation = payload
            elif verb == "error":
                log(f"worker {slot.index}: {payload}")

    async def _watch(self) -> None:
        last = _fingerprint(self.config_paths)
        while True:
            await trio.sleep(WATCH_INTERVAL)
            now = _fingerprint(self.config_paths)
            if now != last:
                last = now
                self.reload("config files changed")

    async def _drain(self) -> None:
        self.stopping = True
        for slot in self.slots:
            if slot.conn is not None:
                try:
                    slot.conn.send(("drain", self.grace))
                except OSError:
                    pass
        deadline = time.monotonic() + self.grace + 2.0
        while time.monotonic() < deadline and any(
                s.process is not None and s.process.is_alive() for s in self.slots):
            await trio.sleep(0.05)
        for slot in self.slots:
            if slot.process is not None and slot.process.is_alive():
                slot.process.kill()

    # === introspection for admin ===

    def ready(self) -> bool:
        return not self.stopping and all(s.ready for s in self.slots)

    def server_info(self) -> dict:
        return {
            "state": "DRAINING" if self.stopping else ("LIVE" if self.ready() else "INITIALIZING"),
            "generation": self.generation,
            "config_hash": self.snapshot.config_hash if self.snapshot else None,
            "reloads_ok": self.reloads_ok,
            "reloads_rejected": self.reloads_rejected,
            "workers": [{"index": s.index, "pid": s.process.pid if s.process else None,
                         "ready": s.ready, "generation": s.generation, "restarts": s.restarts}
                        for s in self.slots],
        }
