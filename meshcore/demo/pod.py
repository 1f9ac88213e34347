"""The seed article's test apps ("pods"), one HTTP/1.1 server per pod.

An app pod behaves like the article's images (scenarios.md):
  GET /?failRate=N&mode=busy   503 with probability N %, else 200 `{}`
  GET /?failRate=N&mode=crash  with probability N %: hang 2 s, then the pod's process exits
  anything else                200 with the pod's text, e.g. `Version 1: server id <uuid>`
plus helpers for tests: /echo (request as JSON), /status/<code>, /bytes/<n>[?chunked=1|close=1],
/delay/<ms>, /__close (hang up without answering), and /__log (every request the pod received, as
JSON; ?clear=1 empties it). Every response carries `x-pod: <name>`.

A sniffer pod (the article's tcpdump container) records every request and answers 503, as the
sniffer's sidecar did in the article; its log shows each request as tcpdump prints HTTP.

Each pod writes one line per request to stdout, flushed before it answers, in the access-log
format of the article's app (`127.0.0.1 - - [15/Jan/2020:09:05:24] "GET /?failRate=90&mode=busy
HTTP/1.1" 503 5 "" "curl/7.58.0"`), so whoever reads the pod's stdout (`meshcore demo`, as
`kubectl logs -f` does) has every line of a request before the client has its answer.

Run standalone (all pods in one process unless --socket-fd hands one pod its listening socket):
  python -m meshcore.demo --pod myweb-v1-a:18081:"Version 1" --pod retry-backend-a:18091:"{}"
  python -m meshcore.demo --sniffer sniffer:18099
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import socket
import sys
import time
import uuid
from urllib.parse import parse_qs

import orjson
import trio

from meshcore.errors import ProtocolError
from meshcore.proto.wire import (BODY_CHUNKED, BODY_LENGTH, DATA, DONE, ChunkedReader, parse_request,
                                 request_body_kind)

CRASH_HANG_S = 2.0  # the article's app hangs about 2 s before its process dies
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _stamp(now: float) -> str:
    t = time.localtime(now)
    return f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"


def access_log_line(peer: str, method: str, target: str, version: str, status: int | None,
                    size: int | None, referer: str, user_agent: str, now: float) -> str:
    """One request as the article's app logs it (CherryPy's access log, local time)."""
    return (f'{peer} - - [{_stamp(now)}] "{method} {target} {version}" '
            f'{"-" if status is None else status} {"-" if size is None else size} '
            f'"{referer}" "{user_agent}"')


def sniffer_log_line(peer: str, peer_port: int, name: str, port: int, length: int, method: str,
                     target: str, version: str, host: str, now: float) -> str:
    """One captured request as tcpdump prints an HTTP segment, plus its Host header."""
    t = time.localtime(now)
    micros = int((now % 1) * 1_000_000)
    return (f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{micros:06d} IP {peer}.{peer_port} > "
            f"{name}.{port}: length {length}: HTTP: {method} {target} {version} (Host: {host})")


class Pod:
    """One app pod: an HTTP/1.1 server on a port or on a listening socket handed over."""

    def __init__(self, name: str, port: int, text: str, host: str = "127.0.0.1", quiet: bool = False,
                 server_id: str | None = None, sock: socket.socket | None = None):
        self.name = name
        self.port = port
        self.host = host
        self.sock = sock
        self.server_id = server_id or str(uuid.uuid4())
        self.text = f"{text}: server id {self.server_id}\n" if text.startswith("Version") else text
        self.log: list[dict] = []
        self.quiet = quiet
        self.connections = 0

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        if self.sock is not None:
            listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(self.sock))]
        else:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
            self.port = listeners[0].socket.getsockname()[1]
        if not self.quiet:  # the first line a pod writes says that it serves (the kubelet's readiness)
            print(self.started_line(), flush=True)
        task_status.started()
        await trio.serve_listeners(self.on_connection, listeners)

    def started_line(self) -> str:
        return f"[{_stamp(time.time())}] ENGINE Serving on http://{self.host}:{self.port} as {self.name}"

    async def on_connection(self, stream):
        data = b""
        self.connections += 1
        conn_id = self.connections
        try:
            peer = stream.socket.getpeername()
        except OSError:
            peer = ("?", 0)
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
                    head_len = head.end
                    data, body_len, digest = await self._read_body(stream, head, data)
                    keep = await self.respond(stream, head, body_len, digest, conn_id, peer, head_len)
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

    def _emit(self, head, peer, status: int | None, size: int | None) -> None:
        """Write the request's access-log line, before the answer leaves (see module doc)."""
        if self.quiet:
            return
        print(access_log_line(peer[0], head.method.decode("latin-1"), head.path.decode("latin-1"),
                              f"HTTP/1.{head.version}",
                              status, size, _header(head, b"referer"), _header(head, b"user-agent"),
                              time.time()), flush=True)

    async def respond(self, stream, head, body_len, digest, conn_id=0, peer=("?", 0), head_len=0) -> bool:
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
        mode = params.get("mode")
        if mode is not None and "failRate" in params:
            try:
                fail = random.random() * 100 < float(params["failRate"])
            except ValueError:
                fail = False
            if mode == "crash" and fail:
                await self._crash(head)
            if fail:
                return await self._answer(stream, head, peer, 503, b"busy\n")
            return await self._answer(stream, head, peer, 200, b"{}", b"application/json")
        if path == "/__close":  # read the request, then hang up without a response
            self._emit(head, peer, None, None)
            return False
        if path == "/echo":
            return await self._answer(stream, head, peer, 200, orjson.dumps(self.log[-1]),
                                      b"application/json")
        if path.startswith("/status/"):
            code = int(path.split("/")[2])
            return await self._answer(stream, head, peer, code,
                                      b"" if code in (204, 304) else f"status {code}\n".encode())
        if path.startswith("/delay/"):
            await trio.sleep(int(path.split("/")[2]) / 1000)
        elif path.startswith("/bytes/"):
            n = int(path.split("/")[2])
            self._emit(head, peer, 200, n)
            return await self._send_bytes(stream, head, n, params)
        return await self._answer(stream, head, peer, 200, self.text.encode())

    async def _crash(self, head) -> None:
        """The article's crash mode: hang, then the whole process dies (Kubernetes restarts it)."""
        if not self.quiet:
            print(f"crash: {head.method.decode('latin-1')} {head.path.decode('latin-1')}: hanging "
                  f"{CRASH_HANG_S:g} s, then exiting", flush=True)
        await trio.sleep(CRASH_HANG_S)
        if not self.quiet:
            print("crash: exiting with code 1", flush=True)
        os._exit(1)

    async def _answer(self, stream, head, peer, status: int, body: bytes, ctype: bytes = b"text/plain") -> bool:
        self._emit(head, peer, status, len(body))
        await self._send(stream, status, body, ctype)
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


