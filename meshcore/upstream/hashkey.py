"""Request hash keys for consistent hashing, as Envoy 1.40 computes them (semantics.md §2.4-2.7, §6.14-6.17).

Sans-IO: nothing here touches a socket. The caller passes the parsed request and the addresses.

* `HashPolicy` is one compiled route hash policy (Envoy `RouteAction.HashPolicy`): a header, a cookie
  (optionally with path/ttl, which makes Envoy invent the cookie when it is missing), the source IP,
  or a query parameter. A route carries a tuple of them: Istio writes one per destination of the
  route, so a weighted route with two destinations has two identical policies (§2.7).
* `request_hash(policies, request, remote, cookie_remote="", local="")` ->
  `(hash or None, set_cookies)`:
  - each policy is evaluated in order; the results are folded as Envoy does,
    `h = rotl64(h, 1) ^ new` from 0, skipping policies that yield nothing; a `terminal` policy that
    leaves a hash stops the fold (§6.17);
  - `None` means "no hash": Envoy then uses a random 64-bit value for the pick (§6.14), i.e. the
    caller must pick with `random.getrandbits(64)`;
  - `set_cookies` is a tuple of `Set-Cookie` values (bytes) to add to the downstream response: one
    per cookie policy with a ttl whose cookie was absent (§2.6, §6.16). Usually empty.
    Envoy computes the hash again for every host selection (each retry try) and keeps every
    Set-Cookie it produced, so a request answered after 2 retries carries 3 identical Set-Cookie
    headers; they are added only to a response that came from an upstream, never to a local
    reply (503 connect failure, no healthy upstream, ...) [verified on Envoy 1.40].
* The request object needs `get(name: bytes) -> bytes | None` for lowercase header names and
  `path: bytes` (path + query, Envoy's :path). When it also has `get_all(name) -> list[bytes]`
  (meshcore's RequestHead does), repeated headers are hashed as Envoy 1.40 hashes them (values
  sorted bytewise, then chained: `h = XXH64(v, seed=h)` from seed 0; verified 80/80 against Envoy)
  and every Cookie header is searched. Header `host` and `:authority` both hash the Host value.
* Addresses are Envoy's `asString()` forms: `ip:port`, IPv6 `[addr]:port`.
  - `remote`: the downstream remote address used for `source_ip` hashing. With Istio's sidecar
    HCM (`use_remote_address: false`) Envoy takes it from the last `X-Forwarded-For` entry when
    that is a valid IP, else the connection peer: use `hash_source_address()` to derive it.
  - `cookie_remote` / `local`: the *connection's* peer and local addresses, hashed to invent a
    cookie value: `XXH64(peer + local)` as 16 lowercase hex digits. In an Istio sidecar the local
    address of an outbound connection is the original destination the app dialled (the listener
    restores it), not the 15001 capture port.
"""
from __future__ import annotations

import ipaddress
import operator
from dataclasses import dataclass, field
from typing import Optional, Sequence

from meshcore.upstream.ring import (
    DEFAULT_MAX_RING_SIZE, DEFAULT_MIN_RING_SIZE, DEFAULT_TABLE_SIZE, MAX_TABLE_SIZE, Maglev,
    RingHash, fold_hash, hash_key, is_prime,
)

__all__ = [
    "HashPolicy", "RingConfig", "KINDS", "request_hash", "evaluate", "hash_policy_from_istio",
    "hash_source_address", "generated_cookie_value", "set_cookie_value", "parse_cookie",
    "query_first_value",
]

KINDS = ("header", "cookie", "source_ip", "query")
_EMPTY = ()


