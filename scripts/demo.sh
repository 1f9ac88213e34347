#!/usr/bin/env bash
# Build everything, then run `python -m meshcore demo` with these arguments:
#   bash scripts/demo.sh                          list the seed article's scenarios
#   bash scripts/demo.sh retry                    start the retry scenario (Ctrl-C stops it)
#   bash scripts/demo.sh retry --walkthrough      perform the article's steps and compare
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m meshcore demo "$@"
