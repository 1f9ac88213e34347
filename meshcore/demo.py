"""Demo backends ("pods") and the `python -m meshcore demo` command.

A pod behaves like the seed article's test apps (scenarios.md):
  GET /?failRate=N&mode=busy   503 with probability N %, else 200 `{}`
  GET /?failRate=N&mode=crash  with probability N %: hang ~2 s, then the pod process dies
  anything else                200 with the pod's text, e.g. `Version 1: server id <uuid>`
plus helpers for tests: /echo (request as JSON), /status/<code>, /bytes/<n>[?chunked=1|close=1],
/delay/<ms>, /__close (hang up without answering), and /__log (every request the pod received, as JSON; ?clear=1 empties it).
Every response carries `x-pod: <name>`. Run standalone:
  python -m meshcore.demo --pod v1-a:18081:"Version 1" --pod v1-b:18082:"Version 1"
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import subprocess
import sys
import time
import uuid
from urllib.parse import parse_qs

import orjson
import trio

from meshcore.errors import ProtocolError
from meshcore.proto.wire import (BODY_CHUNKED, BODY_LENGTH, DATA, DONE, ChunkedReader, parse_request,
                                 request_body_kind)

DEMO_PODS = [
    ("myweb-v1-a", 18081, "Version 1"), ("myweb-v1-b", 18082, "Version 1"),
    ("myweb-v1-c", 18083, "Version 1"), ("myweb-v2-a", 18084, "Version 2"),
    ("myweb-v2-b", 18085, "Version 2"), ("myweb-v2-c", 18086, "Version 2"),
    ("retry-a", 18091, "{}"), ("retry-b", 18092, "{}"), ("retry-c", 18093, "{}"),
]


class Pod:
    def __init__(self, name: str, port: int, text: str, host: str = "127.0.0.1", quiet: bool = False):
        self.name = name
        self.port = port
        self.host = host
        self.server_id = str(uuid.uuid4())
        self.text = f"{text}: server id {self.server_id}\n" if text.startswith("Version") else text
        self.log: list[dict] = []
        self.quiet = quiet
        self.connections = 0

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        task_status.started()
        await trio.serve_listeners(self.on_connection, listeners)

    async def on_connection(self, stream):
        data = b""
        self.connections += 1
        conn_id = self.connections
        async with stream:
            try:
                while True:
                    head = parse_request(data, 0) if data else None
                    while head is None:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            return
                        data += chunk
                        head = parse_request(data, 0)
                    data, body_len, digest = await self._read_body(stream, head, data)
                    keep = await self.respond(stream, head, body_len, digest, conn_id)
                    if not keep:
                        return
            except ProtocolError as exc:
                await stream.send_all(b"HTTP/1.1 %d Bad\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                                      % exc.status)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _read_body(self, stream, head, data):
        kind, length = request_body_kind(head)
        pos = head.end
        digest = hashlib.sha256()
        total = 0
        if kind == BODY_LENGTH:
            while True:
                take = min(len(data) - pos, length - total)
                digest.update(data[pos:pos + take])
                total += take
                pos += take
                if total == length:
                    return data[pos:], total, digest.hexdigest()
                data = await stream.receive_some(65536)
                pos = 0
                if not data:
                    raise trio.BrokenResourceError("eof in body")
        if kind == BODY_CHUNKED:
            reader = ChunkedReader()
            while True:
                step, a, b = reader.step(data, pos, len(data))
                if step == DATA:
                    digest.update(data[a:b])
                    total += b - a
                    pos = b
                elif step == DONE:
                    return data[a:], total, digest.hexdigest()
                else:
                    more = await stream.receive_some(65536)
                    if not more:
                        raise trio.BrokenResourceError("eof in body")
                    data = data[a:] + more
                    pos = 0
        return data[pos:], 0, digest.hexdigest()

    async def respond(self, stream, head, body_len, digest, conn_id=0) -> bool:
        path, _, query = head.path.decode("latin-1").partition("?")
        params = {k: v[0] for k, v in parse_qs(query).items()}
        if path == "/__log":
            body = orjson.dumps(self.log)
            if params.get("clear"):
                self.log.clear()
            await self._send(stream, 200, body, b"application/json")
            return head.keep_alive
        self.log.append({
            "method": head.method.decode("latin-1"), "path": head.path.decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in head.headers()],
            "body_len": body_len, "body_sha256": digest, "time": time.time(), "conn": conn_id,
        })
        if not self.quiet:
            print(f"[{self.name}] {head.method.decode()} {head.path.decode('latin-1')}", flush=True)
        mode = params.get("mode")
        if mode is not None and "failRate" in params:
            fail = random.random() * 100 < float(params["failRate"])
            if mode == "crash" and fail:
                await trio.sleep(2)
                os._exit(1)
            if fail:
                await self._send(stream, 503, b"busy\n")
                return head.keep_alive
            await self._send(stream, 200, b"{}", b"application/json")
            return head.keep_alive
        if path == "/__close":  # read the request, then hang up without a response
            return False
        if path == "/echo":
            body = orjson.dumps(self.log[-1])
            await self._send(stream, 200, body, b"application/json")
        elif path.startswith("/status/"):
            code = int(path.split("/")[2])
            await self._send(stream, code, b"" if code in (204, 304) else f"status {code}\n".encode())
        elif path.startswith("/delay/"):
            await trio.sleep(int(path.split("/")[2]) / 1000)
            await self._send(stream, 200, self.text.encode())
        elif path.startswith("/bytes/"):
            return await self._send_bytes(stream, head, int(path.split("/")[2]), params)
        else:
            await self._send(stream, 200, self.text.encode())
        return head.keep_alive

    async def _send(self, stream, status: int, body: bytes, ctype: bytes = b"text/plain"):
        head = b"HTTP/1.1 %d X\r\nx-pod: %s\r\ncontent-type: %s\r\n" % (status, self.name.encode(), ctype)
        if status not in (204, 304):
            head += b"content-length: %d\r\n" % len(body)
        await stream.send_all(head + b"\r\n" + body)

    async def _send_bytes(self, stream, head, n: int, params) -> bool:
        """Stream n bytes of a repeating pattern, 64 KiB at a time (for large-body tests)."""
        block = (b"0123456789abcdef" * 4096)
        chunked, close = params.get("chunked"), params.get("close")
        hdr = b"HTTP/1.1 200 OK\r\nx-pod: %s\r\n" % self.name.encode()
        if chunked:
            hdr += b"transfer-encoding: chunked\r\n"
        elif close:
            hdr += b"connection: close\r\n"
        else:
            hdr += b"content-length: %d\r\n" % n
        await stream.send_all(hdr + b"\r\n")
        if head.method == b"HEAD":
            return not close and head.keep_alive
        left = n
        while left:
            piece = block[:min(left, len(block))]
            left -= len(piece)
            await stream.send_all(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            await stream.send_all(b"0\r\n\r\n")
        return not close and head.keep_alive


async def serve_pods(pods: list[Pod], task_status=trio.TASK_STATUS_IGNORED):
    async with trio.open_nursery() as nursery:
        for pod in pods:
            await nursery.start(pod.serve)
        task_status.started()


def backends_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshcore.demo")
    parser.add_argument("--pod", action="append", default=[], metavar="NAME:PORT:TEXT")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    specs = [p.split(":", 2) for p in args.pod] or [[n, str(p), t] for n, p, t in DEMO_PODS]
    pods = [Pod(name, int(port), text, quiet=args.quiet) for name, port, text in specs]
    for pod in pods:
        print(f"pod {pod.name} on 127.0.0.1:{pod.port}: {pod.text.strip()}", flush=True)
    try:
        trio.run(serve_pods, pods)
    except KeyboardInterrupt:
        pass
    return 0


def run_demo(args) -> int:
    """Start the demo pods in a child process, then the proxy on examples/demo in the foreground."""
    from meshcore.cli import cmd_run
    config = args.config or [os.path.join(os.getcwd(), "examples", "demo")]
    missing = [c for c in config if not os.path.exists(c)]
    if missing:
        print(f"meshcore demo: config not found: {', '.join(missing)} (run from the repository root)",
              file=sys.stderr)
        return 2
    args.config = config
    pods = subprocess.Popen([sys.executable, "-m", "meshcore.demo", "--quiet"])
    host, port = args.listen
    print(f"""
meshcore demo: 6 myweb pods (v1 x3, v2 x3) and 3 retry pods on 127.0.0.1:18081-18093
try, in another terminal:
  curl -s http://{host}:{port}/ -H 'Host: myweb-service'          # v1 pods only (subset v1, RANDOM)
  curl -s http://{host}:{port}/ -H 'Host: split-service'          # 80 % v1, 20 % v2
  curl -s 'http://{host}:{port}/?failRate=50&mode=busy' -H 'Host: retry-service'   # retried: {{}}
  curl -s http://{args.admin[0]}:{args.admin[1]}/config_dump      # the compiled config
Ctrl-C stops it.
""", flush=True)
    try:
        return cmd_run(args)
    finally:
        pods.terminate()
        pods.wait(5)


if __name__ == "__main__":
    raise SystemExit(backends_main())
