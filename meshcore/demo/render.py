"""A scenario's Istio YAML, adjusted for this run: pod ports moved, ejection times shortened.

Pure functions over the parsed documents; `write_folder` writes the result for `meshcore run`.
The article's files in examples/seed/ stay as they are: the proxy reads them directly whenever
nothing needs adjusting, so editing them reloads the running demo (as `kubectl apply` would).
"""
from __future__ import annotations

import os

import yaml

from meshcore.durations import parse_duration

# The walkthrough waits for an ejection to end; the article's 1 minute would make it slow.
WALKTHROUGH_EJECTION = {"baseEjectionTime": ("5s", 5.0), "interval": ("1s", 1.0)}


def read_folder(folder: str) -> list[tuple[str, list]]:
    """[(file name, [documents])] for the folder's YAML files, sorted as `meshcore run` loads them."""
    out = []
    for name in sorted(os.listdir(folder)):
        if name.endswith((".yaml", ".yml")):
            with open(os.path.join(folder, name)) as f:
                out.append((name, [d for d in yaml.safe_load_all(f) if d is not None]))
    return out


def remap_ports(files, port_map: dict[int, int]) -> int:
    """Move every ServiceEntry/WorkloadEntry endpoint port found in port_map; returns how many."""
    moved = 0
    for _, docs in files:
        for doc in docs:
            kind, spec = doc.get("kind"), doc.get("spec") or {}
            if kind == "ServiceEntry":
                endpoints = spec.get("endpoints") or []
            elif kind == "WorkloadEntry":
                endpoints = [spec]
            else:
                endpoints = []
            for ep in endpoints:
                for name, port in list((ep.get("ports") or {}).items()):
                    if port in port_map and port_map[port] != port:
                        ep["ports"][name] = port_map[port]
                        moved += 1
    return moved


def shorten_ejections(files) -> list[str]:
    """Cap every outlierDetection's baseEjectionTime and interval for the walkthrough; returns what
    changed, e.g. ["retry-service: baseEjectionTime 1m -> 3s", ...]."""
    changes = []
    for _, docs in files:
        for doc in docs:
            if doc.get("kind") != "DestinationRule":
                continue
            spec = doc.get("spec") or {}
            policies = [("", spec.get("trafficPolicy"))]
            policies += [(f" subset {s.get('name')}", s.get("trafficPolicy")) for s in spec.get("subsets") or []]
            for where, policy in policies:
                od = (policy or {}).get("outlierDetection")
                if not od:
                    continue
                for key, (short, short_s) in WALKTHROUGH_EJECTION.items():
                    old = od.get(key)
                    if old is None or _seconds(old) > short_s:
                        od[key] = short
                        changes.append(f"{spec.get('host')}{where}: {key} {old or 'default'} -> {short}")
    return changes


def _seconds(text) -> float:
    try:
        return parse_duration(str(text))
    except (ValueError, TypeError):
        return float("inf")


def write_folder(files, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, docs in files:
        with open(os.path.join(folder, name), "w") as f:
            f.write("# written by `meshcore demo` from examples/seed (ports and times adjusted)\n")
            yaml.safe_dump_all(docs, f, sort_keys=False)
