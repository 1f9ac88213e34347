"""Capture sink (meshcore.capture): record format, truncation, rotation, several writer processes."""
from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap

import orjson
import trio

from meshcore.capture import CaptureSink, capture_record, read_records, rotated_files

HEAD = b"POST /orders?id=1 HTTP/1.1\r\nhost: orders-shadow:8080\r\nx-b: 1\r\nx-a: 2\r\n"


def rec(head, pieces, limit=1024):
    return orjson.loads(capture_record(head, pieces, limit, 1234.5))


def lines_of(paths):
    out = []
    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        assert data == b"" or data.endswith(b"\n")
        out.extend(data.splitlines())
    return out


def test_record_text_body_and_header_order():
    r = rec(HEAD + b"content-length: 5\r\n\r\n", [b"hel", b"lo"])
    assert r == {"time": 1234.5, "method": "POST", "target": "/orders?id=1",
                 "headers": [["host", "orders-shadow:8080"], ["x-b", "1"], ["x-a", "2"],
                             ["content-length", "5"]],
                 "body": "hello", "body_encoding": "utf8", "body_truncated": False, "body_size": 5}


def test_record_binary_body_is_base64():
    body = bytes(range(256))
    r = rec(HEAD + b"content-length: 256\r\n\r\n", [body])
    assert r["body_encoding"] == "base64" and base64.b64decode(r["body"]) == body
    assert r["body_size"] == 256 and not r["body_truncated"]


def test_record_truncation():
    r = rec(HEAD + b"content-length: 10\r\n\r\n", [b"0123456789"], limit=4)
    assert (r["body"], r["body_truncated"], r["body_size"]) == ("0123", True, 10)


def test_record_chunked_body_is_decoded():
    r = rec(HEAD + b"transfer-encoding: chunked\r\n\r\n", [b"3\r\nabc\r\n", b"2\r\nde\r\n0\r\n\r\n"])
    assert (r["body"], r["body_size"], r["body_truncated"]) == ("abcde", 5, False)


def test_record_body_not_kept():
    r = rec(HEAD + b"content-length: 5000000\r\n\r\n", None)
    assert (r["body"], r["body_size"], r["body_truncated"]) == ("", 5000000, True)
    r = rec(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n", None)
    assert (r["body"], r["body_size"], r["body_truncated"]) == ("", -1, False)


def test_record_non_ascii_header_bytes_round_trip():
    r = rec(b"GET /\xc3\xa9 HTTP/1.1\r\nhost: h\r\nx-v: caf\xe9\r\n\r\n", [])
    assert r["target"].encode("latin-1") == b"/\xc3\xa9"
    assert r["headers"][1][1].encode("latin-1") == b"caf\xe9"


def test_sink_rotation_keeps_whole_lines(tmp_path):
    path = str(tmp_path / "cap.jsonl")
    sink = CaptureSink(path, max_bytes=2000, body_limit=100, keep=3)
    for i in range(60):
        sink.add(HEAD + b"content-length: 3\r\n\r\n", [b"%03d" % i])
        if i % 7 == 0:
            sink.flush()
    sink.close()
    files = rotated_files(path)
    assert files == [path + ".3", path + ".2", path + ".1", path]
    assert sink.rotations > 3
    for p in files:
        assert 0 < os.path.getsize(p) <= 2000
    bodies = [orjson.loads(line)["body"] for line in lines_of(files)]
    # the oldest files were rotated away; what is kept is the newest lines, in order
    assert bodies == ["%03d" % i for i in range(60 - len(bodies), 60)]
    assert sink.lines == 60 and sink.dropped == 0


def test_sink_keep_zero_discards_old_lines(tmp_path):
    path = str(tmp_path / "cap.jsonl")
    sink = CaptureSink(path, max_bytes=500, keep=0)
    for i in range(20):
        sink.add(HEAD + b"\r\n")
        sink.flush()
    sink.close()
    assert rotated_files(path) == [path] and os.path.getsize(path) <= 500


def test_sink_pending_limit_drops_and_counts(tmp_path):
    sink = CaptureSink(str(tmp_path / "c"), max_pending=300)
    assert sink.add(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n", [b"x" * 200])
    assert not sink.add(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n", [b"x" * 200])
    assert sink.dropped == 1
    sink.close()
    assert sink.lines == 1


def test_sink_run_flushes_in_background(tmp_path):
    path = str(tmp_path / "sub" / "cap.jsonl")
    sink = CaptureSink(path)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink.run)
            sink.add(b"GET /1 HTTP/1.1\r\nhost: h\r\n\r\n")
            with trio.fail_after(5):
                while sink.lines < 1:
                    await trio.sleep(0.01)
            assert len(lines_of([path])) == 1  # written by the flusher thread
            sink.add(b"GET /2 HTTP/1.1\r\nhost: h\r\n\r\n")
            nursery.cancel_scope.cancel()  # shutdown flushes what is pending

    trio.run(main)
    sink.close()
    assert [r["target"] for _, _, r in read_records([path])] == ["/1", "/2"]


WRITER = textwrap.dedent("""
    import os, sys, time
    from meshcore.capture import CaptureSink
    path, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    open(path + ".ready-" + who, "w").close()  # start together: both must be writing at once
    deadline = time.monotonic() + 20
    while not all(os.path.exists(path + ".ready-" + w) for w in "ab") and time.monotonic() < deadline:
        time.sleep(0.001)
    sink = CaptureSink(path, max_bytes=6000, body_limit=64, keep=100000)
    for i in range(n):
        sink.add(b"GET /%s/%d HTTP/1.1\\r\\nhost: h\\r\\ncontent-length: 40\\r\\n\\r\\n" % (who.encode(), i),
                 [b"y" * 40])
        if i % 3 == 0:
            sink.flush()
    sink.close()
    assert sink.dropped == 0 and sink.lines == n, (sink.dropped, sink.lines)
""")


def test_two_processes_append_and_rotate_without_losing_or_cutting_lines(tmp_path):
    path = str(tmp_path / "shared.jsonl")
    n = 1500
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
        + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, path, who, str(n)], env=env)
             for who in ("a", "b")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    files = rotated_files(path)
    assert len(files) > 10  # many rotations, raced by both processes
    seen = {"a": [], "b": []}
    order = []
    for line in lines_of(files):
        r = orjson.loads(line)  # every line is whole JSON
        _, who, i = r["target"].split("/")
        seen[who].append(int(i))
        order.append(who)
    assert sum(x != y for x, y in zip(order, order[1:])) >= 2  # the writers really interleaved
    for who in ("a", "b"):
        assert seen[who] == list(range(n))  # none lost, none doubled, each writer in order
    for p in files:
        assert os.path.getsize(p) <= 6000
