"""Traffic mirroring (VirtualService `mirror` / `mirrors[]`), Envoy `request_mirror_policies`.

Rules of this module (semantics.md §1.26, §7; Istio `route.TranslateRoute` / `mirrorPercent`):

* `mirror: Destination` gives one policy; its percentage comes from `mirrorPercentage.value`
  (double 0-100 -> `int(value * 10000)` per MILLION, Go's truncating conversion), else from the
  Istio 1.4 field `mirror_percent` (uint32 -> numerator per HUNDRED), else **100 %**. An explicit
  0 (either field) means no mirror policy at all.
* `mirrors[]` (current Istio): one policy per entry, in order, each with its own `percentage`
  (same rules: unset -> 100 %, explicit 0 -> none). `mirror` comes first when both are set.
* The per-request draw is Envoy's `featureEnabled(default_value, stable_random)`:
  `rnd % denominator < numerator`. Envoy passes the **stream id** as `stable_random`, the same value
  for every mirror policy of the request, so two 50 % mirrors fire on the same requests. Callers
  should therefore draw one random value per request and pass it to `should_mirror` for each
  policy of the route. CONNECT requests are never mirrored.
* Host suffix: Envoy appends `-shadow` to the host before the port (`shadow_authority`) unless
  `disable_shadow_host_suffix_append` is set. Istio <= 1.27 leaves it on (the default here);
  Istio 1.28+ turns it off. meshcore's switch is the VirtualService annotation
  `meshcore.io/shadow-host-suffix: "false"` (`ANNOTATION_SHADOW_SUFFIX`), so the YAML stays valid
  Istio.
* Capture sink (meshcore extension, not Istio): a mirror whose destination host is
  `capture.meshcore.local` (`CAPTURE_HOST`) writes each mirrored request as one JSON line to a
  local file instead of sending it anywhere (meshcore.capture). Its settings come from the
  VirtualService annotations `meshcore.io/capture-file`, `meshcore.io/capture-max-bytes`,
  `meshcore.io/capture-body-limit`, `meshcore.io/capture-keep` (sizes accept a plain number of
  bytes or a `Ki`/`Mi`/`Gi` / `K`/`M`/`G` suffix). No ServiceEntry is needed for that host.
* T1: no I/O; callers pass the random values.

Warnings are `(field, message)` pairs. A field starting with `metadata.` is relative to the
VirtualService document; every other field is relative to the HTTP route (`spec.http[i]`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

__all__ = [
    "HUNDRED",
    "MILLION",
    "CAPTURE_HOST",
    "ANNOTATION_SHADOW_SUFFIX",
    "ANNOTATION_CAPTURE_FILE",
    "ANNOTATION_CAPTURE_MAX_BYTES",
    "ANNOTATION_CAPTURE_BODY_LIMIT",
    "ANNOTATION_CAPTURE_KEEP",
    "DEFAULT_CAPTURE_FILE",
    "DEFAULT_CAPTURE_MAX_BYTES",
    "DEFAULT_CAPTURE_BODY_LIMIT",
    "DEFAULT_CAPTURE_KEEP",
    "CaptureSettings",
    "MirrorPolicy",
    "mirror_policies_from_istio",
    "capture_settings_from_annotations",
    "parse_bool",
    "parse_size",
    "should_mirror",
    "shadow_authority",
    "INTERNAL_LINE",
    "head_authority",
    "shadow_head",
    "mirror_head",
]

HUNDRED = 100
MILLION = 1_000_000

CAPTURE_HOST = "capture.meshcore.local"

ANNOTATION_SHADOW_SUFFIX = "meshcore.io/shadow-host-suffix"
ANNOTATION_CAPTURE_FILE = "meshcore.io/capture-file"
ANNOTATION_CAPTURE_MAX_BYTES = "meshcore.io/capture-max-bytes"
ANNOTATION_CAPTURE_BODY_LIMIT = "meshcore.io/capture-body-limit"
ANNOTATION_CAPTURE_KEEP = "meshcore.io/capture-keep"

DEFAULT_CAPTURE_FILE = "meshcore-capture.jsonl"
DEFAULT_CAPTURE_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_CAPTURE_BODY_LIMIT = 64 * 1024
DEFAULT_CAPTURE_KEEP = 5


@dataclass(frozen=True, slots=True)
class CaptureSettings:
    """Where and how a capture-sink mirror writes (meshcore.capture.CaptureSink arguments)."""

    path: str = DEFAULT_CAPTURE_FILE
    max_bytes: int = DEFAULT_CAPTURE_MAX_BYTES  # per file, before rotation
    body_limit: int = DEFAULT_CAPTURE_BODY_LIMIT  # body bytes kept per request
    keep: int = DEFAULT_CAPTURE_KEEP  # rotated files kept: path.1 .. path.<keep>

    def __post_init__(self):
        if not self.path:
            raise ValueError("capture path must not be empty")
        if self.max_bytes < 1 or self.body_limit < 0 or self.keep < 0:
            raise ValueError("capture sizes must be positive (body_limit, keep: >= 0)")


@dataclass(frozen=True, slots=True)
class MirrorPolicy:
    """One Envoy `request_mirror_policy`: where a copy goes and for which share of requests.

    `host`/`subset`/`port` name the mirror cluster as Istio does (`outbound|port|subset|host`;
    `port` None = the service's only port, else the listener port). `capture` is set (and the
    other destination fields are irrelevant) when `host` is `CAPTURE_HOST`.
    """

    host: str
    subset: Optional[str] = None
    port: Optional[int] = None
    numerator: int = MILLION
    denominator: int = MILLION
    shadow_suffix: bool = True
    capture: Optional[CaptureSettings] = None

    def __post_init__(self):
        if self.denominator not in (HUNDRED, MILLION):
            raise ValueError("denominator must be HUNDRED or MILLION")
        if not 0 <= self.numerator <= self.denominator:
            raise ValueError("numerator must be in 0..denominator")

    @property
    def percent(self) -> float:
        return 100.0 * self.numerator / self.denominator

    @property
    def is_capture(self) -> bool:
        return self.capture is not None


def should_mirror(policy: MirrorPolicy, rnd: int) -> bool:
    """Envoy's `evaluateFractionalPercent`: `rnd % denominator < numerator` (rnd >= 0)."""
    n = policy.numerator
    return n >= policy.denominator or (n > 0 and rnd % policy.denominator < n)


