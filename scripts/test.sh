#!/usr/bin/env bash
# Build everything, then run the whole test suite (unit, compiled-extension, integration).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
