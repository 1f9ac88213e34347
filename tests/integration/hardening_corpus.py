"""hardening.md §2.2's 80 request byte strings against meshcore, with a recording origin.

Each case is sent on a fresh connection in one write (the Expect case: its head, a 1 s pause,
then its body), and the reply is read until the proxy closes, or until it has been idle for a
moment. The recording origin behind meshcore keeps every byte it received per connection, and
answers each complete request `200 ok`. A case's outcome is then judged against its strict
answer (the doc's "hardened answer" column, with meshcore's documented choices where the doc
allows several): the statuses the client got, whether the connection closed, and what reached
the origin. Leaks are counted apart from the answer, for every case where the client got no answer
from the origin (a refusal, or no reply at all):

* whole leak: the origin received a complete request;
* partial leak: the origin received some bytes of it (typically a valid head whose chunked body
  meshcore then found malformed: a backend that ignores Transfer-Encoding answers that head).

`python tests/integration/hardening_corpus.py` runs every case against a freshly started proxy
and prints one line per case and the totals (deviations, whole and partial leaks).
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "ext"))
from h1parse_corpus import CORPUS  # noqa: E402  (the 80 rows, as the parser tests use them)

IDLE_S = 0.4            # once the replies wanted are in: how long to wait for a close
REPLY_DEADLINE_S = 8.0   # the most a case waits for the replies it wants (a loaded machine)
INCOMPLETE_WINDOW_S = 1.5  # the cases that must get no reply: watched this long (the doc's window)
UPSTREAM_SETTLE_S = 0.25  # after a refusal, what else reaches the origin


# ------------------------------------------------------------------------------------------------
# the recording origin


def _split_requests(data: bytes):
    """Complete requests in `data` as (head, body); a loose, independent HTTP/1.1 reader that
    frames by Content-Length or chunked, as a typical backend does."""
    out = []
    pos = 0
    while True:
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return out
        head = data[pos:end + 4]
        lines = head.split(b"\r\n")
        fields = {}
        for line in lines[1:]:
            k, sep, v = line.partition(b":")
            if sep:
                fields.setdefault(k.strip().lower(), []).append(v.strip())
        te = b",".join(fields.get(b"transfer-encoding", [])).lower()
        p = end + 4
        if b"chunked" in te:
            body = b""
            while True:
                le = data.find(b"\r\n", p)
                if le < 0:
                    return out
                try:
                    size = int(data[p:le].split(b";")[0], 16)
                except ValueError:
                    return out
                p = le + 2
                if size == 0:
                    tend = data.find(b"\r\n\r\n", p - 2)
                    if tend < 0:
                        return out
                    p = tend + 4
                    break
                if len(data) < p + size + 2:
                    return out
                body += data[p:p + size]
                p += size + 2
        else:
            try:
                n = int(fields.get(b"content-length", [b"0"])[0])
            except ValueError:
                return out
            if len(data) < p + n:
                return out
            body = data[p:p + n]
            p += n
        out.append((head, body))
        pos = p


class RecordingOrigin:
    """Records every byte per upstream connection; answers each complete request 200 `ok`."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.conns: list = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        conn = [bytearray(), 0]  # every byte received, and how much of it take() returned
        with self.lock:
            self.conns.append(conn)
        answered = 0
        try:
            while True:
                chunk = c.recv(65536)
                if not chunk:
                    return
                with self.lock:
                    conn[0] += chunk
                    done = len(_split_requests(bytes(conn[0])))
                while answered < done:
                    c.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                              b"content-length: 2\r\n\r\nok")
                    answered += 1
        except OSError:
            pass
        finally:
            c.close()

    def take(self) -> list[bytes]:
        """What each connection received since the last take (non-empty ones)."""
        with self.lock:
            got = [bytes(data[mark:]) for data, mark in self.conns if len(data) > mark]
            for conn in self.conns:
                conn[1] = len(conn[0])
        return got

    def close(self):
        self.sock.close()