class Sniffer(Pod):
    """The article's sniffer: every request is captured (logged as tcpdump shows it) and answered
    503, as the sniffer pod's sidecar answered in the article (nothing listened behind it)."""

    def __init__(self, name: str, port: int, **kwargs):
        super().__init__(name, port, "sniffer", **kwargs)

    def started_line(self) -> str:
        return f"tcpdump: listening on {self.host}:{self.port} as {self.name}, capturing HTTP requests"

    async def respond(self, stream, head, body_len, digest, conn_id=0, peer=("?", 0), head_len=0) -> bool:
        if head.path.startswith(b"/__log"):
            return await super().respond(stream, head, body_len, digest, conn_id, peer, head_len)
        self.log.append({
            "method": head.method.decode("latin-1"), "path": head.path.decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in head.headers()],
            "body_len": body_len, "body_sha256": digest, "time": time.time(), "conn": conn_id,
        })
        if not self.quiet:
            print(sniffer_log_line(peer[0], peer[1], self.name, self.port, head_len + body_len,
                                   head.method.decode("latin-1"), head.path.decode("latin-1"),
                                   f"HTTP/1.{head.version}", _header(head, b"host"), time.time()),
                  flush=True)
        await self._send(stream, 503, b"no application in the sniffer pod\n")
        return head.keep_alive


def _header(head, name: bytes) -> str:
    for k, v in head.headers():
        if k.lower() == name:
            return v.decode("latin-1")
    return ""


async def serve_pods(pods: list[Pod], parent_pid: int | None = None, task_status=trio.TASK_STATUS_IGNORED):
    async with trio.open_nursery() as nursery:
        for pod in pods:
            await nursery.start(pod.serve)
        if parent_pid is not None:
            nursery.start_soon(_exit_with_parent, parent_pid)
        task_status.started()


async def _exit_with_parent(parent_pid: int) -> None:
    """A pod started by `meshcore demo` must not outlive it, even when it was SIGKILLed."""
    while os.getppid() == parent_pid:
        await trio.sleep(0.5)
    os._exit(0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m meshcore.demo",
                                description="Run demo pods: the seed article's test apps.")
    p.add_argument("--pod", action="append", default=[], metavar="NAME:PORT:TEXT",
                   help="an app pod answering TEXT ('Version N' adds ': server id <uuid>'); "
                        "repeatable (default: none)")
    p.add_argument("--sniffer", action="append", default=[], metavar="NAME:PORT",
                   help="a sniffer pod that logs every request and answers 503; repeatable "
                        "(default: none)")
    p.add_argument("--quiet", action="store_true",
                   help="write no access-log lines (default: one line per request on stdout)")
    p.add_argument("--socket-fd", type=int, metavar="FD",
                   help="serve the one pod on this inherited listening socket instead of binding "
                        "PORT (default: bind PORT)")
    p.add_argument("--server-id", metavar="UUID",
                   help="the one pod's server id (default: a new uuid4)")
    p.add_argument("--parent-pid", type=int, metavar="PID",
                   help="exit when this process is no longer the parent (default: never)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    specs = [("app", *p.split(":", 2)) for p in args.pod] + \
            [("sniffer", *s.split(":", 1), "") for s in args.sniffer]
    if not specs:
        parser.error("give at least one --pod or --sniffer")
    if any(len(s) != 4 or not s[2].isdigit() for s in specs):
        parser.error("expected --pod NAME:PORT:TEXT or --sniffer NAME:PORT")
    if (args.socket_fd is not None or args.server_id) and len(specs) != 1:
        parser.error("--socket-fd and --server-id need exactly one pod")
    sock = socket.socket(fileno=args.socket_fd) if args.socket_fd is not None else None
    pods = []
    for kind, name, port, text in specs:
        common = {"quiet": args.quiet, "sock": sock, "server_id": args.server_id}
        pods.append(Sniffer(name, int(port), **common) if kind == "sniffer"
                    else Pod(name, int(port), text, **common))
    try:
        trio.run(serve_pods, pods, args.parent_pid)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
