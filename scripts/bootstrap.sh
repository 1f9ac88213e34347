#!/usr/bin/env bash
# Create .venv (if needed) and install meshcore editable with its test and bench extras; the Cython
# extensions in ext/ are compiled in place as meshcore/_ext/*.so. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,bench]"
.venv/bin/python -c "import meshcore._accel as a, sys; missing=[m for m in ('h1parse','h1conn','pool','shmatomic','ring','loop') if a.load(m) is None]; sys.exit('meshcore: extensions not built: %s' % missing if missing else 0)"
