#!/usr/bin/env bash
# One command from a fresh clone: set up ./.venv and run the demo (CPU, no network, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/mpafer demo "$@"
