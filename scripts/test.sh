#!/usr/bin/env bash
# One command from a fresh clone: set up ./.venv (with the dev extra) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh dev
exec .venv/bin/python -m pytest -q "$@"