def shadow_authority(authority: bytes) -> bytes:
    """Append `-shadow` to the host part of an authority, before the port, as Envoy does.

    The port starts at the last `:` unless a `]` comes after it (an IPv6 literal):
    `svc:8080` -> `svc-shadow:8080`, `10.0.0.1:80` -> `10.0.0.1-shadow:80`,
    `[::1]:80` -> `[::1]-shadow:80`, `[::1]` -> `[::1]-shadow`, `svc` -> `svc-shadow`.
    (A bracket-less IPv6 such as `::1` is not a valid Host; Envoy would treat its last `:` as the
    port separator too, and so does this function.)
    """
    colon = authority.rfind(b":")
    if colon >= 0 and authority.rfind(b"]") < colon:
        return authority[:colon] + b"-shadow" + authority[colon:]
    return authority + b"-shadow"


# ------------------------------------------------------------------------------------------------
# Decode-time translation

_SIZE_RE = re.compile(r"\s*([0-9]+)\s*(Ki|Mi|Gi|K|M|G|k)?\s*")
_SIZE_UNITS = {None: 1, "K": 1000, "k": 1000, "M": 1000 ** 2, "G": 1000 ** 3,
               "Ki": 1024, "Mi": 1024 ** 2, "Gi": 1024 ** 3}