# ------------------------------------------------------------------------------------------------
# the client side


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes


def parse_replies(data: bytes) -> list[Reply]:
    """Responses in `data` (interim ones included), as far as they are complete."""
    out = []
    pos = 0
    while True:
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return out
        lines = data[pos:end].split(b"\r\n")
        try:
            status = int(lines[0].split(b" ")[1])
        except (IndexError, ValueError):
            return out
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
        p = end + 4
        if status < 200 or status in (204, 304):
            body = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                le = data.find(b"\r\n", p)
                if le < 0:
                    return out
                size = int(data[p:le].split(b";")[0], 16)
                p = le + 2
                if size == 0:
                    p = data.find(b"\r\n\r\n", p - 2) + 4
                    break
                body += data[p:p + size]
                p += size + 2
        else:
            n = int(headers.get("content-length", "0"))
            if len(data) < p + n:
                return out
            body = data[p:p + n]
            p += n
        out.append(Reply(status, headers, body))
        pos = p


@dataclass
class Result:
    replies: list            # Reply, interim ones included
    closed: bool             # the proxy closed the connection within the window
    upstream: list           # bytes per upstream connection that received any
    requests: list = field(default_factory=list)  # complete (head, body) pairs upstream

    @property
    def finals(self):
        return [r for r in self.replies if r.status >= 200]

    @property
    def upstream_bytes(self) -> int:
        return sum(len(b) for b in self.upstream)


def send_case(port: int, origin: RecordingOrigin, data, want: int) -> Result:
    """Send one case; read until the proxy closes, or until `want` final replies are in and it
    has been idle IDLE_S (want 0: read for INCOMPLETE_WINDOW_S)."""
    origin.take()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    got = b""
    closed = False
    try:
        if isinstance(data, tuple):  # (head, pause, body): Expect: 100-continue
            head, pause, body = data
            s.sendall(head)
            got += _read_for(s, pause)
            s.sendall(body)
        else:
            s.sendall(data)
        start = time.monotonic()
        while True:
            now = time.monotonic()
            if want == 0:
                wait = start + INCOMPLETE_WINDOW_S - now
            elif sum(1 for r in parse_replies(got) if r.status >= 200) >= want:
                wait = IDLE_S
            else:
                wait = start + REPLY_DEADLINE_S - now
            if wait <= 0:
                break
            s.settimeout(wait)
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                if want and sum(1 for r in parse_replies(got) if r.status >= 200) < want \
                        and time.monotonic() < start + REPLY_DEADLINE_S:
                    continue
                break
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
            if not chunk:
                closed = True
                break
            got += chunk
    finally:
        s.close()
    finals = [r for r in parse_replies(got) if r.status >= 200]
    if not any(r.status == 200 and r.body == b"ok" for r in finals):
        time.sleep(UPSTREAM_SETTLE_S)  # no answer from the origin: let a leak arrive
    upstream = origin.take()
    requests = [r for b in upstream for r in _split_requests(b)]
    return Result(parse_replies(got), closed, upstream, requests)


def _read_for(s, seconds: float) -> bytes:
    deadline = time.monotonic() + seconds
    got = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return got
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            return got
        if not chunk:
            return got
        got += chunk


# ------------------------------------------------------------------------------------------------
# strict answers


@dataclass(frozen=True)
class Reject:
    """Refused: one final reply with one of `statuses`, the connection closed, and (counted as a
    leak, not here) nothing upstream."""
    statuses: tuple

    def judge(self, r: Result) -> list[str]:
        problems = []
        if [x.status for x in r.finals] not in [[s] for s in self.statuses]:
            problems.append(f"got {[x.status for x in r.replies]}, strict {list(self.statuses)}")
        if not r.closed:
            problems.append("connection left open after the refusal")
        return problems


