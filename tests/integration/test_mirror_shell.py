"""The mirror shell (meshcore.io.mirror.Mirror) inside trio against real loopback servers:
fire-and-forget, slow/dead/silent mirror hosts, overflow drops, responses read and discarded,
keep-alive reuse, the capture sink target."""
from __future__ import annotations

import inspect
import socket

import orjson
import trio

from meshcore.io.mirror import Mirror, MirrorTarget
from meshcore.policy.mirror import CaptureSettings, MirrorPolicy
from meshcore.proto.wire import BODY_CHUNKED, DATA, DONE, ChunkedReader, parse_request, request_body_kind

POLICY = MirrorPolicy(host="sniffer")
HEAD = (b"POST /orders?id=7 HTTP/1.1\r\nhost: retry-service:8080\r\nuser-agent: t\r\n"
        b"x-request-id: 42\r\nx-forwarded-proto: http\r\ncontent-length: 5\r\n"
        b"x-envoy-attempt-count: 1\r\n\r\n")
BODY = [b"hel", b"lo"]


class Recorder:
    """A loopback HTTP/1.1 server that records each request and answers per `mode`."""

    def __init__(self, mode="length", delay=0.0):
        self.mode = mode
        self.delay = delay
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0
        self.port = 0
        self.got = trio.Event()

    async def start(self, nursery):
        listeners = await nursery.start(trio.serve_tcp, self.handle, 0, )
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def handle(self, stream):
        self.connections += 1
        served = 0
        buf = b""
        try:
            while True:
                head = parse_request(buf, 0) if buf else None
                while head is None:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    buf += chunk
                    head = parse_request(buf, 0)
                kind, length = request_body_kind(head)
                pos = head.end
                if kind == BODY_CHUNKED:
                    reader, body = ChunkedReader(), b""
                    while True:
                        step, a, b = reader.step(buf, pos, len(buf))
                        if step == DATA:
                            body += buf[a:b]
                            pos = b
                        elif step == DONE:
                            pos = a
                            break
                        else:
                            buf, pos = buf[a:] + await stream.receive_some(65536), 0
                else:
                    while len(buf) - pos < length:
                        buf += await stream.receive_some(65536)
                    body, pos = buf[pos:pos + length], pos + length
                self.requests.append((buf[:head.end], body))
                buf = buf[pos:]
                self.got.set()
                self.got = trio.Event()
                if self.delay:
                    await trio.sleep(self.delay)
                if self.mode == "silent":
                    await trio.sleep_forever()
                served += 1
                if self.mode == "drop-second" and served == 2:
                    return  # a keep-alive connection the server gives up on: no answer
                if self.mode in ("length", "drop-second"):
                    await stream.send_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 7\r\n\r\nignored")
                elif self.mode == "chunked":
                    await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                                          b"4\r\nabcd\r\n")
                    await trio.sleep(0.01)
                    await stream.send_all(b"3\r\nefg\r\n0\r\n\r\n")
                elif self.mode == "eof":
                    await stream.send_all(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
                    return
                elif self.mode == "close-after":  # keep-alive response, then the server closes
                    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    return
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()


def dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return port


async def wait_for(cond, timeout=5.0):
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.005)


def run(main):
    trio.run(main)


def test_copy_arrives_with_shadow_host_and_response_is_discarded():
    results = []

    async def main():
        async with trio.open_nursery() as nursery:
            rec = await Recorder("length").start(nursery)
            mirror = Mirror(on_result=lambda tag, status: results.append((tag, status)))
            nursery.start_soon(mirror.run)
            target = MirrorTarget("127.0.0.1", rec.port, 1.0)
            assert mirror.submit(POLICY, HEAD, BODY, target, tag="t1")
            await wait_for(lambda: mirror.completed == 1)
            assert mirror.submit(POLICY, HEAD, BODY, target, tag="t2")
            await wait_for(lambda: mirror.completed == 2)
            assert rec.connections == 1  # the second copy reused the kept-alive connection
            assert (mirror.failed, mirror.dropped, mirror.in_flight) == (0, 0, 0)
            nursery.cancel_scope.cancel()
        head, body = rec.requests[0]
        assert head == (b"POST /orders?id=7 HTTP/1.1\r\nhost: retry-service-shadow:8080\r\n"
                        b"user-agent: t\r\nx-request-id: 42\r\nx-forwarded-proto: http\r\n"
                        b"content-length: 5\r\nx-envoy-attempt-count: 1\r\n"
                        b"x-envoy-internal: true\r\n\r\n")
        assert body == b"hello"

    run(main)
    assert results == [("t1", 503), ("t2", 503)]