@dataclass(frozen=True)
class HashPolicy:
    """One route hash policy (Envoy RouteAction.HashPolicy), compiled.

    kind: "header" | "cookie" | "source_ip" | "query"
    name: header name (matched lowercase), cookie name (exact), query parameter name (exact);
          ignored for source_ip.
    cookie_path: `Path=` of an invented cookie ("" = no Path attribute).
    cookie_ttl: None = never invent a cookie; an int number of whole seconds otherwise (Envoy keeps
          only the seconds of the ttl Duration); 0 = session cookie (no Max-Age).
    cookie_attributes: extra (name, value) attributes written before HttpOnly (value "" = bare name).
    terminal: stop folding further policies once a hash exists.
    """

    kind: str
    name: str = ""
    cookie_path: str = ""
    cookie_ttl: Optional[int] = None
    cookie_attributes: tuple = ()
    terminal: bool = False
    _key: bytes = field(init=False, repr=False, compare=False)
    _pseudo: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"hash policy kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind != "source_ip" and not self.name:
            raise ValueError(f"{self.kind} hash policy needs a name")
        if self.cookie_ttl is not None:
            ttl = operator.index(self.cookie_ttl)
            if ttl < 0:
                raise ValueError(f"cookie ttl must be >= 0 seconds, got {ttl}")
            object.__setattr__(self, "cookie_ttl", ttl)
        attrs = tuple((str(n), "" if v is None else str(v)) for n, v in self.cookie_attributes)
        object.__setattr__(self, "cookie_attributes", attrs)
        name = self.name.lower() if self.kind == "header" else self.name
        object.__setattr__(self, "_key", name.encode())
        object.__setattr__(self, "_pseudo", self.kind == "header" and name.startswith(":"))


@dataclass(frozen=True)
class RingConfig:
    """Cluster side of consistentHash: which table and its size parameters."""

    lb_policy: str = "RING_HASH"            # "RING_HASH" | "MAGLEV"
    minimum_ring_size: int = DEFAULT_MIN_RING_SIZE
    maximum_ring_size: int = DEFAULT_MAX_RING_SIZE
    table_size: int = DEFAULT_TABLE_SIZE

    def build(self, keys, weights):
        """The table for these endpoints: RingHash or Maglev (compiled when available)."""
        if self.lb_policy == "MAGLEV":
            return Maglev(keys, weights, self.table_size)
        return RingHash(keys, weights, self.minimum_ring_size, self.maximum_ring_size)


# ------------------------------------------------------------------------------------------------
# pieces of Envoy's request parsing


def parse_cookie(values, name: bytes) -> Optional[bytes]:
    """Envoy's Utility::parseCookieValue over the Cookie header values, in order.

    Each value is split on ';' (empty pieces skipped); a piece without '=' is skipped; the name is
    the text from the first non-space to the first '=' (exact, case-sensitive); the first piece
    whose name matches wins and its value loses one pair of surrounding double quotes. Returns the
    value (possibly b"") or None when no piece matches.
    """
    for value in values:
        for piece in value.split(b";"):
            if not piece:
                continue
            eq = piece.find(b"=")
            if eq < 0:
                continue
            start = len(piece) - len(piece.lstrip(b" "))
            if piece[start:eq] != name:
                continue
            v = piece[eq + 1:]
            if len(v) >= 2 and v[:1] == b'"' and v[-1:] == b'"':
                v = v[1:-1]
            return v
    return None


def query_first_value(path: bytes, name: bytes) -> Optional[bytes]:
    """Envoy's QueryParamsMulti::parseQueryString(path).getFirstValue(name): no percent-decoding,
    everything after the first '?' split on '&', a parameter without '=' has the value b""."""
    q = path.find(b"?")
    if q < 0:
        return None
    for param in path[q + 1:].split(b"&"):
        eq = param.find(b"=")
        if eq < 0:
            if param == name:
                return b""
        elif param[:eq] == name:
            return param[eq + 1:]
    return None


def _split_host_port(addr: str):
    """'1.2.3.4:5' -> ('1.2.3.4', '5'); '[::1]:5' -> ('::1', '5'); a bare IP -> (ip, '')."""
    if addr.startswith("["):
        end = addr.find("]")
        if end > 0:
            return addr[1:end], addr[end + 2:]
    if addr.count(":") == 1:
        host, _, port = addr.partition(":")
        return host, port
    return addr, ""