@dataclass(frozen=True)
class Incomplete:
    """The message never completes: no final reply within the window; (a leak, counted apart)
    nothing complete upstream; a valid head may be streamed (the request is not refused, yet)."""

    def judge(self, r: Result) -> list[str]:
        if r.finals:
            return [f"got {[x.status for x in r.finals]}, strict: no reply yet"]
        return []


@dataclass(frozen=True)
class Accept:
    """Served: `n` requests reach the origin, each final reply is the origin's 200, in order.
    `check(requests) -> problem or None` inspects what the origin received."""
    n: int = 1
    check: object = None
    interim: tuple = ()  # interim statuses that must precede the final one (100 for Expect)
    close: bool = False

    def judge(self, r: Result) -> list[str]:
        problems = []
        if [x.status for x in r.finals] != [200] * self.n or any(x.body != b"ok" for x in r.finals):
            problems.append(f"got {[x.status for x in r.replies]}, strict {self.n} x 200 from "
                            "the origin")
        interim = tuple(x.status for x in r.replies if x.status < 200)
        if interim != self.interim:
            problems.append(f"interim replies {list(interim)}, strict {list(self.interim)}")
        if len(r.requests) != self.n:
            problems.append(f"the origin received {len(r.requests)} complete request(s), "
                            f"strict {self.n}")
        elif self.check is not None:
            problem = self.check(r.requests)
            if problem:
                problems.append(problem)
        if self.close and not r.closed:
            problems.append("connection left open, strict: close")
        return problems


@dataclass(frozen=True)
class OneOf:
    """The doc allows several answers (e.g. '400, or accept and re-frame')."""
    answers: tuple

    def judge(self, r: Result) -> list[str]:
        all_problems = []
        for a in self.answers:
            problems = a.judge(r)
            if not problems:
                return []
            all_problems.append(" & ".join(problems))
        return [" | ".join(all_problems)]


def _body(expected: bytes):
    def check(reqs):
        if reqs[0][1] != expected:
            return f"origin body {reqs[0][1]!r}, strict {expected!r}"
        return None
    return check


def _head_has(*needles: bytes, absent: tuple = ()):
    def check(reqs):
        head = reqs[0][0].lower()
        for n in needles:
            if n.lower() not in head:
                return f"origin head lacks {n!r}: {reqs[0][0]!r}"
        for n in absent:
            if n.lower() in head:
                return f"origin head has {n!r}: {reqs[0][0]!r}"
        return None
    return check


def _all(*checks):
    def check(reqs):
        for c in checks:
            problem = c(reqs)
            if problem:
                return problem
        return None
    return check