def test_no_suffix_policy_keeps_the_host_and_chunked_body_is_copied():
    async def main():
        async with trio.open_nursery() as nursery:
            rec = await Recorder("chunked").start(nursery)
            mirror = Mirror()
            nursery.start_soon(mirror.run)
            head = (b"PUT /c HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n"
                    b"x-envoy-attempt-count: 1\r\n\r\n")
            pieces = [b"3\r\nabc\r\n", b"2\r\nde\r\n0\r\n\r\n"]
            policy = MirrorPolicy(host="sniffer", shadow_suffix=False)
            for _ in range(2):
                mirror.submit(policy, head, pieces, ("127.0.0.1", rec.port))
            await wait_for(lambda: mirror.completed == 2)
            assert rec.connections <= 2 and mirror.failed == 0
            nursery.cancel_scope.cancel()
        assert rec.requests[0][0].startswith(b"PUT /c HTTP/1.1\r\nhost: svc\r\n")
        assert rec.requests[0][1] == b"abcde"

    run(main)


def test_slow_mirror_host_does_not_delay_submit_or_the_primary():
    async def main():
        async with trio.open_nursery() as nursery:
            slow = await Recorder("length", delay=2.0).start(nursery)
            fast = await Recorder("length").start(nursery)
            mirror = Mirror()
            nursery.start_soon(mirror.run)
            assert not inspect.iscoroutinefunction(mirror.submit)  # never awaited by the caller
            for _ in range(10):
                assert mirror.submit(POLICY, HEAD, BODY, ("127.0.0.1", slow.port, 1.0))
            assert mirror.in_flight == 10  # queued at once, nothing sent yet
            await wait_for(lambda: len(slow.requests) == 10)
            # a "primary" exchange completes while all 10 copies still wait on the slow host
            stream = await trio.open_tcp_stream("127.0.0.1", fast.port)
            await stream.send_all(HEAD + b"hello")
            reply = await stream.receive_some(65536)
            await stream.aclose()
            assert reply.startswith(b"HTTP/1.1 503")
            assert mirror.in_flight == 10 and mirror.completed == 0
            assert mirror.completed == 0 and mirror.in_flight == 10
            await wait_for(lambda: mirror.completed == 10, timeout=6.0)
            nursery.cancel_scope.cancel()

    run(main)


def test_dead_mirror_host_changes_nothing_for_the_caller():
    results = []

    async def main():
        async with trio.open_nursery() as nursery:
            mirror = Mirror(on_result=lambda tag, status: results.append(status))
            nursery.start_soon(mirror.run)
            port = dead_port()
            for _ in range(3):
                assert mirror.submit(POLICY, HEAD, BODY, MirrorTarget("127.0.0.1", port, 1.0))
            await wait_for(lambda: mirror.failed == 3)
            assert mirror.in_flight == 0 and mirror.completed == 0
            nursery.cancel_scope.cancel()

    run(main)  # no exception escaped the Mirror
    assert results == [0, 0, 0]


def test_overflow_drops_are_counted_and_silent_hosts_time_out():
    async def main():
        async with trio.open_nursery() as nursery:
            silent = await Recorder("silent").start(nursery)
            mirror = Mirror(max_concurrent=2, timeout=0.3)
            nursery.start_soon(mirror.run)
            accepted = [mirror.submit(POLICY, HEAD, BODY, ("127.0.0.1", silent.port))
                        for _ in range(5)]
            assert accepted == [True, True, False, False, False]
            assert mirror.dropped == 3 and mirror.in_flight == 2
            await wait_for(lambda: mirror.timeouts == 2)
            assert mirror.in_flight == 0
            assert mirror.submit(POLICY, HEAD, BODY, ("127.0.0.1", silent.port))  # room again
            nursery.cancel_scope.cancel()

    run(main)


