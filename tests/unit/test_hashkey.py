"""Request hash keys (meshcore.upstream.hashkey): Envoy 1.40's hash policies, the invented cookie,
the fold of several policies and the Istio consistentHash translation. Behaviour marked [E] was
checked against real Envoy (tests/integration/test_ring_envoy.py does it continuously)."""
import msgspec
import pytest
import xxhash

from meshcore.config import istio
from meshcore.proto.h1_parse import parse_request
from meshcore.upstream.hashkey import (
    HashPolicy, RingConfig, evaluate, generated_cookie_value, hash_policy_from_istio,
    hash_source_address, parse_cookie, query_first_value, request_hash, set_cookie_value,
)
from meshcore.upstream.ring import Maglev, RingHash

MASK = (1 << 64) - 1


def X(b):
    return xxhash.xxh64_intdigest(b)


def rotl(h):
    return ((h << 1) | (h >> 63)) & MASK


class Req:
    """Minimal request: headers as (lowercase name, value) pairs, optional get_all."""

    def __init__(self, headers=(), path=b"/", with_get_all=True):
        self.headers = list(headers)
        self.path = path
        if with_get_all:
            self.get_all = lambda n: [v for k, v in self.headers if k == n]

    def get(self, name):
        for k, v in self.headers:
            if k == name:
                return v
        return None


def head(raw):
    h = parse_request(raw)
    assert h is not None
    return h


# ------------------------------------------------------------------------------------------------
# HashPolicy


def test_policy_validation():
    with pytest.raises(ValueError):
        HashPolicy("body", "x")
    with pytest.raises(ValueError):
        HashPolicy("header", "")
    with pytest.raises(ValueError):
        HashPolicy("cookie", "s", cookie_ttl=-1)
    HashPolicy("source_ip")
    p = HashPolicy("header", "X-User")
    assert p == HashPolicy("header", "X-User") and hash(p) == hash(HashPolicy("header", "X-User"))
    with pytest.raises(Exception):
        p.name = "y"  # frozen
    assert HashPolicy("cookie", "s", cookie_attributes=[("Secure", None)]).cookie_attributes == \
        (("Secure", ""),)


# ------------------------------------------------------------------------------------------------
# header


def test_header_single_missing_empty():
    p = HashPolicy("header", "X-User")  # name matched lowercase
    assert evaluate(p, Req([(b"x-user", b"alice")])) == (X(b"alice"), None)
    assert evaluate(p, Req([(b"x-other", b"alice")])) == (None, None)
    assert evaluate(p, Req([(b"x-user", b"")])) == (X(b""), None)  # present but empty [E]


def test_header_repeated_values_sorted_and_seed_chained():
    """[E] Envoy 1.40 sorts the values, then h = XXH64(v, seed=h) from 0 (80/80 probes)."""
    p = HashPolicy("header", "x-user")
    r = Req([(b"x-user", b"bbb"), (b"x-user", b"aaa"), (b"x-user", b"c")])
    want = xxhash.xxh64_intdigest(b"c", xxhash.xxh64_intdigest(b"bbb", X(b"aaa")))
    assert evaluate(p, r)[0] == want
    r2 = Req([(b"x-user", b"c"), (b"x-user", b"aaa"), (b"x-user", b"bbb")])
    assert evaluate(p, r2)[0] == want  # order-independent
    # without get_all only the first value is visible
    assert evaluate(p, Req(r.headers, with_get_all=False))[0] == X(b"bbb")


def test_header_with_meshcore_parser():
    p = HashPolicy("header", "x-user")
    h = head(b"GET / HTTP/1.1\r\nHost: svc\r\nX-User:  bob  \r\nx-user: al\r\n\r\n")
    assert evaluate(p, h)[0] == xxhash.xxh64_intdigest(b"bob", X(b"al"))


def test_pseudo_headers():
    r = head(b"POST /a/b?c=1 HTTP/1.1\r\nHost: svc.ns:8080\r\n\r\n")
    assert evaluate(HashPolicy("header", ":authority"), r)[0] == X(b"svc.ns:8080")  # [E]
    assert evaluate(HashPolicy("header", "host"), r)[0] == X(b"svc.ns:8080")        # [E]
    assert evaluate(HashPolicy("header", ":path"), r)[0] == X(b"/a/b?c=1")
    assert evaluate(HashPolicy("header", ":method"), r)[0] == X(b"POST")
    assert evaluate(HashPolicy("header", ":scheme"), r)[0] is None