R400 = Reject((400,))
STRICT = {
    "clte-classic": R400, "tecl-classic": R400, "smuggler-clte-probe": R400, "te-http10": R400,
    "te-space-before-colon": R400, "te-leading-space-first-line": R400,
    "te-obsfold-continuation": R400, "te-lazygrep-chunk": Reject((400, 501)),
    "te-chunked-identity": R400, "te-identity-chunked": Reject((501,)),
    "te-dual-chunked": Reject((400, 501)), "te-comma-chunked": Reject((400, 501)),
    "te-unknown-no-cl": Reject((501,)),
    "te-uppercase": Accept(check=_body(b"hello")),
    "te-tab-suffix": Accept(check=_body(b"hello")),
    "te-nbsp-prefix": Reject((400, 501)), "te-accent-name": R400,
    "te-underscore-name": Accept(check=_body(b"0\r\n\r\n")),
    "te-bare-cr-before": R400, "te-bare-lf-before": R400,
    "te-connection-nominated": OneOf((
        Accept(check=_all(_body(b"hello"), _head_has(absent=(b"connection: transfer-encoding",)))),
        R400)),
    "cl-dup-conflict": R400,
    "cl-dup-same": OneOf((R400, Accept(check=_body(b"foo")))),
    "cl-plus": R400, "cl-hex": R400, "cl-empty": R400,
    "cl-leading-zero": Accept(check=_all(_body(b"0123456789"),
                                         _head_has(b"content-length: 10\r\n",
                                                   absent=(b"content-length: 010",)))),
    "cl-overflow": Reject((400, 413)), "cl-space-before-colon": R400, "cl-no-colon": R400,
    "cl-get-with-body": Accept(check=_all(_body(b"1234567890"),
                                          _head_has(b"content-length: 10\r\n"))),
    "cl-empty-then-real": R400,
    "chunk-0x-prefix": R400, "chunk-leading-space": R400, "chunk-trailing-space": R400,
    "chunk-ext-empty": R400, "chunk-ext-bare-cr": R400, "chunk-bare-lf": R400,
    "chunk-data-overrun": R400, "chunk-invalid-size": R400, "chunk-size-overflow": R400,
    "chunk-bad-trailer": R400,
    "chunk-trailer-lookalike": Accept(check=_body(b"")),
    "chunk-no-final": Incomplete(),
    "obs-fold": R400, "empty-name": R400, "nonascii-name": R400, "nul-in-value": R400,
    "ctl-in-value": R400, "bare-cr-in-value": R400,
    "obs-text-in-value": Accept(check=_head_has(b"user: \x85admin\xa0\r\n")),
    "no-colon-line": R400, "name-continued": R400, "bare-lf-lines": R400,
    "cr-then-junk-terminator": R400,
    "too-many-headers": Reject((431,)), "headers-too-large": Reject((431,)),
    "method-unknown-token": OneOf((Accept(check=_head_has(b"BAD / HTTP/1.1\r\n")),
                                   Reject((501,)))),
    "lf-in-request-line": R400, "version-1.32": Reject((400, 505)),
    "version-2.0": Reject((505,)), "http09": Reject((400, 505)),
    "request-line-trailing-space": R400, "multi-sp-request-line": R400,
    "target-asterisk-get": R400,
    "target-absolute-form": Accept(check=_head_has(b"GET /p HTTP/1.1\r\n",
                                                   b"host: other.example\r\n")),
    "uri-too-long": Reject((414,)),
    "host-missing-11": R400, "host-duplicate": R400, "host-invalid-char": R400,
    "host-nul": R400, "host-comma": R400,
    # Istio's Envoy refuses every HTTP/1.0 request (426); serving it and closing is allowed too
    "http10-keepalive": OneOf((Reject((426,)), Accept(close=True))),
    "pipelined-2": Accept(n=2, check=lambda reqs: None if [h.split(b" ")[1] for h, _ in reqs]
                          == [b"/1", b"/2"] else f"origin order {[h[:8] for h, _ in reqs]}"),
    "expect-100": Accept(check=_body(b"hello"), interim=(100,)),
    # Istio's sidecars allow websocket upgrades: forwarded with its Upgrade and Connection (a
    # non-101 answer is then relayed as a plain response); never silently stripped
    "upgrade-websocket": OneOf((Accept(check=_head_has(b"upgrade: websocket\r\n",
                                                       b"connection: upgrade\r\n")),
                                Reject((403, 426)))),
    "connect": Reject((403, 404, 405)),
    "connection-many-tokens": OneOf((Accept(check=_head_has(absent=(b"\r\nconnection:",))),
                                     R400)),
    "connection-nominates-cl": Accept(check=_all(_body(b"hello"),
                                                 _head_has(absent=(b"connection: content-length",)))),
    "cl-undersend": Incomplete(),
}
assert len(STRICT) == len(CORPUS) == 80 and set(STRICT) == {c[0] for c in CORPUS}

EXPECT_PAUSE_S = 1.0


def wanted(strict) -> int:
    """How many final replies the strict answer means (the most of its alternatives)."""
    if isinstance(strict, OneOf):
        return max(wanted(a) for a in strict.answers)
    if isinstance(strict, Accept):
        return strict.n
    return 0 if isinstance(strict, Incomplete) else 1


