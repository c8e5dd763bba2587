"""Training curves: read runs' metrics.jsonl and draw one PNG per quantity, the runs side by side.

The file is what engine/train/logger.py writes: one JSON object per line, each with a "step";
training lines carry the keys of TRAIN_QUANTITIES (trainer.train_step plus tokens_per_s), evaluation
lines carry "eval/<metric>" (trainer.evaluate). launch/plot.py is the command line.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

METRICS_FILE = "metrics.jsonl"
EVAL_PREFIX = "eval/"
# The training keys worth a figure, in the order they are drawn, with their axis titles.
# "tokens" (per step) is left out: tokens_per_s already shows throughput.
TRAIN_QUANTITIES = {"loss": "loss", "lr": "learning rate", "grad_norm": "gradient norm", "tokens_per_s": "tokens/s"}
FIGSIZE_INCHES = (8.0, 4.5)
DPI = 100  # with FIGSIZE_INCHES: 800 x 450 pixels, what the tests check
MARKERS_UP_TO = 50  # a curve with this few points also marks each one (evaluations are often 2-3 points)


class CurvesError(ValueError):
    """A run folder or metrics file that cannot be plotted; the message is one line naming it."""


@dataclass
class Run:
    name: str  # the legend label
    curves: dict[str, tuple[list[int], list[float]]]  # key -> (steps, values), steps ascending


def read_metrics(path: str) -> list[dict]:
    """Every record of a metrics file; a line that is not a JSON object with an integer step is an error."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")  # not splitlines(): line numbers as an editor counts them
    except UnicodeDecodeError:
        raise CurvesError(f"{path}: not UTF-8 text, so not a metrics file") from None
    except OSError as err:
        raise CurvesError(f"{path}: cannot read ({err.strerror})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CurvesError(f"{path}:{number}: not JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise CurvesError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise CurvesError(f"{path}:{number}: no integer \"step\" (got {step!r})")
        records.append(record)
    if not records:
        raise CurvesError(f"{path}: empty, no metrics lines (has the run logged a step yet?)")
    return records


def plotted_key(key: str) -> bool:
    return key in TRAIN_QUANTITIES or key.startswith(EVAL_PREFIX)


def curves_of(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """key -> (steps, values). A later line for the same step wins (a resumed run rewrote it);
    null (the logger's non-finite value) becomes NaN, a gap in the line."""
    by_key: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if not plotted_key(key):
                continue
            if value is None:
                value = math.nan
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # not a number: nothing to draw
            by_key.setdefault(key, {})[record["step"]] = float(value)
    return {key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in by_key.items()}


def load_run(run_dir: str, name: str) -> Run:
    if not os.path.isdir(run_dir):
        raise CurvesError(f"{run_dir}: no such run folder")
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise CurvesError(f"{run_dir}: no {METRICS_FILE} (not a folder written by launch/train.py?)")
    curves = curves_of(read_metrics(path))
    if not curves:
        raise CurvesError(f"{path}: no quantity to plot ({', '.join(TRAIN_QUANTITIES)} or {EVAL_PREFIX}*)")
    return Run(name, curves)


def run_names(run_dirs: list[str]) -> list[str]:
    """The folder names; the paths as given where two folders share a name (a/run, b/run)."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(set(names)) < len(names):
        return [os.path.normpath(d) for d in run_dirs]
    return names


def quantities(runs: list[Run]) -> list[str]:
    """Training quantities in TRAIN_QUANTITIES order, then every eval metric in the order first seen."""
    seen = [key for run in runs for key in run.curves]
    evals = list(dict.fromkeys(key for key in seen if key.startswith(EVAL_PREFIX)))
    return [key for key in TRAIN_QUANTITIES if key in seen] + evals


def file_name(key: str) -> str:
    """eval/mrr@10 -> eval_mrr_at_10.png: no folders, nothing a shell quotes."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key.replace("@", "_at_")) + ".png"


def draw(key: str, runs: list[Run], path: str) -> None:
    # The Agg canvas directly, not pyplot: no display, no global figure state, no backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    title = TRAIN_QUANTITIES.get(key, key)
    figure = Figure(figsize=FIGSIZE_INCHES, dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for run in runs:
        if key not in run.curves:
            continue
        steps, values = run.curves[key]
        # matplotlib leaves labels that start with "_" out of the legend; a space keeps a folder "_x" in.
        label = f" {run.name}" if run.name.startswith("_") else run.name
        axes.plot(steps, values, label=label, marker="o" if len(steps) <= MARKERS_UP_TO else None,
                  markersize=3)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 1.5 on a short run
    axes.set_ylabel(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)


def plot_runs(run_dirs: list[str], out_dir: str) -> list[str]:
    """One PNG per quantity under out_dir, one line per run; the paths written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CurvesError("matplotlib is not installed (requirements.lock pins it: make install)") from None
    runs = [load_run(d, name) for d, name in zip(run_dirs, run_names(run_dirs))]
    written = []
    try:
        os.makedirs(out_dir, exist_ok=True)
        for key in quantities(runs):
            path = os.path.join(out_dir, file_name(key))
            draw(key, runs, path)
            written.append(path)
    except OSError as err:
        raise CurvesError(f"--out {out_dir}: cannot write ({err.strerror or err})") from None
    return written
