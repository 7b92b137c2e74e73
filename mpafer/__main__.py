"""``python -m mpafer``: the same command line as the ``mpafer`` console script."""

import sys

from mpafer.cli import main

if __name__ == "__main__":
    sys.exit(main())
