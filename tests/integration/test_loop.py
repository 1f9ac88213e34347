"""The C event loop (meshcore._ext.loop) in one process under trio, with a stub policy, against
real loopback servers: mirror copies (fire and forget, breakers, timeouts, pooled connections),
an exception in the policy costing one request, early responses, upstream 1xx, and the bounded
batches that keep trio's other tasks running."""
from __future__ import annotations

import socket
import types

import pytest
import trio

from meshcore import local_reply as lr
from meshcore._ext.loop import RELAY, REPLY, ClusterHandle, Loop, RouteHandle
from meshcore.io.dataplane import Dataplane
from meshcore.proto.wire import BODY_CHUNKED, DATA, DONE, ChunkedReader, parse_request, request_body_kind
from meshcore.shm.layout import W_INDEX, Layout
from meshcore.shm.segment import Segment

HEAD = (b"POST /orders?id=7 HTTP/1.1\r\nhost: retry-service-shadow:8080\r\nuser-agent: t\r\n"
        b"x-request-id: 42\r\nx-forwarded-proto: http\r\ncontent-length: 5\r\n"
        b"x-envoy-internal: true\r\n")


@pytest.fixture
def segment():
    seg = Segment.create(Layout(max_hosts=16, max_clusters=4, workers=1))
    yield seg
    seg.close()
    seg.unlink()


class Policy:
    """Route every request to endpoint 0 of `cluster`; record what the loop reports."""

    def __init__(self):
        self.route = RouteHandle("r")
        self.cluster = None
        self.outcomes = []
        self.fail_decide = False

    def decide(self, stream):
        if self.fail_decide:
            raise RuntimeError("a bug in the policy")
        stream.forward(self.route, self.cluster, 0)

    def on_outcome(self, stream, kind, status):
        self.outcomes.append((kind, status))
        if kind == 0:
            return RELAY
        stream.reply(lr.CONNECT_FAILURE)
        return REPLY

    def finished(self, stream):
        pass

    def shadow_failed(self, stream, kind):
        Dataplane.shadow_failed(self, stream, kind)

    def mirror(self, stream):
        pass


def make_loop(segment, port, policy=None, limits=None, **kw):
    policy = policy or Policy()
    loop = Loop(policy, log_mode=0, max_events=kw.pop("max_events", 64))
    loop.attach_shm(segment.buf)
    layout = segment.layout
    policy.cluster = ClusterHandle(
        loop, "outbound|80||svc", [("127.0.0.1", port, f"127.0.0.1:{port}")],
        stats_off=layout.worker_row_off(0, 0), cluster_off=layout.cluster_off(0),
        host_offs=[layout.host_off(0)], limits=limits or (0xFFFFFFFF,) * 3, **kw)
    policy.cluster.state = types.SimpleNamespace(stats=segment.worker_stats(0, 0))
    return loop, policy


def stat(segment, name):
    return segment.worker_stats(0, 0).get(W_INDEX[name])


async def drive(loop):
    fd = loop.fileno()
    while True:
        loop.run_once()
        await trio.lowlevel.wait_readable(fd)


async def wait_for(cond, timeout=5.0):
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.005)


class Recorder:
    """A loopback HTTP/1.1 server that records each request and answers per `mode`."""

    def __init__(self, mode="length", delay=0.0):
        self.mode = mode
        self.delay = delay
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0
        self.port = 0

    async def start(self, nursery):
        listeners = await nursery.start(trio.serve_tcp, self.handle, 0)
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
                if self.delay:
                    await trio.sleep(self.delay)
                if self.mode == "silent":
                    await trio.sleep_forever()
                served += 1
                if self.mode == "drop-second" and served == 2:
                    return  # a keep-alive connection the server gives up on: no answer
                if self.mode in ("length", "drop-second"):
                    await stream.send_all(b"HTTP/1.1 503 Service Unavailable\r\n"
                                          b"content-length: 7\r\n\r\nignored")
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
                elif self.mode == "continue":  # a 100 before the final response
                    await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n"
                                          b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
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


