"""Write a directory the way the kubelet updates a ConfigMap volume (AtomicWriter,
kubernetes/pkg/volume/util/atomic_writer.go), so tests can check that meshcore reloads on it:

    <dir>/..2026_01_02_03_04_05.123456789/<key>   the payload, a new directory per update
    <dir>/..data -> ..2026_01_02_03_04_05.123456789
    <dir>/<key> -> ..data/<key>                   one symlink per key, created once

An update writes the new timestamped directory, points a `..data_tmp` symlink at it, renames it
over `..data` (the atomic step), adds symlinks for new keys, removes those of deleted keys and
finally the old directory. Files keep their names; only the symlink target changes.
"""
from __future__ import annotations

import os
import random
import time

__all__ = ["write_configmap"]


def write_configmap(directory: str, files: dict[str, str | bytes], mtime_ns: int | None = None) -> str:
    """Publish `files` (key -> content) in `directory` as the kubelet does; returns the new
    timestamped directory. `mtime_ns` stamps every file with that mtime (to make an update that
    changes neither names, sizes nor mtimes)."""
    os.makedirs(directory, exist_ok=True)
    data = os.path.join(directory, "..data")
    old = os.readlink(data) if os.path.islink(data) else None
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S", time.gmtime()) + f".{random.randrange(10**9):09d}"
    payload = os.path.join(directory, stamp)
    os.mkdir(payload)
    for key, content in files.items():
        path = os.path.join(payload, key)
        with open(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
        if mtime_ns is not None:
            os.utime(path, ns=(mtime_ns, mtime_ns))
    tmp = os.path.join(directory, "..data_tmp")
    os.symlink(stamp, tmp)
    os.rename(tmp, data)
    for key in files:
        link = os.path.join(directory, key)
        if not os.path.lexists(link):
            os.symlink(os.path.join("..data", key), link)
    for name in os.listdir(directory):
        link = os.path.join(directory, name)
        if not name.startswith("..") and os.path.islink(link) and name not in files:
            os.unlink(link)
    if old is not None:
        old_dir = os.path.join(directory, old)
        for name in os.listdir(old_dir):
            os.unlink(os.path.join(old_dir, name))
        os.rmdir(old_dir)
    return payload