def hash_source_address(remote: str, xff: Optional[bytes] = None, use_remote_address: bool = False,
                        xff_num_trusted_hops: int = 0) -> str:
    """The downstream remote address Envoy's `source_ip` hash policy sees.

    With `use_remote_address: false` (Istio sidecars) and no trusted hops, Envoy takes the last
    `X-Forwarded-For` entry when it parses as an IP (its address then has port 0), otherwise the
    connection peer `remote`. `xff` is the X-Forwarded-For header value (joined with ',' if there
    were several).
    """
    if use_remote_address or not xff:
        return remote
    s = xff.decode("latin-1")
    for _ in range(xff_num_trusted_hops):
        cut = s.rfind(",")
        if cut < 0:
            return remote
        s = s[:cut]
    cut = s.rfind(",")
    if cut >= 0 and cut + 1 < len(s):
        s = s[cut + 1:]
    s = s.strip(" \t")
    try:
        ip = ipaddress.ip_address(s)
    except ValueError:
        return remote
    return f"[{ip}]:0" if ip.version == 6 else f"{ip}:0"


def generated_cookie_value(cookie_remote: str, local: str) -> bytes:
    """The cookie value Envoy invents: 16 lowercase hex digits of XXH64(peer + local)."""
    return b"%016x" % hash_key((cookie_remote + local).encode())


def set_cookie_value(policy: HashPolicy, value: bytes) -> bytes:
    """Envoy's Utility::makeSetCookieValue(name, value, path, ttl, httponly=true, attributes)."""
    out = [policy.name.encode(), b'="', value, b'"']
    if policy.cookie_ttl:
        out.append(b"; Max-Age=%d" % policy.cookie_ttl)
    if policy.cookie_path:
        out.append(b"; Path=" + policy.cookie_path.encode())
    for n, v in policy.cookie_attributes:
        out.append(b"; " + n.encode() + (b"=" + v.encode() if v else b""))
    out.append(b"; HttpOnly")
    return b"".join(out)


# ------------------------------------------------------------------------------------------------
# evaluation


def _all(request, name: bytes):
    try:
        return request.get_all(name)
    except AttributeError:
        v = request.get(name)
        return _EMPTY if v is None else (v,)


def _pseudo_values(request, key: bytes):
    """Envoy pseudo-headers of an HTTP/1.1 request."""
    if key == b":authority":
        return _all(request, b"host")
    if key == b":path":
        return (request.path,)
    if key == b":method":
        m = getattr(request, "method", None)
        return _EMPTY if m is None else (m,)
    return _EMPTY


def evaluate(policy: HashPolicy, request, remote: str = "", cookie_remote: str = "",
             local: str = "") -> tuple:
    """One policy -> (hash or None, Set-Cookie value or None)."""
    kind = policy.kind
    if kind == "header":
        values = _pseudo_values(request, policy._key) if policy._pseudo else _all(request, policy._key)
        if len(values) == 1:
            return hash_key(values[0]), None
        if not values:
            return None, None
        h = 0
        for v in sorted(values):  # Envoy 1.40: sorted, each value hashed with the previous as seed
            h = hash_key(v, h)
        return h, None
    if kind == "cookie":
        value = parse_cookie(_all(request, b"cookie"), policy._key)
        if value:
            return hash_key(value), None
        if policy.cookie_ttl is None:
            return None, None
        value = generated_cookie_value(cookie_remote or remote, local)
        return hash_key(value), set_cookie_value(policy, value)
    if kind == "query":
        value = query_first_value(request.path, policy._key)
        return (None if value is None else hash_key(value)), None
    # source_ip
    if not remote:
        return None, None
    host, _ = _split_host_port(remote)
    return (hash_key(host.encode()) if host else None), None


