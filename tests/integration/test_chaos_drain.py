"""Drain as Envoy drains, under load (issue 9 item 3): keep-alive clients keep sending while the
proxy drains (SIGTERM). Every request a client sent gets an answer (none meets an EOF or a
reset), and every response finished while draining says `Connection: close`, so each client
stops on its own after its last answer. Before the loop's drain work, 32 of 32 connections got
an EOF after they had sent their next request.
"""
import signal
import socket
import threading
import time

from chaos import _read_response, cluster  # noqa: F401 (cluster: the shared fixture)

CLIENTS = 16


def keep_alive_client(port, i, results, stop_at):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    buf = b""
    n = 0
    try:
        while time.monotonic() < stop_at:
            nonce = f"c{i}-{n}"
            n += 1
            sock.sendall(f"GET /get?ms=50 HTTP/1.1\r\nHost: chaos-service\r\nx-nonce: {nonce}"
                         "\r\n\r\n".encode())
            try:
                status, headers, body, buf, truncated = _read_response(sock, buf)
            except (OSError, EOFError) as exc:
                results.append((i, nonce, "no answer", type(exc).__name__))
                return
            close = "close" in headers.get("connection", "").lower()
            results.append((i, nonce, status, body == nonce.encode() and not truncated, close))
            if close:
                return
        results.append((i, None, "never told to close", None))
    finally:
        sock.close()


def test_keep_alive_clients_during_a_drain_lose_nothing(cluster):
    pods, px = cluster
    results = []
    stop_at = time.monotonic() + 8.0
    threads = [threading.Thread(target=keep_alive_client, args=(px.port, i, results, stop_at))
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(0.6)
    px.signal(signal.SIGTERM)
    for t in threads:
        t.join(15)
    lost = [r for r in results if r[2] == "no answer"]
    assert lost == [], f"{len(lost)} of {CLIENTS} connections: a request sent got no answer"
    assert all(r[2] == 200 and r[3] for r in results), [r for r in results if r[2] != 200][:5]
    last = {}
    for r in results:
        last[r[0]] = r
    assert all(r[4] for r in last.values()), "a client was never told Connection: close"
    assert px.proc.wait(10) == 0