def case_bytes(case_id: str, data: bytes):
    if case_id == "expect-100":  # the doc: head, a 1.0 s pause, then the body
        head, _, body = data.partition(b"\r\n\r\n")
        return (head + b"\r\n\r\n", EXPECT_PAUSE_S, body)
    return data


@dataclass
class CaseReport:
    case_id: str
    result: Result
    problems: list           # deviations of the answer (what the client got, what was forwarded)
    whole_leak: bool
    partial_leak: bool
    fresh_request_after: bool = True  # a valid request on a new connection was served after it

    @property
    def clean(self) -> bool:
        return not (self.problems or self.whole_leak or self.partial_leak)


def run_case(port: int, origin: RecordingOrigin, case_id: str, data: bytes) -> CaseReport:
    strict = STRICT[case_id]
    r = send_case(port, origin, case_bytes(case_id, data), wanted(strict))
    problems = strict.judge(r)
    whole = partial = False
    if not any(x.status == 200 and x.body == b"ok" for x in r.finals):
        # the client got no answer from the origin (a refusal, or nothing yet): a complete
        # request upstream is a whole leak; any byte upstream a partial one, except the valid
        # head of a request that is not refused but never completes (streamed, as every proxy)
        whole = bool(r.requests)
        partial = not whole and bool(r.upstream_bytes) and not isinstance(strict, Incomplete)
    return CaseReport(case_id, r, problems, whole, partial)


def fresh_request_ok(port: int) -> bool:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(b"GET /fresh HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    finally:
        s.close()
    return got.startswith(b"HTTP/1.1 200 ")


def mesh_yaml(origin_port: int) -> str:
    """`a` and `other.example` (the absolute-form case) both route to the recording origin."""
    return f"""
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: corpus}}
spec:
  hosts: [a, b, other.example]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {origin_port}}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: corpus}}
spec:
  hosts: [a, b, other.example]
  http:
  - route: [{{destination: {{host: a}}}}]
    retries: {{attempts: 0}}
"""


def run_all(port: int, origin: RecordingOrigin) -> list[CaseReport]:
    """Every case, each right after a valid request on another client connection: that request
    leaves a warm pooled upstream connection (the worst case for a partial leak: a head can be
    written at once) and shows the proxy still serves after the case before."""
    reports = []
    for cid, data, _ in CORPUS:
        ok = fresh_request_ok(port)
        if reports:
            reports[-1].fresh_request_after = ok
        reports.append(run_case(port, origin, cid, data))
    reports[-1].fresh_request_after = fresh_request_ok(port)
    return reports


def summary(reports) -> dict:
    return {"cases": len(reports),
            "deviations": sum(1 for r in reports if r.problems),  # of the answer
            "whole_leaks": sum(1 for r in reports if r.whole_leak),
            "partial_leaks": sum(1 for r in reports if r.partial_leak),
            "unserved_after": sum(1 for r in reports if not r.fresh_request_after)}


def main() -> int:
    import tempfile
    sys.path.insert(0, HERE)
    from harness import Proxy, write_config
    origin = RecordingOrigin()
    with tempfile.TemporaryDirectory() as d:
        px = Proxy([write_config(d, mesh_yaml(origin.port))], workers=1,
                   extra=["--no-access-log"])
        try:
            reports = run_all(px.port, origin)
        finally:
            px.stop()
    for i, r in enumerate(reports, 1):
        leak = ("WHOLE-LEAK" if r.whole_leak else
                f"partial-leak({r.result.upstream_bytes} B)" if r.partial_leak else "")
        got = ",".join(str(x.status) for x in r.result.replies) or "none"
        print(f"{i:2d} {r.case_id:28s} {got:9s} {'close' if r.result.closed else 'open ':5s} "
              f"up={r.result.upstream_bytes:<5d} {leak:12s} {'; '.join(r.problems)}"
              + ("" if r.fresh_request_after else " [the next valid request was NOT served]"))
    totals = summary(reports)
    print(" ".join(f"{k}={v}" for k, v in totals.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
