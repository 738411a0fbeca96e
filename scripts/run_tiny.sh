#!/usr/bin/env bash
# The main job: set up, then run the whole `tiny` pipeline (CPU) end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p runs
exec .venv/bin/r1flow run tiny --summary-json runs/tiny-summary.json "$@"
