#!/usr/bin/env bash
# Download the wheels that scripts/gpu_bench.sh installs on the bare GPU image (Python 3.12, x86-64),
# into the git-ignored folder .whl/ (add "/.whl/" to .git/info/exclude). Versions follow this venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=".venv/bin/python"
ver() { "$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
mkdir -p .whl
pkgs=()
for p in open_clip_torch ftfy wcwidth pydantic pydantic_core annotated-types typing-inspection diskcache; do
  v="$(ver "$p")"; [ -n "$v" ] || { echo "not installed in .venv: $p" >&2; exit 1; }
  pkgs+=("$p==$v")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${pkgs[@]}"
ls .whl