# ------------------------------------------------------------------------------------------------
# cookie


def test_parse_cookie_rules():
    assert parse_cookie([b"a=b; sess=\"v1\"; sess=v2"], b"sess") == b"v1"  # first wins, quotes [E]
    assert parse_cookie([b"x=1;sess=tight; "], b"sess") == b"tight"       # [E]
    assert parse_cookie([b"  sess=sp"], b"sess") == b"sp"
    assert parse_cookie([b"Sess=1"], b"sess") is None                      # case-sensitive
    assert parse_cookie([b"sess; a=1"], b"sess") is None                   # no '=': skipped
    assert parse_cookie([b"a=1", b"sess=two"], b"sess") == b"two"          # 2nd header [E]
    assert parse_cookie([b'sess=""'], b"sess") == b""
    assert parse_cookie([b'sess="'], b"sess") == b'"'                      # one quote stays
    assert parse_cookie([b"sess=a=b"], b"sess") == b"a=b"
    assert parse_cookie([b";;sess=z;"], b"sess") == b"z"
    assert parse_cookie([b"\tsess=t"], b"sess") is None                    # only spaces skipped


def test_cookie_present_absent():
    p = HashPolicy("cookie", "sess")
    assert evaluate(p, Req([(b"cookie", b"a=1; sess=abc")])) == (X(b"abc"), None)
    assert evaluate(p, Req([(b"cookie", b'sess="abc"')])) == (X(b"abc"), None)
    assert evaluate(p, Req([(b"cookie", b"a=1")])) == (None, None)  # no ttl: no hash (random)
    assert evaluate(p, Req([(b"cookie", b"sess=")])) == (None, None)


def test_cookie_invented_with_ttl():
    """[E] Value = 16 hex digits of XXH64(peer + local); the request hashes on that value."""
    p = HashPolicy("cookie", "sess", cookie_path="/app", cookie_ttl=60)
    peer, local = "127.0.0.1:54321", "127.0.0.1:15001"
    value = b"%016x" % X(b"127.0.0.1:54321127.0.0.1:15001")
    assert generated_cookie_value(peer, local) == value and len(value) == 16
    h, cookie = evaluate(p, Req(), remote="10.9.9.9:1", cookie_remote=peer, local=local)
    assert h == X(value)
    assert cookie == b'sess="' + value + b'"; Max-Age=60; Path=/app; HttpOnly'
    # an empty cookie value counts as absent [E]
    assert evaluate(p, Req([(b"cookie", b"sess=")]), cookie_remote=peer, local=local)[1] == cookie
    # cookie_remote defaults to remote
    assert evaluate(p, Req(), remote=peer, local=local) == (h, cookie)


def test_set_cookie_formats():
    v = b"0123456789abcdef"
    assert set_cookie_value(HashPolicy("cookie", "s", cookie_ttl=0), v) == b's="0123456789abcdef"; HttpOnly'
    assert set_cookie_value(HashPolicy("cookie", "s", cookie_ttl=5, cookie_path="/"), v) == \
        b's="0123456789abcdef"; Max-Age=5; Path=/; HttpOnly'
    p = HashPolicy("cookie", "s", cookie_ttl=5, cookie_attributes=(("SameSite", "Lax"), ("Secure", "")))
    assert set_cookie_value(p, v) == b's="0123456789abcdef"; Max-Age=5; SameSite=Lax; Secure; HttpOnly'  # [E]


# ------------------------------------------------------------------------------------------------
# query, source ip


def test_query_first_value():
    assert query_first_value(b"/x?a=1&q=v1&q=v2", b"q") == b"v1"
    assert query_first_value(b"/x?q", b"q") == b""               # [E]
    assert query_first_value(b"/x?q=a%20b", b"q") == b"a%20b"    # no decoding [E]
    assert query_first_value(b"/x?qq=1", b"q") is None
    assert query_first_value(b"/x", b"q") is None
    assert query_first_value(b"/x?a=1&q=", b"q") == b""
    assert query_first_value(b"/x?q=1?2=3", b"q") == b"1?2=3"
    assert query_first_value(b"/x?&q=2", b"q") == b"2"
    p = HashPolicy("query", "q")
    assert evaluate(p, Req(path=b"/p?q=z"))[0] == X(b"z")
    assert evaluate(p, Req(path=b"/p"))[0] is None