def request_hash(policies: Sequence[HashPolicy], request, remote: str = "",
                 cookie_remote: str = "", local: str = "") -> tuple:
    """All route policies -> (hash or None, tuple of Set-Cookie values).

    `remote`: address for source_ip (see `hash_source_address`); `cookie_remote` (defaults to
    `remote`) and `local`: the connection's peer and local addresses for an invented cookie.
    """
    if len(policies) == 1:  # the common case: one destination, one policy
        h, cookie = evaluate(policies[0], request, remote, cookie_remote, local)
        return h, (_EMPTY if cookie is None else (cookie,))
    h = None
    cookies = _EMPTY
    for p in policies:
        new, cookie = evaluate(p, request, remote, cookie_remote, local)
        if cookie is not None:
            cookies = cookies + (cookie,)
        if new is not None:
            h = new if h is None else fold_hash(h, new)
        if p.terminal and h is not None:
            break
    return h, cookies


# ------------------------------------------------------------------------------------------------
# Istio translation


def _ttl_seconds(ttl) -> int:
    seconds = getattr(ttl, "seconds", ttl)
    return int(seconds)  # Envoy: std::chrono::seconds(ttl.seconds()), nanos dropped


def hash_policy_from_istio(ch) -> tuple:
    """DestinationRule `consistentHash` (meshcore.config.istio.ConsistentHashLB) ->
    (HashPolicy or None, RingConfig, warnings), as Istio translates it.

    HashPolicy is None when the DestinationRule yields no route hash policy (no key set, or
    `useSourceIp: false`): Envoy then picks with a random hash. Invalid sizes that Envoy would
    reject (maglev tableSize not prime or above 5,000,011, ring minimum above 8,388,608) raise
    ValueError naming the field.
    """
    warnings = []
    policy = None
    if ch.http_header_name:
        policy = HashPolicy("header", ch.http_header_name)
    elif ch.http_cookie is not None:
        c = ch.http_cookie
        ttl = None if c.ttl is None else _ttl_seconds(c.ttl)
        if c.ttl is not None and c.ttl.seconds != ttl:
            warnings.append(f"consistentHash.httpCookie.ttl: {c.ttl.text} is truncated to {ttl}s "
                            f"(Envoy keeps whole seconds)")
        if c.attributes:
            warnings.append("consistentHash.httpCookie.attributes: Istio does not pass cookie "
                            "attributes to Envoy's route hash policy; ignored")
        policy = HashPolicy("cookie", c.name, cookie_path=c.path or "", cookie_ttl=ttl)
    elif ch.use_source_ip:
        policy = HashPolicy("source_ip")
    elif ch.http_query_parameter_name:
        policy = HashPolicy("query", ch.http_query_parameter_name)
    elif ch.use_source_ip is False:
        warnings.append("consistentHash.useSourceIp: false yields no hash key; picks are random")

    if ch.maglev is not None:
        size = ch.maglev.table_size or DEFAULT_TABLE_SIZE
        if size > MAX_TABLE_SIZE:
            raise ValueError(f"consistentHash.maglev.tableSize: {size} exceeds {MAX_TABLE_SIZE}")
        if not is_prime(size):
            raise ValueError(f"consistentHash.maglev.tableSize: {size} is not a prime number")
        if ch.minimum_ring_size:
            warnings.append("consistentHash.minimumRingSize is ignored with maglev")
        config = RingConfig("MAGLEV", table_size=size)
    else:
        if ch.ring_hash is not None:
            size = ch.ring_hash.minimum_ring_size or DEFAULT_MIN_RING_SIZE
            if ch.minimum_ring_size:
                warnings.append("consistentHash.minimumRingSize (deprecated) is ignored when "
                                "ringHash is set")
            where = "consistentHash.ringHash.minimumRingSize"
        else:
            size = ch.minimum_ring_size or DEFAULT_MIN_RING_SIZE
            where = "consistentHash.minimumRingSize"
        if size > DEFAULT_MAX_RING_SIZE:
            raise ValueError(f"{where}: {size} exceeds the maximum ring size {DEFAULT_MAX_RING_SIZE}")
        config = RingConfig("RING_HASH", minimum_ring_size=size)
    return policy, config, tuple(warnings)
