#!/usr/bin/env bash
# Build everything, then start the demo pods and the proxy on examples/demo (Ctrl-C stops both).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m meshcore demo --workers "${WORKERS:-2}" "$@"