def test_source_ip():
    p = HashPolicy("source_ip")
    assert evaluate(p, Req(), remote="10.1.2.3:4567")[0] == X(b"10.1.2.3")
    assert evaluate(p, Req(), remote="[fe80::1]:80")[0] == X(b"fe80::1")
    assert evaluate(p, Req(), remote="")[0] is None


def test_hash_source_address_follows_xff():
    """[E] Istio sidecars (use_remote_address false): last XFF entry when it is an IP."""
    assert hash_source_address("127.0.0.1:5000") == "127.0.0.1:5000"
    assert hash_source_address("127.0.0.1:5000", b"9.9.9.9, 10.1.0.1") == "10.1.0.1:0"
    assert hash_source_address("127.0.0.1:5000", b"10.1.0.1 ") == "10.1.0.1:0"
    assert hash_source_address("127.0.0.1:5000", b"not-an-ip") == "127.0.0.1:5000"
    assert hash_source_address("127.0.0.1:5000", b"1.1.1.1,") == "127.0.0.1:5000"
    assert hash_source_address("127.0.0.1:5000", b"2001:db8::1") == "[2001:db8::1]:0"
    assert hash_source_address("127.0.0.1:5000", b"1.1.1.1", use_remote_address=True) == "127.0.0.1:5000"
    assert hash_source_address("127.0.0.1:5000", b"1.1.1.1, 2.2.2.2", xff_num_trusted_hops=1) == "1.1.1.1:0"
    assert hash_source_address("127.0.0.1:5000", b"1.1.1.1", xff_num_trusted_hops=1) == "127.0.0.1:5000"


# ------------------------------------------------------------------------------------------------
# folding several policies (§6.17, §2.7)


def test_fold_identical_policies():
    p = HashPolicy("header", "x-user")
    h = X(b"u1")
    r = Req([(b"x-user", b"u1")])
    assert request_hash((p,), r) == (h, ())
    assert request_hash((p, p), r) == (rotl(h) ^ h, ())  # [E]
    assert request_hash((p, p, p), r) == (rotl(rotl(h) ^ h) ^ h, ())


def test_fold_skips_missing_and_terminal_stops():
    a = HashPolicy("header", "x-a")
    b = HashPolicy("header", "x-b")
    r = Req([(b"x-b", b"2")])
    assert request_hash((a, b), r) == (X(b"2"), ())            # a yields nothing: b alone
    r = Req([(b"x-a", b"1"), (b"x-b", b"2")])
    assert request_hash((a, b), r)[0] == rotl(X(b"1")) ^ X(b"2")
    ta = HashPolicy("header", "x-a", terminal=True)
    assert request_hash((ta, b), r)[0] == X(b"1")
    assert request_hash((ta, b), Req([(b"x-b", b"2")]))[0] == X(b"2")  # terminal w/o hash: go on
    assert request_hash((), r) == (None, ())
    assert request_hash((a,), Req()) == (None, ())


def test_two_cookie_policies_set_two_cookies():
    """[E] Each ttl cookie policy whose cookie is absent adds its own Set-Cookie."""
    p = HashPolicy("cookie", "sess", cookie_path="/", cookie_ttl=60)
    h, cookies = request_hash((p, p), Req(), remote="1.1.1.1:1", local="2.2.2.2:2")
    v = generated_cookie_value("1.1.1.1:1", "2.2.2.2:2")
    assert cookies == (set_cookie_value(p, v),) * 2
    assert h == rotl(X(v)) ^ X(v)


# ------------------------------------------------------------------------------------------------
# Istio translation


def ch(**kw):
    return msgspec.convert(kw, istio.ConsistentHashLB, dec_hook=istio.dec_hook)


