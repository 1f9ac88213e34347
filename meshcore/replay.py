"""`python -m meshcore replay FILE... --to HOST:PORT`: send captured requests again.

Reads capture files written by the capture sink (meshcore.capture), one JSON object per line, and
sends each request to `--to` over keep-alive connections, one at a time, in file order:

* the request line is `METHOD TARGET HTTP/1.1`, then the captured header lines in their order
  (latin-1 encoded back to the original bytes), then the body (base64-decoded when captured so);
* framing stays truthful: with `transfer-encoding: chunked` the body goes as one chunk plus the
  last chunk; a `content-length` whose value no longer matches the captured body (the capture was
  truncated) is rewritten in place; a body without any framing header gets `content-length`
  appended; everything else is sent exactly as captured;
* `--host-override H` replaces the `host` value (or adds a host line when there is none);
* `--rate R` paces the requests at R per second (default: as fast as the server answers);
* `--rotated` also replays FILE's rotated siblings first (FILE.N ... FILE.1, then FILE);
* each response is read to its end and discarded; a connection the server closes (or that
  fails) is replaced for the next request. A request that fails is counted, not retried.

Prints a summary: requests sent, responses by status, errors, truncated bodies replayed, bad lines.
Exit status 0 when every request got a response, 1 otherwise, 2 for usage errors.
"""
from __future__ import annotations

import argparse
import base64
import socket
import sys
import time
from collections import Counter

from meshcore.capture import read_records, rotated_files
from meshcore.errors import ProtocolError
from meshcore.proto.wire import (BODY_CHUNKED, BODY_LENGTH, BODY_NONE, DATA, DONE, ChunkedReader,
                                 parse_response, response_body_kind)

__all__ = ["main", "build_request", "Replayer"]


def build_request(rec: dict, host_override: str | None = None, default_host: str | None = None):
    """The wire bytes of one captured request: (bytes, body_was_truncated). Raises ValueError
    (KeyError, TypeError) for a record without the required fields."""
    method = rec["method"].encode("latin-1")
    target = rec["target"].encode("latin-1")
    if not method or not target:
        raise ValueError("empty method or target")
    body_text = rec.get("body") or ""
    if rec.get("body_encoding") == "base64":
        body = base64.b64decode(body_text, validate=True)
    else:
        body = body_text.encode("utf-8")
    truncated = bool(rec.get("body_truncated"))
    lines = [method + b" " + target + b" HTTP/1.1\r\n"]
    chunked = False
    framed = False
    have_host = False
    for item in rec.get("headers") or ():
        name, value = item[0].encode("latin-1"), item[1].encode("latin-1")
        lname = name.lower()
        if lname == b"host":
            if have_host:
                continue  # at most one Host (RFC 9112 §3.2)
            have_host = True
            if host_override is not None:
                value = host_override.encode("latin-1")
        elif lname == b"content-length":
            framed = True
            if value.strip() != str(len(body)).encode():
                value = str(len(body)).encode()
        elif lname == b"transfer-encoding":
            framed = True
            chunked = b"chunked" in value.lower()
        lines.append(name + b": " + value + b"\r\n")
    if not have_host:
        host = host_override or default_host or ""
        lines.insert(1, b"host: " + host.encode("latin-1") + b"\r\n")
    if not framed and body:
        lines.append(b"content-length: %d\r\n" % len(body))
    lines.append(b"\r\n")
    if chunked:
        if body:
            lines.append(b"%x\r\n" % len(body) + body + b"\r\n")
        lines.append(b"0\r\n\r\n")
    else:
        lines.append(body)
    return b"".join(lines), truncated


class _Closed(Exception):
    pass


