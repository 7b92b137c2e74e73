"""``python -m mpafer.bench <benchmark> [options]`` = ``mpafer bench <benchmark> [options]``.

For machines where the package is on ``PYTHONPATH`` but its console script is not installed (the GPU
benchmark script, scripts/gpu_bench.sh).
"""

from __future__ import annotations

import sys


def _main(argv: list[str]) -> int:
    from mpafer.cli import main

    return main(["bench", *argv])


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
