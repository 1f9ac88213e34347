"""Supervisor process: validates config, runs N workers, restarts them, reloads, drains, serves admin.

Workers are spawned (not forked) so each starts from a clean interpreter; each binds its own
SO_REUSEPORT socket and receives the validated config sources over a pipe. A config that fails
validation is reported and never reaches a worker.

Error handling: a worker that dies is restarted (with a short backoff when it keeps dying), after
the supervisor has given back the circuit-breaker units it held and forgotten its connections
(meshcore.upstream.breaker.return_worker_holdings), so limits stay exact after any crash; a
failed reload leaves the running config in place; SIGTERM/SIGINT drain the workers for up to
`grace` seconds, then stop them.

Start-up failures are one line and exit code 1, never a restart loop or a traceback: an address
that cannot be listened on (proxy, admin or Prometheus; checked before anything starts, and again
by the listener itself: a worker that cannot bind reports it over its pipe and exits) prints
`meshcore: cannot listen on 127.0.0.1:15001: address already in use`.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import signal
import sys
import time

import trio

from meshcore import __version__
from meshcore.admin import LOG_LEVELS, serve_admin, serve_health, serve_prometheus
from meshcore.config.compile import compile_sources
from meshcore.config.dns import DEFAULT_REFRESH_RATE, DnsCache
from meshcore.config.load import read_sources
from meshcore.errors import ConfigError
from meshcore.metrics import istio as istio_metrics
from meshcore.metrics.envoy import Baseline, collect_stats, select
from meshcore.metrics.istio import forget_connections
from meshcore.metrics.labels import (DestinationRegistry, destination_for_cluster,
                                     destination_for_endpoint, source_identity)
from meshcore.metrics.prometheus import render as render_prometheus
from meshcore.metrics.prometheus import render_histogram
from meshcore.shm.layout import C_DEST_ID, H_DEST_ID, Layout
from meshcore.shm.segment import Segment
from meshcore.shm.slots import SlotAllocator, SlotsExhausted
from meshcore.startup import listen_problem, probe, raise_nofile_limit
from meshcore.stats_render import StatsCluster, cluster_views, render_stats
from meshcore.upstream import outlier
from meshcore.upstream.breaker import return_worker_holdings
from meshcore.upstream.balancer import stamp_joined
from meshcore.upstream.cluster import now_ms
from meshcore.worker import worker_main

WATCH_INTERVAL = 1.0
RESTART_BACKOFF_MAX = 5.0
SWEEP_TICK = 0.05  # outlier sweeps run on each cluster's own `interval`, checked this often
# Shared-memory capacity: a config needing more rows is rejected (the running one stays).
MAX_CLUSTERS = 1024
MAX_HOSTS = 8192


LOGGERS = ("admin", "config", "main", "upstream")
_LEVELS = dict.fromkeys(LOGGERS, "info")  # admin /logging changes these


def log(msg: str, logger: str = "main", level: str = "info") -> None:
    """One supervisor log line, unless `logger` is set above `level` (admin /logging)."""
    if LOG_LEVELS.index(level) < LOG_LEVELS.index(_LEVELS.get(logger, "info")):
        return
    print(f"meshcore[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


def _fingerprint(paths: list[str]):
    """A cheap change detector over the config paths (files and directory entries).

    Symlinks are followed and the inode is part of the fingerprint: a Kubernetes ConfigMap volume
    updates by swapping its `..data` symlink to a new directory, so a file can change while its
    name, size and even mtime stay the same; its inode never does. An entry vanishing mid-swap
    changes the fingerprint too, and the next tick sees the settled state."""
    items = []
    for path in paths:
        try:
            if os.path.isdir(path):
                for name in sorted(os.listdir(path)):
                    st = os.stat(os.path.join(path, name))
                    items.append((path, name, st.st_ino, st.st_mtime_ns, st.st_size))
            else:
                st = os.stat(path)
                items.append((path, st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            items.append((path, None))
    return tuple(items)


@contextlib.contextmanager
def _worker_environment():
    """Workers start as `python -OO` (PYTHONOPTIMIZE=2 in the environment they inherit, unless
    the operator set PYTHONOPTIMIZE): a worker never shows a docstring, and without them it
    holds about 1 MB less resident memory. Its asserts are import-time layout checks that this
    process has already run. The supervisor's own environment is left as it was."""
    if "PYTHONOPTIMIZE" in os.environ:
        yield
        return
    os.environ["PYTHONOPTIMIZE"] = "2"
    try:
        yield
    finally:
        del os.environ["PYTHONOPTIMIZE"]


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
        self.failure = None  # a start-up problem (one line); run() then exits 1
        self.reloads_ok = 0
        self.reloads_rejected = 0
        # observability (admin, Prometheus)
        self.prometheus_address = options.get("prometheus")
        self.health_address = options.get("health")  # Istio's 15021 readiness port, or None
        self.sidecar = options.get("sidecar")  # run --sidecar: {"inbound_listen", ...} or None
        self.source = options.get("source") or source_identity(environ=os.environ)
        self.argv = list(options.get("argv") or sys.argv)
        self.registry = DestinationRegistry()
        self.baseline = Baseline()
        self.istio_baseline: dict = {}
        self.health_failed = False
        self.started_wall = time.time()
        self.started = time.monotonic()
        self._quit = None
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
        cells, layout = self.segment.cells, self.segment.layout
        for slot in new_clusters:  # rows handed out afresh start from zero
            self.segment.cluster(slot).clear()
            for w in range(len(self.workers)):
                self.segment.worker_stats(w, slot).clear()
                _zero(cells, layout.cluster_hist_off(w, slot), 192)
                self.segment.holdings(w, slot).clear()
        for slot in new_hosts:
            self.segment.host(slot).clear()
            for w in range(len(self.workers)):
                _zero(cells, layout.host_stats_off(w, slot), 64)
        self._publish_destinations(snapshot, slots)
        return sources, snapshot, slots

    def _publish_destinations(self, snapshot, slots) -> None:
        """Write each cluster's and host's Istio destination label-set id into its row."""
        cells, layout = self.segment.cells, self.segment.layout
        for name, policy in snapshot.clusters.items():
            cslot, hslots = slots[name]
            cells.store32(layout.cluster_off(cslot) + C_DEST_ID,
                          self.registry.intern(destination_for_cluster(policy)))
            for ep, hslot in zip(policy.endpoints, hslots):
                cells.store32(layout.host_off(hslot) + H_DEST_ID,
                              self.registry.intern(destination_for_endpoint(policy, ep)))


    def reload(self, why: str) -> bool:
        try:
            sources, snapshot, slots = self.load()
        except ConfigError as exc:
            self.reloads_rejected += 1
            log(f"config rejected ({why}); keeping generation {self.generation}:\n  "
                + "\n  ".join(exc.problems), "config", "error")
            return False
        if self.snapshot is not None and snapshot.config_hash == self.snapshot.config_hash:
            return True
        self.generation += 1
        self.sources, self.snapshot, self.slots = sources, snapshot, slots
        self.reloads_ok += 1
        for w in snapshot.warnings:
            log(f"warning: {w}")
        log(f"config generation {self.generation} loaded ({why})", "config")
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
        raise_nofile_limit()
        inbound = self.sidecar["inbound_listen"] if self.sidecar is not None else None
        for address in (self.listen, inbound, self.admin, self.health_address,
                        self.prometheus_address):
            problem = probe(address) if address is not None else None
            if problem:
                print(f"meshcore: {problem}", file=sys.stderr, flush=True)
                self.segment.unlink()
                self.segment.close()
                return 1
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
        return 1 if self.failure else 0

    def fail(self, problem: str) -> None:
        """A start-up failure (an address that cannot be listened on): said once, no restarts,
        stop, and `run` returns 1."""
        if self.failure is None:
            self.failure = problem
            print(f"meshcore: {problem}", file=sys.stderr, flush=True)
        self.stopping = True
        if self._quit is not None:
            self._quit.set()

    async def _main(self) -> None:
        self._quit = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(self._signals)
            for serve, address in ((serve_admin, self.admin),
                                   (serve_health, self.health_address),
                                   (serve_prometheus, self.prometheus_address)):
                if address is None:
                    continue
                try:
                    await nursery.start(serve, self, address)
                except OSError as exc:  # taken since run() probed it
                    self.fail(listen_problem(address, exc))
                    nursery.cancel_scope.cancel()
                    return
            for worker in self.workers:
                nursery.start_soon(self._run_worker, worker)
            if self.watch:
                nursery.start_soon(self._watch)
            nursery.start_soon(self._sweep_outliers)
            nursery.start_soon(self._refresh_dns_periodically)
            nursery.start_soon(self._announce)
            await self._quit.wait()
            await self._drain()
            nursery.cancel_scope.cancel()

    async def _signals(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.reload("SIGHUP")
                    continue
                self.quit(f"received {signal.Signals(signum).name}")
                return

    def quit(self, why: str) -> None:
        """Drain (up to the grace period) and exit: SIGTERM, SIGINT, admin /quitquitquit."""
        if self._quit is not None and not self._quit.is_set():
            log(f"{why}: draining for up to {self.grace:g}s")
            self._quit.set()

    async def _announce(self) -> None:
        while not all(s.ready for s in self.workers):
            await trio.sleep(0.05)
        host, port = self.listen
        prom = ""
        if self.prometheus_address is not None:
            prom = (f" prometheus on http://{self.prometheus_address[0]}:"
                    f"{self.prometheus_address[1]}/stats/prometheus")
        side = ""
        if self.sidecar is not None:
            ih, ip = self.sidecar["inbound_listen"]
            side = (f" (sidecar: inbound {ih}:{ip}, outbound traffic policy "
                    f"{self.sidecar['outbound_traffic_policy']})")
        if self.health_address is not None:
            prom += f" readiness on http://{self.health_address[0]}:{self.health_address[1]}/healthz/ready"
        log(f"{len(self.workers)} worker(s) ready; proxy on http://{host}:{port}{side} "
            f"admin on http://{self.admin[0]}:{self.admin[1]}{prom}")

    def _spawn(self, slot: WorkerSlot) -> None:
        parent, child = self.mp.Pipe()
        proc = self.mp.Process(target=worker_main, name=f"meshcore-worker-{slot.index}",
                               args=(child, slot.index, self.segment.name, self.listen,
                                     self.snapshot, self.slots, self.options))
        with _worker_environment():
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
            try:
                while slot.conn.poll():  # what it said just before it exited ("fatal")
                    self._on_message(slot, *slot.conn.recv())
            except (EOFError, OSError):
                pass
            slot.conn.close()
            slot.conn = None
            if self.stopping:
                return
            slot.restarts += 1
            log(f"worker {slot.index} (pid {slot.process.pid}) exited with {slot.process.exitcode}; restarting",
                "main", "error")
            self._repair_after_crash(slot.index)
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
            self._on_message(slot, verb, payload)

    def _on_message(self, slot: WorkerSlot, verb: str, payload) -> None:
        if verb == "ready":
            slot.ready = True
            if slot.generation != self.generation:  # a reload raced with its start
                slot.conn.send(("config", self.config_message()))
        elif verb == "loaded":
            slot.generation = payload
        elif verb == "error":
            log(f"worker {slot.index}: {payload}")
        elif verb == "fatal":  # it cannot serve at all (its listen address): stop, exit 1
            self.fail(payload)

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

    def _repair_after_crash(self, worker: int) -> None:
        """Before a dead worker is restarted: give back the breaker units it held (its holdings
        rows), forget its connections, and recount ejections_active (a worker killed
        mid-ejection can leak a unit of it)."""
        cells, layout = self.segment.cells, self.segment.layout
        returned = return_worker_holdings(cells, layout, worker)
        if returned:
            names = {cslot: name for name, (cslot, _) in (self.slots or {}).items()}
            log(f"worker {worker} held circuit-breaker units; returned: " + ", ".join(
                f"{names.get(slot, f'slot {slot}')} ({_held_text(held)})"
                for slot, held in sorted(returned.items())), "upstream")
        forget_connections(cells, layout, worker)
        for _, _, row, hosts in self._outlier_clusters():
            outlier.recount_ejections(hosts, row)

    def _stats_clusters(self) -> list[StatsCluster]:
        return [StatsCluster(name, cslot, hslots, self.snapshot.clusters[name].limits,
                             self.snapshot.clusters[name].outlier is not None)
                for name, (cslot, hslots) in sorted(self.slots.items())]

    def stats_text(self) -> str:
        return render_stats(self.segment, self._stats_clusters(), now_ms())

    # === observability for admin (meshcore.admin) ===

    def ready(self) -> bool:
        return not self.stopping and all(s.ready for s in self.workers)

    def health_state(self) -> str:
        """LIVE, DRAINING (stopping, or POST /healthcheck/fail) or INITIALIZING: what /ready
        answers, and what the sidecar's readiness probe (Istio's 15021) must answer."""
        if self.stopping or self.health_failed:
            return "DRAINING"
        return "LIVE" if self.ready() else "INITIALIZING"

    def readiness(self) -> tuple[bool, str]:
        """(ready, state) for a readiness probe: ready only while LIVE."""
        state = self.health_state()
        return state == "LIVE", state

    def set_health_failed(self, failed: bool) -> None:
        self.health_failed = failed
        log(f"health checks {'failing' if failed else 'passing'} (admin)", "admin")

    def _raw_stats(self, istio=None):
        return collect_stats(self.segment.cells, self.segment.layout, self._stats_clusters(),
                             now_ms(), listen=self.listen, state=self.health_state(),
                             uptime_s=int(time.monotonic() - self.started),
                             concurrency=len(self.workers),
                             memory_bytes=self.memory()["total_physical_bytes"], istio=istio)

    def stats(self):
        """Every Envoy-style stat, counters relative to the last /reset_counters."""
        return self.baseline.apply(self._raw_stats())

    def reset_counters(self) -> None:
        self.baseline.reset(self._raw_stats())
        series = istio_metrics.collect(self.segment.cells, self.segment.layout)[0]
        self.istio_baseline = {key: s.requests for key, s in series.items()}
        log("counters reset (admin)", "admin")

    def _histograms(self):
        cells, layout = self.segment.cells, self.segment.layout
        for name, (cslot, _) in sorted(self.slots.items()):
            yield (name,) + istio_metrics.hist_collect(cells, layout, cslot)

    def histograms_json(self) -> dict:
        """Envoy's `/stats?format=json` histogram section (cumulative quantiles only)."""
        quantiles = (0, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 100)
        computed = []
        for name, buckets, _total, count in self._histograms():
            values = [{"cumulative": istio_metrics.bucket_quantile(buckets, count, q / 100),
                       "interval": None} for q in quantiles]
            computed.append({"name": f"cluster.{name}.upstream_rq_time", "values": values})
        return {"supported_quantiles": list(quantiles), "computed_quantiles": computed}

    def prometheus(self, regex: str | None = None, used_only: bool = False) -> bytes:
        """The `/stats/prometheus` body: Istio's metrics, then Envoy's (filters apply to
        Envoy's). Raises re.error for a bad regex."""
        cells, layout = self.segment.cells, self.segment.layout
        istio = istio_metrics.collect(cells, layout)
        stats = select(self.baseline.apply(self._raw_stats(istio)), regex, used_only)
        extra = ["# TYPE istio_build gauge",
                 f'istio_build{{component="proxy",tag="meshcore-{__version__}"}} 1',
                 "# TYPE meshcore_istio_label_overflow_total counter",
                 f"meshcore_istio_label_overflow_total {istio[1] + self.registry.overflowed}"]
        pattern = re.compile(regex) if regex else None
        extra += render_histogram("envoy_cluster_upstream_rq_time", [
            ((("cluster_name", name),), buckets, total, count)
            for name, buckets, total, count in self._histograms()
            if (count or not used_only)
            and (pattern is None or pattern.search(f"cluster.{name}.upstream_rq_time"))])
        return render_prometheus(istio[0], self.registry, self.source, stats,
                                 self.istio_baseline, extra)

    def cluster_views(self):
        clusters = [(name, self.snapshot.clusters[name], self.slots[name])
                    for name in sorted(self.slots)]
        return cluster_views(self.segment.cells, self.segment.layout, clusters, now_ms())

    def memory(self) -> dict:
        """Resident set size of the supervisor and of each worker (bytes, from /proc)."""
        me = {"pid": os.getpid(), "rss_bytes": _rss(os.getpid())}
        workers = []
        for s in self.workers:
            pid = s.process.pid if s.process is not None else None
            workers.append({"index": s.index, "pid": pid,
                            "rss_bytes": _rss(pid) if pid and s.process.is_alive() else 0})
        return {"supervisor": me, "workers": workers,
                "total_physical_bytes": me["rss_bytes"] + sum(w["rss_bytes"] for w in workers)}

    def log_levels(self) -> dict:
        return dict(_LEVELS)

    def set_log_levels(self, changes: dict) -> str | None:
        """Admin /logging: `level` sets every logger, `<logger>=<level>` one. Returns a problem
        (nothing changed) or None."""
        for name, level in changes.items():
            if level not in LOG_LEVELS:
                return f"error: unknown logger level {level!r}"
            if name != "level" and name not in _LEVELS:
                return f"error: unknown logger {name!r}"
        for name, level in changes.items():
            if name == "level":
                for logger in _LEVELS:
                    _LEVELS[logger] = level
            else:
                _LEVELS[name] = level
        return None

    def server_info(self) -> dict:
        up = int(time.monotonic() - self.started)
        src = self.source
        return {
            "version": f"meshcore/{__version__}/python{sys.version.split()[0]}",
            "state": self.health_state(),
            "uptime_current_epoch": f"{up}s",
            "uptime_all_epochs": f"{up}s",
            "hot_restart_version": "disabled",
            "command_line_options": {
                "argv": self.argv,
                "config_path": self.config_paths,
                "listen": f"{self.listen[0]}:{self.listen[1]}",
                "admin": f"{self.admin[0]}:{self.admin[1]}",
                "prometheus": (f"{self.prometheus_address[0]}:{self.prometheus_address[1]}"
                               if self.prometheus_address else None),
                "health": (f"{self.health_address[0]}:{self.health_address[1]}"
                           if self.health_address else None),
                "sidecar": self.sidecar is not None,
                "inbound": ("{0}:{1}".format(*self.sidecar["inbound_listen"])
                            if self.sidecar is not None else None),
                "outbound_traffic_policy": (self.sidecar["outbound_traffic_policy"]
                                            if self.sidecar is not None else None),
                "concurrency": len(self.workers),
                "drain_time": f"{self.grace:g}s",
            },
            "node": {"workload_name": src.workload, "namespace": src.namespace,
                     "app": src.app, "version": src.version},
            "started": self.started_wall,
            "generation": self.generation,
            "config_hash": self.snapshot.config_hash if self.snapshot else None,
            "reloads_ok": self.reloads_ok,
            "reloads_rejected": self.reloads_rejected,
            "workers": [{"index": s.index, "pid": s.process.pid if s.process else None,
                         "ready": s.ready, "generation": s.generation, "restarts": s.restarts}
                        for s in self.workers],
        }


def _held_text(held) -> str:
    return ", ".join(f"{name} {n}" for name, n in zip(
        ("upstream_cx_active", "upstream_rq_pending_active", "upstream_rq_active",
         "rq_retry_active"), held) if n)


def _zero(cells, off: int, size: int) -> None:
    for k in range(0, size, 8):
        cells.store64(off + k, 0)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0