class Replayer:
    """Sequential sender over one keep-alive connection (re-opened when needed)."""

    def __init__(self, host: str, port: int, timeout: float = 10.0):
        self.host = host
        self.port = port
        self.timeout = timeout
        self.sock = None
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buf = b""

    def _connect(self) -> None:
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise _Closed()
        return data

    def send(self, request: bytes, is_head: bool) -> int:
        """Send one request and read its whole response; returns the status. Raises OSError,
        ProtocolError or _Closed on failure (the connection is then closed)."""
        fresh = self.sock is None
        if fresh:
            self._connect()
        try:
            try:
                self.sock.sendall(request)
                status = self._response(is_head)
            except (_Closed, ConnectionResetError, BrokenPipeError):
                if fresh:
                    raise
                # The kept-alive connection was closed by the server meanwhile: once more.
                self.close()
                self._connect()
                self.sock.sendall(request)
                status = self._response(is_head)
            return status
        except BaseException:
            self.close()
            raise

    def _response(self, is_head: bool) -> int:
        data = self.buf or self._recv()
        while True:
            rhead = parse_response(data, 0)
            while rhead is not None and rhead.status < 200:
                data = data[rhead.end:]
                rhead = parse_response(data, 0) if data else None
            if rhead is not None:
                break
            try:
                data += self._recv()
            except _Closed:
                raise ProtocolError("connection closed inside a response head", 502)
        kind, length = response_body_kind(rhead, is_head)
        pos = rhead.end
        keep = rhead.keep_alive
        if kind == BODY_NONE:
            self.buf = data[pos:]
        elif kind == BODY_LENGTH:
            while len(data) - pos < length:
                data += self._recv()
            self.buf = data[pos + length:]
        elif kind == BODY_CHUNKED:
            reader = ChunkedReader()
            while True:
                step, a, b = reader.step(data, pos, len(data))
                if step == DATA:
                    pos = b
                elif step == DONE:
                    self.buf = data[a:]
                    break
                else:
                    data = data[a:] + self._recv()
                    pos = 0
        else:  # until EOF
            try:
                while True:
                    self._recv()
            except _Closed:
                pass
            keep = False
        if not keep or self.buf:
            self.close()  # stray bytes after a response: never reuse
        return rhead.status


def _parse_args(argv):
    from meshcore.io.sockets import parse_hostport

    def hostport(text):
        try:
            return parse_hostport(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def rate(text):
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    p = argparse.ArgumentParser(prog="meshcore replay",
                                description="Replay requests recorded by the capture sink.")
    p.add_argument("files", nargs="+", metavar="FILE", help="capture file(s), replayed in order (required)")
    p.add_argument("--to", required=True, type=hostport, metavar="HOST:PORT",
                   help="where to send the requests (required)")
    p.add_argument("--rate", type=rate, default=None, metavar="R",
                   help="requests per second (default: as fast as possible, sequential)")
    p.add_argument("--host-override", default=None, metavar="H",
                   help="replace the Host header value (default: the recorded Host)")
    p.add_argument("--rotated", action="store_true",
                   help="replay each FILE's rotated siblings first (FILE.N ... FILE.1, FILE; default: FILE only)")
    p.add_argument("--timeout", type=rate, default=10.0, metavar="SECONDS",
                   help="per-request socket timeout in seconds (default 10)")
    return p.parse_args(argv)


def main(argv=None, out=None) -> int:
    """Entry point of `meshcore replay`. Returns the exit status."""
    out = out or sys.stdout
    try:
        args = _parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    paths = []
    for f in args.files:
        paths.extend(rotated_files(f) if args.rotated else [f])
    host, port = args.to
    default_host = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    replayer = Replayer(host, port, args.timeout)
    statuses: Counter = Counter()
    sent = errors = bad = truncated = 0
    interval = 1.0 / args.rate if args.rate else 0.0
    start = time.monotonic()
    try:
        for path, lineno, rec in read_records(paths):
            if rec is None:
                bad += 1
                print(f"{path}:{lineno}: not a capture record; skipped", file=sys.stderr)
                continue
            try:
                request, cut = build_request(rec, args.host_override, default_host)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
                bad += 1
                print(f"{path}:{lineno}: invalid capture record ({exc}); skipped", file=sys.stderr)
                continue
            if interval:
                due = start + sent * interval
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            sent += 1
            truncated += cut
            try:
                statuses[replayer.send(request, rec["method"] == "HEAD")] += 1
            except (OSError, ProtocolError, _Closed) as exc:
                errors += 1
                print(f"{path}:{lineno}: {type(exc).__name__}: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    finally:
        replayer.close()
    elapsed = time.monotonic() - start
    by_status = ", ".join(f"{code}: {n}" for code, n in sorted(statuses.items())) or "none"
    print(f"sent {sent} in {elapsed:.2f}s; responses {sum(statuses.values())} ({by_status}); "
          f"errors {errors}; truncated bodies {truncated}; bad lines {bad}", file=out)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