def run_with(segment, mode, body_fn, **kw):
    """Start a Recorder in `mode`, a loop pointed at it, drive the loop, run body_fn."""
    async def main():
        async with trio.open_nursery() as nursery:
            rec = await Recorder(mode, kw.pop("delay", 0.0)).start(nursery)
            loop, policy = make_loop(segment, kw.pop("port", None) or rec.port, **kw)
            nursery.start_soon(drive, loop)
            await body_fn(loop, policy, rec)
            nursery.cancel_scope.cancel()
        policy.cluster.close_idle()
        loop.close()
    trio.run(main)


# === mirror copies ===

def test_copy_arrives_as_given_and_the_response_is_discarded(segment):
    async def body(loop, policy, rec):
        loop.shadow(policy.cluster, 0, HEAD, b"hello", 5.0)
        await wait_for(lambda: loop.shadows_in_flight == 0 and len(rec.requests) == 1)
        loop.shadow(policy.cluster, 0, HEAD, b"hello", 5.0)
        await wait_for(lambda: loop.shadows_in_flight == 0 and len(rec.requests) == 2)
        assert rec.connections == 1  # the second copy reused the kept-alive connection
    run_with(segment, "length", body)
    assert stat(segment, "upstream_rq_total") == 2
    assert stat(segment, "upstream_rq_5xx") == 2
    assert stat(segment, "upstream_cx_total") == 1


def test_copy_head_and_chunked_body(segment):
    async def body(loop, policy, rec):
        head = b"PUT /c HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n"
        loop.shadow(policy.cluster, 0, head, b"abcde", 5.0, True)
        await wait_for(lambda: loop.shadows_in_flight == 0 and len(rec.requests) == 1)
    run_with(segment, "chunked", body)
    # (the Recorder stores heads as received: the loop adds the attempt count and the end)


def test_recorded_copy_bytes(segment):
    seen = []

    async def body(loop, policy, rec):
        loop.shadow(policy.cluster, 0, HEAD, b"hello", 5.0)
        await wait_for(lambda: len(rec.requests) == 1)
        seen.extend(rec.requests)
    run_with(segment, "length", body)
    head, data = seen[0]
    assert head == HEAD + b"x-envoy-attempt-count: 1\r\n\r\n"
    assert data == b"hello"


def test_dead_mirror_host_counts_a_failure_and_nothing_escapes(segment):
    async def body(loop, policy, rec):
        for _ in range(3):
            loop.shadow(policy.cluster, 0, HEAD, b"hello", 5.0)
        await wait_for(lambda: loop.shadows_in_flight == 0)
    run_with(segment, "length", body, port=dead_port())
    assert stat(segment, "upstream_cx_connect_fail") == 3  # the classifier's table
    assert stat(segment, "upstream_rq_rx_reset") == 0
    assert stat(segment, "upstream_rq_total") == 0


def test_silent_mirror_host_times_out(segment):
    async def body(loop, policy, rec):
        loop.shadow(policy.cluster, 0, HEAD, b"hello", 0.2)
        await wait_for(lambda: len(rec.requests) == 1)
        assert loop.shadows_in_flight == 1
        await wait_for(lambda: loop.shadows_in_flight == 0)
    run_with(segment, "silent", body)
    assert stat(segment, "upstream_rq_timeout") == 1


def test_copies_obey_the_mirror_clusters_breakers(segment):
    async def body(loop, policy, rec):
        for _ in range(4):
            loop.shadow(policy.cluster, 0, HEAD, b"hello", 0.3)
        await wait_for(lambda: len(rec.requests) == 1)
        await wait_for(lambda: loop.shadows_in_flight == 0)
    # maxConnections 1, no pending requests allowed: one copy goes, three overflow
    run_with(segment, "silent", body, limits=(1, 0xFFFFFFFF, 0xFFFFFFFF))
    assert stat(segment, "upstream_cx_overflow") == 3


def test_eof_delimited_response_is_read_and_not_reused(segment):
    async def body(loop, policy, rec):
        for n in (1, 2):
            loop.shadow(policy.cluster, 0, HEAD, b"hello", 5.0)
            await wait_for(lambda: loop.shadows_in_flight == 0 and len(rec.requests) == n)
        assert rec.connections == 2
    run_with(segment, "eof", body)
    assert stat(segment, "upstream_rq_2xx") == 2