def parse_size(text) -> int:
    """`1048576`, `64Ki`, `100Mi`, `1G` -> bytes. Raises ValueError."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"invalid size {text!r}")
        return text
    m = _SIZE_RE.fullmatch(str(text))
    if m is None:
        raise ValueError(f"invalid size {text!r} (expected bytes, optionally with Ki/Mi/Gi)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def parse_bool(text) -> bool:
    """Annotation booleans: true/false, yes/no, on/off, 1/0 (any case). Raises ValueError."""
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("true", "yes", "on", "1"):
        return True
    if t in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"invalid boolean {text!r} (expected \"true\" or \"false\")")


def _annotation_path(name: str) -> str:
    return f"metadata.annotations[{name}]"


def capture_settings_from_annotations(annotations: Optional[Mapping[str, str]], warnings: list
                                      ) -> CaptureSettings:
    """The capture sink settings of a VirtualService; bad values warn and keep the default."""
    ann = annotations or {}
    kw: dict = {}
    path = ann.get(ANNOTATION_CAPTURE_FILE)
    if path is None or not str(path).strip():
        warnings.append((_annotation_path(ANNOTATION_CAPTURE_FILE),
                         f"mirror to {CAPTURE_HOST} without a capture file annotation; "
                         f"capturing to ./{DEFAULT_CAPTURE_FILE}"))
    else:
        kw["path"] = str(path).strip()
    for name, key, minimum in ((ANNOTATION_CAPTURE_MAX_BYTES, "max_bytes", 1),
                               (ANNOTATION_CAPTURE_BODY_LIMIT, "body_limit", 0),
                               (ANNOTATION_CAPTURE_KEEP, "keep", 0)):
        raw = ann.get(name)
        if raw is None:
            continue
        try:
            value = parse_size(raw)
            if value < minimum:
                raise ValueError(f"must be at least {minimum}")
        except ValueError as exc:
            warnings.append((_annotation_path(name), f"{exc}; using the default"))
            continue
        kw[key] = value
    return CaptureSettings(**kw)


def _percentage(pct, path: str, warnings: list) -> Optional[int]:
    """`Percent{value}` -> numerator per MILLION, or None for an explicit 0 (no mirror)."""
    value = float(getattr(pct, "value", pct) or 0.0)
    if value < 0.0 or value > 100.0 or 0.0 < value < 0.0001:
        # Istio's validation rejects these; a value that truncates to 0 would never mirror.
        warnings.append((path, f"percentage {value} is neither 0.0, nor in range "
                               "[0.0001, 100.0]; mirror dropped"))
        return None
    if value == 0.0:
        return None
    return int(value * 10000)


def _destination(dst, path: str, warnings: list, shadow: bool, annotations, capture_cache: list
                 ) -> Optional[dict]:
    host = getattr(dst, "host", None)
    if not host:
        warnings.append((f"{path}.host", "mirror destination has no host; mirror dropped"))
        return None
    if host == CAPTURE_HOST:
        if not capture_cache:
            capture_cache.append(capture_settings_from_annotations(annotations, warnings))
        return {"host": host, "shadow_suffix": shadow, "capture": capture_cache[0]}
    port = getattr(dst, "port", None)
    return {"host": host, "subset": getattr(dst, "subset", None) or None,
            "port": getattr(port, "number", None) if port is not None else None,
            "shadow_suffix": shadow}


def mirror_policies_from_istio(route, annotations: Optional[Mapping[str, str]] = None, *,
                               shadow_host_suffix=None):
    """Translate the mirror fields of one VirtualService HTTP route (`HTTPRoute` Struct).

    `annotations`: the VirtualService's `metadata.annotations` (capture sink settings and the
    `meshcore.io/shadow-host-suffix` switch). `shadow_host_suffix`: an explicit override of that
    switch (bool, or the annotation's string value); None = use the annotation, default True
    (Envoy default / Istio <= 1.27).

    Returns `(tuple[MirrorPolicy, ...], warnings)`; the tuple is empty when nothing is mirrored.
    """
    warnings: list[tuple[str, str]] = []
    ann = annotations or {}

    shadow = True
    raw = shadow_host_suffix if shadow_host_suffix is not None else ann.get(ANNOTATION_SHADOW_SUFFIX)
    if raw is not None:
        try:
            shadow = parse_bool(raw)
        except ValueError as exc:
            warnings.append((_annotation_path(ANNOTATION_SHADOW_SUFFIX),
                             f"{exc}; the -shadow host suffix stays on"))

    mirror = getattr(route, "mirror", None)
    mirrors = getattr(route, "mirrors", ()) or ()
    pct_new = getattr(route, "mirror_percentage", None)
    pct_old = getattr(route, "mirror_percent", None)
    has_route = bool(getattr(route, "route", ()))

    if mirror is None:
        if pct_new is not None:
            warnings.append(("mirrorPercentage", "mirrorPercentage without mirror has no effect"))
        if pct_old is not None:
            warnings.append(("mirror_percent", "mirror_percent without mirror has no effect"))
    if mirror is not None and mirrors:
        warnings.append(("mirrors", "mirror and mirrors are both set (Istio's validation "
                                    "rejects this); both are applied, mirror first"))
    if (mirror is not None or mirrors) and not has_route:
        what = ("redirect" if getattr(route, "redirect", None) is not None else
                "directResponse" if getattr(route, "direct_response", None) is not None else
                "delegate" if getattr(route, "delegate", None) is not None else "no route")
        warnings.append(("mirror" if mirror is not None else "mirrors",
                         f"mirroring applies only to routes with a `route` ({what} here); ignored"))
        return (), warnings

    policies: list[MirrorPolicy] = []
    capture_cache: list = []
    if mirror is not None:
        if pct_new is not None:
            numerator, denominator = _percentage(pct_new, "mirrorPercentage", warnings), MILLION
            if pct_old is not None:
                warnings.append(("mirror_percent", "mirror_percent is ignored when "
                                                   "mirrorPercentage is set"))
        elif pct_old is not None:
            percent = int(pct_old)
            if percent > 100:
                warnings.append(("mirror_percent", f"mirror_percent {percent} is over 100; "
                                                   "using 100"))
                percent = 100
            numerator, denominator = (percent or None), HUNDRED
        else:
            numerator, denominator = MILLION, MILLION
        if numerator:
            dst = _destination(mirror, "mirror", warnings, shadow, ann, capture_cache)
            if dst is not None:
                policies.append(MirrorPolicy(numerator=numerator, denominator=denominator, **dst))

    for i, entry in enumerate(mirrors):
        pct = getattr(entry, "percentage", None)
        if pct is not None:
            numerator = _percentage(pct, f"mirrors[{i}].percentage", warnings)
        else:
            numerator = MILLION
        if not numerator:
            continue
        dst_in = getattr(entry, "destination", None)
        if dst_in is None:
            warnings.append((f"mirrors[{i}].destination", "mirror has no destination; dropped"))
            continue
        dst = _destination(dst_in, f"mirrors[{i}].destination", warnings, shadow, ann,
                           capture_cache)
        if dst is not None:
            policies.append(MirrorPolicy(numerator=numerator, denominator=MILLION, **dst))
    return tuple(policies), warnings


# ------------------------------------------------------------------------------------------------
# the copy's head

INTERNAL_LINE = b"x-envoy-internal: true\r\n"


def _find_header_line(head: bytes, name: bytes, start: int):
    """(line start, line end excl. CRLF) of the first `name:` field line after `start`, or None.
    Header names in heads the proxy builds are lowercase; compared case-insensitively anyway."""
    pos = start
    n = len(head)
    lname = len(name)
    while pos < n:
        end = head.find(b"\r\n", pos)
        if end < 0:
            end = n
        if end == pos:  # the empty line: end of the head
            return None
        if head[pos + lname:pos + lname + 1] == b":" and head[pos:pos + lname].lower() == name:
            return pos, end
        pos = end + 2
    return None


def head_authority(head: bytes) -> Optional[bytes]:
    """The `host` value of a serialised request head (the proxy writes it as the second line)."""
    first = head.find(b"\r\n")
    if first < 0:
        return None
    found = _find_header_line(head, b"host", first + 2)
    if found is None:
        return None
    a, b = found
    return head[a + 5:b].strip(b" \t")


def shadow_head(upstream_head: bytes, authority: bytes) -> bytes:
    """The mirror's copy of an upstream request head: `host: <authority>` and
    `x-envoy-internal: true` (replacing any such line).

    Accepts the header block `_upstream_head` builds (no empty line; the result has none either)
    or a complete head ending in CRLF CRLF (the result is complete too). The host line is
    expected second, as the proxy writes it; elsewhere it is found and replaced, and added after
    the request line when absent.
    """
    first = upstream_head.find(b"\r\n")
    if first < 0:
        raise ValueError("not a request head")
    start = first + 2
    head = upstream_head
    if head.startswith(b"host: ", start):
        end = head.find(b"\r\n", start)
        head = head[:start] + b"host: " + authority + head[end:]
    else:
        found = _find_header_line(head, b"host", start)
        if found is None:
            head = head[:start] + b"host: " + authority + b"\r\n" + head[start:]
        else:
            a, b = found
            head = head[:a] + b"host: " + authority + head[b:]
    while True:  # Envoy sets (overwrites) it; the app's own value must not survive
        found = _find_header_line(head, b"x-envoy-internal", start)
        if found is None:
            break
        a, b = found
        head = head[:a] + head[b + 2:]
    if head.endswith(b"\r\n\r\n"):
        return head[:-2] + INTERNAL_LINE + b"\r\n"
    return head + INTERNAL_LINE


def mirror_head(policy, head: bytes) -> bytes:
    """The head a mirror (or the capture sink) gets for `policy`: `shadow_head` with the head's
    own host, `-shadow`-suffixed when `policy.shadow_suffix`."""
    authority = head_authority(head) or b""
    if policy.shadow_suffix:
        authority = shadow_authority(authority)
    return shadow_head(head, authority)
