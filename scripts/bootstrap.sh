#!/usr/bin/env bash
# Create (or reuse) ./.venv and install mpafer with its pinned torch pair. Idempotent.
# Usage: scripts/bootstrap.sh [extra]   (extra: "dev" adds pytest, ruff, hypothesis)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${MPAFER_VENV:-.venv}"
EXTRA="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.mpafer-installed${EXTRA:+-$EXTRA}"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  # torch/torchvision pinned as a pair (open_clip needs torchvision); CPU or CUDA wheels both work.
  "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  "$VENV/bin/python" -m pip install -q -e ".${EXTRA:+[$EXTRA]}"
  touch "$STAMP"
fi