def test_stale_pooled_connection_is_dropped_before_reuse(segment):
    async def body(loop, policy, rec):
        loop.shadow(policy.cluster, 0, HEAD, b"hello", 5.0)
        await wait_for(lambda: loop.shadows_in_flight == 0 and len(rec.requests) == 1)
        await trio.sleep(0.05)  # the server closed the pooled connection meanwhile
        loop.shadow(policy.cluster, 0, HEAD, b"hello", 5.0)
        await wait_for(lambda: loop.shadows_in_flight == 0 and len(rec.requests) == 2)
    run_with(segment, "close-after", body)
    assert stat(segment, "upstream_rq_2xx") == 2
    assert stat(segment, "upstream_rq_rx_reset") == 0


def test_reused_connection_closed_without_answer_is_retried_once(segment):
    async def body(loop, policy, rec):
        loop.shadow(policy.cluster, 0, HEAD, b"hello", 5.0)
        await wait_for(lambda: loop.shadows_in_flight == 0 and len(rec.requests) == 1)
        loop.shadow(policy.cluster, 0, HEAD, b"hello", 5.0)  # pooled: the server drops it
        await wait_for(lambda: loop.shadows_in_flight == 0 and len(rec.requests) == 3)
        assert rec.connections == 2
    run_with(segment, "drop-second", body)
    assert stat(segment, "upstream_rq_5xx") == 2
    assert stat(segment, "upstream_rq_rx_reset") == 0


def test_head_only_copy(segment):
    async def body(loop, policy, rec):
        loop.shadow(policy.cluster, 0, b"GET / HTTP/1.1\r\nhost: a-shadow\r\n", b"", 5.0)
        await wait_for(lambda: loop.shadows_in_flight == 0 and len(rec.requests) == 1)
        assert rec.requests == [(b"GET / HTTP/1.1\r\nhost: a-shadow\r\n"
                                 b"x-envoy-attempt-count: 1\r\n\r\n", b"")]
    run_with(segment, "length", body)


# === requests through the loop ===

async def client_exchange(port, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(data)
    out = b""
    with trio.move_on_after(3):
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            out += chunk
    await stream.aclose()
    return out


def serving(loop):
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(64)
    lst.setblocking(False)
    loop.add_listener(lst)
    port = lst.getsockname()[1]
    lst.close()
    return port


def test_an_exception_in_the_policy_costs_one_request(segment, capsys):
    async def body(loop, policy, rec):
        port = serving(loop)
        req = b"GET /x HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n"
        policy.fail_decide = True
        bad = await client_exchange(port, req)
        policy.fail_decide = False
        good = await client_exchange(port, req)
        assert bad.startswith(b"HTTP/1.1 500 ") and b"connection: close" in bad
        assert good.startswith(b"HTTP/1.1 503 ")  # the Recorder's answer, relayed
    run_with(segment, "length", body)
    assert "a bug in the policy" in capsys.readouterr().err


def test_upstream_100_continue_is_not_taken_for_the_response(segment):
    async def body(loop, policy, rec):
        port = serving(loop)
        out = await client_exchange(
            port, b"POST /x HTTP/1.1\r\nhost: svc\r\ncontent-length: 2\r\nconnection: close\r\n"
                  b"\r\nhi")
        assert out.count(b"HTTP/1.1 ") == 1 and out.startswith(b"HTTP/1.1 200 OK\r\n")
        assert out.endswith(b"\r\n\r\nok")
    run_with(segment, "continue", body)


def test_batches_are_bounded(segment):
    """run_once handles at most max_events ready sockets, so trio's other tasks get a turn."""
    async def main():
        async with trio.open_nursery() as nursery:
            rec = await Recorder("length").start(nursery)
            loop, policy = make_loop(segment, rec.port, max_events=4)
            port = serving(loop)  # not driven: this test calls run_once itself
            socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
            for s in socks:
                s.sendall(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n")
            await trio.sleep(0.1)
            handled = []
            for _ in range(200):
                handled.append(loop.run_once())
                await trio.sleep(0.005)  # the Recorder answers in between
                if len(rec.requests) == 20 and not loop.run_once():
                    break
            assert max(handled) == 4  # bounded, and the bound was reached
            assert len(rec.requests) == 20
            for s in socks:
                s.close()
            nursery.cancel_scope.cancel()
        policy.cluster.close_idle()
        loop.close()
    trio.run(main)
