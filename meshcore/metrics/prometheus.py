"""Prometheus text exposition (format 0.0.4) of Istio's metrics and Envoy's stats (T1: pure).

Rules of this module:

* One `# TYPE` line per family, then its samples; families sorted by name, Istio's first (what
  `/stats/prometheus` of an Istio sidecar shows), then Envoy's counters, gauges.
* Label values are escaped as the format requires (backslash, double quote, newline); metric and
  label names are made of [a-zA-Z0-9_:] (other characters become "_").
* Istio histograms: cumulative `_bucket{le=...}` samples for every bound and `+Inf`, then `_sum`
  and `_count`, summed over workers (meshcore.metrics.istio.collect).
* `istio_requests_total` honours `/reset_counters` through a per-row baseline (histograms are not
  reset, as in Envoy).
"""
from __future__ import annotations

import re

from meshcore.metrics.istio import BUCKETS, OVERFLOW_KEY, flags_text, unpack_key
from meshcore.metrics.labels import UNKNOWN_DESTINATION

__all__ = ["escape", "metric_name", "render_istio", "render_envoy", "render_histogram", "render",
           "CONTENT_TYPE", "ISTIO_LABELS"]

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

# Istio's label order for istio_* metrics (as an Istio 1.2x sidecar prints them)
ISTIO_LABELS = (
    "reporter", "source_workload", "source_canonical_service", "source_canonical_revision",
    "source_workload_namespace", "source_principal", "source_app", "source_version",
    "source_cluster", "destination_workload", "destination_workload_namespace",
    "destination_principal", "destination_app", "destination_version", "destination_service",
    "destination_canonical_service", "destination_canonical_revision",
    "destination_service_name", "destination_service_namespace", "destination_cluster",
    "request_protocol", "response_code", "grpc_response_status", "response_flags",
    "connection_security_policy",
)
_BAD_NAME = re.compile(r"[^a-zA-Z0-9_:]")
_LE = tuple(f"{b:g}" if b < 1e6 else str(int(b)) for b in BUCKETS)


def escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def metric_name(name: str) -> str:
    name = _BAD_NAME.sub("_", name)
    return "_" + name if name[:1].isdigit() else name


def _labels(pairs) -> str:
    return ",".join(f'{k}="{escape(v)}"' for k, v in pairs)


def _source_part(source, reporter: str = "source") -> str:
    """The labels before the destination ones: this proxy's identity."""
    return _labels((("reporter", reporter), ("source_workload", source.workload),
                    ("source_canonical_service", source.canonical_service),
                    ("source_canonical_revision", source.canonical_revision),
                    ("source_workload_namespace", source.namespace),
                    ("source_principal", "unknown"), ("source_app", source.app),
                    ("source_version", source.version), ("source_cluster", "unknown")))


def _dest_part(d) -> str:
    return _labels((("destination_workload", d.workload),
                    ("destination_workload_namespace", d.workload_namespace),
                    ("destination_principal", "unknown"), ("destination_app", d.app),
                    ("destination_version", d.version), ("destination_service", d.service),
                    ("destination_canonical_service", d.canonical_service),
                    ("destination_canonical_revision", d.canonical_revision),
                    ("destination_service_name", d.service_name),
                    ("destination_service_namespace", d.service_namespace),
                    ("destination_cluster", "unknown")))


def render_istio(series: dict, registry, source, baseline: dict | None = None) -> list[str]:
    """Lines of the four Istio families. `series`: {key: Series} summed over workers;
    `registry`: DestinationRegistry (dest id -> labels); `source`: SourceIdentity;
    `baseline`: {key: requests at the last reset}."""
    src = _source_part(source)
    rows = []
    for key in sorted(series):
        s = series[key]
        if key == OVERFLOW_KEY:
            dest, code, flags = UNKNOWN_DESTINATION, "unknown", "unknown"
        else:
            dest_id, code_int, mask = unpack_key(key)
            dest, code, flags = registry.get(dest_id), str(code_int), flags_text(mask)
        labels = (f'{src},{_dest_part(dest)},request_protocol="http",response_code="{code}",'
                  f'grpc_response_status="",response_flags="{escape(flags)}",'
                  f'connection_security_policy="unknown"')
        rows.append((labels, key, s))
    out = ["# TYPE istio_requests_total counter"]
    base = baseline or {}
    for labels, key, s in rows:
        out.append(f"istio_requests_total{{{labels}}} {max(0, s.requests - base.get(key, 0))}")
    for family, buckets_attr, sum_attr in (
            ("istio_request_bytes", "request_bytes", "request_bytes_sum"),
            ("istio_request_duration_milliseconds", "duration", "duration_sum"),
            ("istio_response_bytes", "response_bytes", "response_bytes_sum")):
        out.append(f"# TYPE {family} histogram")
        for labels, _key, s in rows:
            cumulative = 0
            for le, n in zip(_LE, getattr(s, buckets_attr)):
                cumulative += n
                out.append(f'{family}_bucket{{{labels},le="{le}"}} {cumulative}')
            out.append(f'{family}_bucket{{{labels},le="+Inf"}} {s.requests}')
            out.append(f"{family}_sum{{{labels}}} {getattr(s, sum_attr)}")
            out.append(f"{family}_count{{{labels}}} {s.requests}")
    return out


def render_histogram(family: str, items) -> list[str]:
    """Lines of one histogram family; `items`: (tags, buckets, sum, count) with tags
    ((label, value), ...) and non-cumulative counts over BUCKETS."""
    if not items:
        return []
    out = [f"# TYPE {family} histogram"]
    for tags, buckets, total, count in items:
        labels = _labels(tags)
        cumulative = 0
        for le, n in zip(_LE, buckets):
            cumulative += n
            out.append(f'{family}_bucket{{{labels},le="{le}"}} {cumulative}')
        out.append(f'{family}_bucket{{{labels},le="+Inf"}} {count}')
        out.append(f"{family}_sum{{{labels}}} {total}")
        out.append(f"{family}_count{{{labels}}} {count}")
    return out


def render_envoy(stats) -> list[str]:
    """Lines for Envoy stats (meshcore.metrics.envoy.Stat): counters, then gauges."""
    families: dict[tuple[str, str], list] = {}
    for s in stats:
        families.setdefault((s.kind, metric_name(s.family)), []).append(s)
    out = []
    for kind in ("counter", "gauge"):
        for (k, family), members in sorted(families.items()):
            if k != kind:
                continue
            out.append(f"# TYPE {family} {kind}")
            for s in sorted(members, key=lambda s: s.tags):
                if s.tags:
                    out.append(f"{family}{{{_labels((metric_name(k), v) for k, v in s.tags)}}} "
                               f"{s.value}")
                else:
                    out.append(f"{family} {s.value}")
    return out


def render(series, registry, source, stats, baseline=None, extra=()) -> bytes:
    """The whole `/stats/prometheus` body."""
    lines = render_istio(series, registry, source, baseline) if series else []
    lines += list(extra)
    lines += render_envoy(stats)
    return ("\n".join(lines) + "\n").encode("utf-8")
