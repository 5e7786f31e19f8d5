#!/usr/bin/env bash
# Install everything (if needed) and serve the embedded default model on port 8000.
# Extra arguments go to `python -m server` (e.g. --model /path/to/model --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m server "$@"
