#!/usr/bin/env python
"""Write the held-out face set (an independent renderer, ``mpafer.data.heldout``) as class folders.

Evidence only: evaluate the method on faces whose drawing code neither the tiny CLIP's pretraining nor
the demo ever used, e.g.

    .venv/bin/python scripts/make_heldout_faces.py --out /tmp/heldout
    .venv/bin/mpafer run --no-prefect --config configs/demo.yaml --set data.root=/tmp/heldout \\
        --set model.variant=coop

The tree is ``OUT/{train,test}/<class>/<nnnnn>.png`` (7 classes) plus a ``DONE`` marker; the same
arguments always give the same bytes, and a complete tree is reused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mpafer.data.heldout import generate_heldout  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder to write the class folders into")
    ap.add_argument("--train-per-class", type=int, default=60)
    ap.add_argument("--test-per-class", type=int, default=20)
    ap.add_argument("--image-size", type=int, default=72)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        root = generate_heldout(args.out, args.train_per_class, args.test_per_class, args.image_size, args.seed)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
