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
from meshcore.config.dns import DEFAULT_REFRESH_RATE, DnsCache
from meshcore.config.load import read_sources
from meshcore.errors import ConfigError
from meshcore.shm.layout import Layout
from meshcore.shm.segment import Segment
from meshcore.shm.slots import SlotAllocator, SlotsExhausted
from meshcore.stats_render import StatsCluster, render_stats
from meshcore.upstream import outlier
from meshcore.upstream.balancer import stamp_joined
from meshcore.upstream.cluster import now_ms
from meshcore.worker import worker_main

WATCH_INTERVAL = 1.0
RESTART_BACKOFF_MAX = 5.0
SWEEP_TICK = 0.05  # outlier sweeps run on each cluster's own `interval`, checked this often
# Shared-memory capacity: a config needing more rows is rejected (the running one stays).
MAX_CLUSTERS = 1024
MAX_HOSTS = 8192


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
                 watch: bool = True, resolver=None):
        self.config_paths = list(config_paths)
        self.listen = listen
        self.admin = admin
        self.options = options
        self.grace = grace
        self.watch = watch
        self.workers = [WorkerSlot(i) for i in range(workers)]
        self.mp = multiprocessing.get_context("spawn")
        self.sources = None
        self.snapshot = None
        self.slots = None
        self.generation = 0
        self.segment = Segment.create(Layout(MAX_HOSTS, MAX_CLUSTERS, workers))
        self.allocator = SlotAllocator(MAX_CLUSTERS, MAX_HOSTS)
        self.stopping = False
        self.reloads_ok = 0
        self.reloads_rejected = 0
        # resolution DNS answers: refreshed every dns_refresh_rate s; the last good ones are kept
        self.dns = DnsCache(resolver)
        self.dns_refresh_rate = options.get("dns_refresh_rate", DEFAULT_REFRESH_RATE)

    # === config ===

    def load(self):
        """Read and validate the config, give its clusters shared-memory rows.

        Returns (sources, snapshot, slots). Raises ConfigError; then nothing changed.
        """
        sources = read_sources(self.config_paths)
        snapshot = compile_sources(sources, self.generation + 1, dns=self.dns,
                                   **self.options.get("workload", {}))
        # endpoints a reload adds start their slow-start window now (loadBalancer.warmup)
        snapshot = stamp_joined(self.snapshot, snapshot, now_ms())
        try:
            slots, new_clusters, new_hosts = self.allocator.allocate(snapshot)
        except SlotsExhausted as exc:
            raise ConfigError([f"{', '.join(self.config_paths)}: {exc}"]) from None
        for slot in new_clusters:  # rows handed out afresh start from zero
            self.segment.cluster(slot).clear()
            for w in range(len(self.workers)):
                self.segment.worker_stats(w, slot).clear()
        for slot in new_hosts:
            self.segment.host(slot).clear()
        return sources, snapshot, slots


    def reload(self, why: str) -> bool:
        try:
            sources, snapshot, slots = self.load()
        except ConfigError as exc:
            self.reloads_rejected += 1
            log(f"config rejected ({why}); keeping generation {self.generation}:\n  "
                + "\n  ".join(exc.problems))
            return False
        if self.snapshot is not None and snapshot.config_hash == self.snapshot.config_hash:
            return True
        self.generation += 1
        self.sources, self.snapshot, self.slots = sources, snapshot, slots
        self.reloads_ok += 1
        for w in snapshot.warnings:
            log(f"warning: {w}")
        log(f"config generation {self.generation} loaded ({why})")
        for worker in self.workers:
            if worker.conn is not None:
                try:
                    worker.conn.send(("config", self.config_message()))
                except OSError:
                    pass  # the monitor restarts it with the new config
        return True

    def config_message(self):
        return (self.snapshot, self.slots)

    # === run ===

    def run(self) -> int:
        try:
            self.sources, self.snapshot, self.slots = self.load()
        except ConfigError as exc:
            for p in exc.problems:
                print(p, file=sys.stderr)
            self.segment.unlink()
            self.segment.close()
            return 2
        self.generation = self.snapshot.generation
        for w in self.snapshot.warnings:
            log(f"warning: {w}")
        try:
            trio.run(self._main)
        except KeyboardInterrupt:
            pass
        finally:
            self.segment.unlink()
            self.segment.close()
        return 0

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_admin, self, self.admin)
            for worker in self.workers:
                nursery.start_soon(self._run_worker, worker)
            if self.watch:
                nursery.start_soon(self._watch)
            nursery.start_soon(self._sweep_outliers)
            nursery.start_soon(self._refresh_dns_periodically)
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
        while not all(s.ready for s in self.workers):
            await trio.sleep(0.05)
        host, port = self.listen
        log(f"{len(self.workers)} worker(s) ready; proxy on http://{host}:{port} "
            f"admin on http://{self.admin[0]}:{self.admin[1]}")

    def _spawn(self, slot: WorkerSlot) -> None:
        parent, child = self.mp.Pipe()
        proc = self.mp.Process(target=worker_main, name=f"meshcore-worker-{slot.index}",
                               args=(child, slot.index, self.segment.name, self.listen,
                                     self.snapshot, self.slots, self.options))
        proc.start()
        child.close()
        slot.process, slot.conn, slot.ready, slot.generation = proc, parent, False, self.generation

    async def _run_worker(self, slot: WorkerSlot) -> None:
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
            self._repair_after_crash()
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
                    conn.send(("config", self.config_message()))
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

    async def _refresh_dns_periodically(self) -> None:
        while True:
            await trio.sleep(self.dns_refresh_rate)
            await self.refresh_dns()

    async def refresh_dns(self) -> bool:
        """Look the Snapshot's DNS names up again (in a thread); when an answer changed, recompile
        and push the new Snapshot. A failed lookup keeps the last good addresses. Returns whether
        a new config generation was loaded."""
        names = self.snapshot.dns_names if self.snapshot is not None else ()
        if not names:
            return False
        changed = await trio.to_thread.run_sync(self.dns.refresh, names)
        if not changed:
            return False
        generation = self.generation
        self.reload(f"DNS answers changed for {', '.join(changed)}")
        return self.generation != generation

    async def _drain(self) -> None:
        self.stopping = True
        for worker in self.workers:
            if worker.conn is not None:
                try:
                    worker.conn.send(("drain", self.grace))
                except OSError:
                    pass
        deadline = time.monotonic() + self.grace + 2.0
        while time.monotonic() < deadline and any(
                s.process is not None and s.process.is_alive() for s in self.workers):
            await trio.sleep(0.05)
        for worker in self.workers:
            if worker.process is not None and worker.process.is_alive():
                worker.process.kill()

    # === shared outlier state (the supervisor is the only un-ejector) ===

    def _outlier_clusters(self):
        for name, policy in self.snapshot.clusters.items():
            if policy.outlier is not None and policy.outlier.enabled and name in self.slots:
                cslot, hslots = self.slots[name]
                yield name, policy.outlier, self.segment.cluster(cslot), [self.segment.host(h) for h in hslots]

    async def _sweep_outliers(self) -> None:
        """Envoy's per-cluster interval timer: un-eject hosts whose ejection time is up."""
        due: dict[str, int] = {}
        while True:
            await trio.sleep(SWEEP_TICK)
            now = now_ms()
            for name, policy, row, hosts in self._outlier_clusters():
                at = due.get(name)
                if at is None:
                    due[name] = now + policy.interval_ms
                elif now >= at:
                    outlier.sweep(hosts, row, now, policy)
                    due[name] = now + policy.interval_ms

    def _repair_after_crash(self) -> None:
        """A worker killed mid-ejection can leak a unit of ejections_active: recount it."""
        for _, _, row, hosts in self._outlier_clusters():
            outlier.recount_ejections(hosts, row)

    def stats_text(self) -> str:
        clusters = [StatsCluster(name, cslot, hslots, self.snapshot.clusters[name].limits,
                                 self.snapshot.clusters[name].outlier is not None)
                    for name, (cslot, hslots) in sorted(self.slots.items())]
        return render_stats(self.segment, clusters, now_ms())

    # === introspection for admin ===

    def ready(self) -> bool:
        return not self.stopping and all(s.ready for s in self.workers)

    def server_info(self) -> dict:
        return {
            "state": "DRAINING" if self.stopping else ("LIVE" if self.ready() else "INITIALIZING"),
            "generation": self.generation,
            "config_hash": self.snapshot.config_hash if self.snapshot else None,
            "reloads_ok": self.reloads_ok,
            "reloads_rejected": self.reloads_rejected,
            "workers": [{"index": s.index, "pid": s.process.pid if s.process else None,
                         "ready": s.ready, "generation": s.generation, "restarts": s.restarts}
                        for s in self.workers],
        }
