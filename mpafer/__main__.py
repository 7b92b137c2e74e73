"""``python -m mpafer``: the same command line as the ``mpafer`` console script (an entry point, like
those of the command-line package; it has to sit at the package's top)."""

import sys

from mpafer.cli import main

if __name__ == "__main__":
    sys.exit(main())
