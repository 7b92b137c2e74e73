"""``python -m mpafer.cli ARGS`` = ``mpafer ARGS``: for machines where the package is on ``PYTHONPATH`` but its
console script is not installed (the GPU benchmark script), and for the processes ``mpafer train
--devices N`` starts under torchrun."""

from __future__ import annotations

import sys

from mpafer.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