def test_istio_keys():
    p, cfg, w = hash_policy_from_istio(ch(httpHeaderName="x-user"))
    assert p == HashPolicy("header", "x-user") and cfg == RingConfig() and w == ()
    assert cfg.lb_policy == "RING_HASH" and cfg.minimum_ring_size == 1024
    assert cfg.maximum_ring_size == 8388608
    p, _, _ = hash_policy_from_istio(ch(useSourceIp=True))
    assert p == HashPolicy("source_ip")
    p, _, _ = hash_policy_from_istio(ch(httpQueryParameterName="q"))
    assert p == HashPolicy("query", "q")
    p, _, w = hash_policy_from_istio(ch(httpCookie={"name": "s", "path": "/a", "ttl": "10s"}))
    assert p == HashPolicy("cookie", "s", cookie_path="/a", cookie_ttl=10) and w == ()
    p, _, _ = hash_policy_from_istio(ch(httpCookie={"name": "s"}))
    assert p.cookie_ttl is None and p.cookie_path == ""
    p, _, _ = hash_policy_from_istio(ch(httpCookie={"name": "s", "ttl": "0s"}))
    assert p.cookie_ttl == 0


def test_istio_cookie_warnings():
    p, _, w = hash_policy_from_istio(ch(httpCookie={"name": "s", "ttl": "1.5s",
                                                    "attributes": [{"name": "Secure"}]}))
    assert p.cookie_ttl == 1 and p.cookie_attributes == ()
    assert any("ttl" in x for x in w) and any("attributes" in x for x in w)


def test_istio_no_key():
    p, cfg, w = hash_policy_from_istio(ch(ringHash={"minimumRingSize": 2048}))
    assert p is None and cfg.minimum_ring_size == 2048 and w == ()
    p, _, w = hash_policy_from_istio(ch(useSourceIp=False))
    assert p is None and "useSourceIp" in w[0]


def test_istio_ring_sizes():
    _, cfg, _ = hash_policy_from_istio(ch(httpHeaderName="h", minimumRingSize=4096))
    assert cfg == RingConfig(minimum_ring_size=4096)
    _, cfg, w = hash_policy_from_istio(ch(httpHeaderName="h", minimumRingSize=4096,
                                          ringHash={"minimumRingSize": 100}))
    assert cfg.minimum_ring_size == 100 and "deprecated" in w[0]
    _, cfg, _ = hash_policy_from_istio(ch(httpHeaderName="h", ringHash={}))
    assert cfg.minimum_ring_size == 1024
    with pytest.raises(ValueError, match="ringHash.minimumRingSize"):
        hash_policy_from_istio(ch(httpHeaderName="h", ringHash={"minimumRingSize": 8388609}))


def test_istio_maglev():
    _, cfg, _ = hash_policy_from_istio(ch(httpHeaderName="h", maglev={}))
    assert cfg == RingConfig("MAGLEV", table_size=65537)
    _, cfg, _ = hash_policy_from_istio(ch(httpHeaderName="h", maglev={"tableSize": 251}))
    assert cfg.table_size == 251
    with pytest.raises(ValueError, match="not a prime"):
        hash_policy_from_istio(ch(httpHeaderName="h", maglev={"tableSize": 1000}))
    with pytest.raises(ValueError, match="exceeds"):
        hash_policy_from_istio(ch(httpHeaderName="h", maglev={"tableSize": 5000021}))


def test_ring_config_build():
    keys = ["10.0.0.1:80", "10.0.0.2:80"]
    t = RingConfig(minimum_ring_size=16).build(keys, [1, 1])
    assert isinstance(t, RingHash) and t.size == 16
    t = RingConfig("MAGLEV", table_size=7).build(keys, [1, 1])
    assert isinstance(t, Maglev) and t.table_size == 7


def test_end_to_end_with_parsed_request():
    policies = (HashPolicy("header", "x-user"), HashPolicy("header", "x-user"))
    r = head(b"GET / HTTP/1.1\r\nHost: svc\r\nx-user: u\r\n\r\n")
    h, cookies = request_hash(policies, r, "127.0.0.1:1")
    table = RingConfig().build(["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], [1, 1, 1])
    assert cookies == () and table.pick(h) in (0, 1, 2)
    assert table.pick(h) == table.pick(rotl(X(b"u")) ^ X(b"u"))
