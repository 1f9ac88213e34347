"""A worker's resident memory is mostly its imports (CPython, trio, meshcore's data path): what it
never uses must not be loaded. The pure twins of compiled modules cost ~0.5 MB each and the config
compiler (YAML, msgspec schemas) more; workers receive a compiled Snapshot and run the compiled
extensions, so neither belongs in a worker when the extensions are built."""
import subprocess
import sys

import pytest

from meshcore import _accel

NEVER_IN_A_WORKER = ("meshcore.proto.h1_parse", "meshcore.config.compile", "yaml", "msgspec",
                     "meshcore.upstream.ring", "meshcore.admin")


@pytest.mark.skipif(_accel.load("h1parse") is None, reason="the pure build uses the pure twins")
def test_worker_imports_leave_out_what_it_never_uses():
    code = ("import sys, meshcore.worker, meshcore.io.dataplane; "
            "print(' '.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.split())
    assert "meshcore.io.dataplane" in loaded  # the probe itself worked
    assert sorted(m for m in NEVER_IN_A_WORKER if m in loaded) == []