def test_eof_delimited_response_is_read_and_connection_not_reused():
    async def main():
        async with trio.open_nursery() as nursery:
            rec = await Recorder("eof").start(nursery)
            mirror = Mirror()
            nursery.start_soon(mirror.run)
            for _ in range(2):
                mirror.submit(POLICY, HEAD, BODY, ("127.0.0.1", rec.port))
                n = mirror.completed
                await wait_for(lambda: mirror.completed == n + 1)
            assert rec.connections == 2 and mirror.failed == 0
            nursery.cancel_scope.cancel()

    run(main)


def test_stale_pooled_connection_is_retried_on_a_fresh_one():
    async def main():
        async with trio.open_nursery() as nursery:
            rec = await Recorder("close-after").start(nursery)
            mirror = Mirror()
            nursery.start_soon(mirror.run)
            mirror.submit(POLICY, HEAD, BODY, ("127.0.0.1", rec.port))
            await wait_for(lambda: mirror.completed == 1)
            await trio.sleep(0.05)  # the server closed the pooled connection meanwhile
            mirror.submit(POLICY, HEAD, BODY, ("127.0.0.1", rec.port))
            await wait_for(lambda: mirror.completed == 2)
            assert mirror.failed == 0 and len(rec.requests) == 2
            nursery.cancel_scope.cancel()

    run(main)


def test_body_not_kept_is_skipped_and_head_only_request_is_sent():
    async def main():
        async with trio.open_nursery() as nursery:
            rec = await Recorder("length").start(nursery)
            mirror = Mirror()
            nursery.start_soon(mirror.run)
            assert not mirror.submit(POLICY, HEAD, None, ("127.0.0.1", rec.port))
            assert mirror.skipped == 1
            get = b"GET / HTTP/1.1\r\nhost: a\r\n"  # the header block without its empty line
            assert mirror.submit(POLICY, get, None, ("127.0.0.1", rec.port))
            await wait_for(lambda: mirror.completed == 1)
            nursery.cancel_scope.cancel()
        assert rec.requests == [(b"GET / HTTP/1.1\r\nhost: a-shadow\r\n"
                                 b"x-envoy-internal: true\r\n\r\n", b"")]

    run(main)


def test_capture_target_writes_a_line_without_network(tmp_path):
    path = str(tmp_path / "cap.jsonl")
    policy = MirrorPolicy(host="capture.meshcore.local", capture=CaptureSettings(path=path))

    async def main():
        async with trio.open_nursery() as nursery:
            mirror = Mirror()
            nursery.start_soon(mirror.run)
            await trio.sleep(0)
            assert mirror.submit(policy, HEAD, BODY, None)
            assert mirror.captured == 1 and mirror.in_flight == 0
            await wait_for(lambda: mirror.sinks and next(iter(mirror.sinks.values())).lines == 1)
            with open(path, "rb") as f:  # written by the sink's flusher, run in this nursery
                assert len(f.read().splitlines()) == 1
            nursery.cancel_scope.cancel()

    run(main)
    with open(path, "rb") as f:
        rec = orjson.loads(f.readline())
    assert rec["method"] == "POST" and rec["body"] == "hello"
    assert ["host", "retry-service-shadow:8080"] in rec["headers"]
    assert rec["headers"][-1] == ["x-envoy-internal", "true"]


def test_reused_connection_closed_without_answer_is_retried_once():
    async def main():
        async with trio.open_nursery() as nursery:
            rec = await Recorder("drop-second").start(nursery)
            mirror = Mirror()
            nursery.start_soon(mirror.run)
            mirror.submit(POLICY, HEAD, BODY, ("127.0.0.1", rec.port))
            await wait_for(lambda: mirror.completed == 1)
            mirror.submit(POLICY, HEAD, BODY, ("127.0.0.1", rec.port))  # pooled: passes the peek
            await wait_for(lambda: mirror.completed == 2)
            assert mirror.failed == 0 and rec.connections == 2 and len(rec.requests) == 3
            nursery.cancel_scope.cancel()

    run(main)
