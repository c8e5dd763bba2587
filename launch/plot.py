"""Plot training curves: one PNG per quantity (loss, learning rate, gradient norm, tokens/s, every
evaluation metric), the runs side by side, one line each; prints the paths it wrote.

    python launch/plot.py outputs/demo                         # PNGs in outputs/demo/plots/
    python launch/plot.py outputs/run_a outputs/run_b --out outputs/compare

Each RUN is a folder launch/train.py wrote (it reads RUN/metrics.jsonl). Exit 2 with one line for
a folder without metrics.jsonl or a line of it that cannot be read.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.train.curves import CurvesError, plot_runs  # noqa: E402

# engine.cli.EXIT_USER_ERROR, not imported: engine.cli brings torch (2 s) to a script that needs none.
EXIT_USER_ERROR = 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch/plot.py", description="Training curves of runs side by side: one PNG per quantity.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (each holds metrics.jsonl)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for the PNGs (default: the first RUN's plots/)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)  # argparse itself exits 2 with its usage line on bad arguments
    out = args.out or os.path.join(args.runs[0], "plots")
    try:
        paths = plot_runs(args.runs, out)
    except CurvesError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
