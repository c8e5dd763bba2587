"""The text report of a mining run: what was found, how the scores lie, what each filter removed.

Printed at the end and written beside the output (OUTPUT minus .jsonl, plus .summary.txt). The
statistics table is sentence-transformers' (positive, negative and positive-minus-negative
scores over every (query, positive, negative) triple); the histograms share their bins, so the
gap between the positive and negative distributions shows at a glance.
"""
from __future__ import annotations

import os
from collections import Counter

import torch
from torch import Tensor

HISTOGRAM_BINS = 12
BAR_WIDTH = 30


def summary_path(output: str) -> str:
    root, ext = os.path.splitext(output)
    return (root if ext == ".jsonl" else output) + ".summary.txt"


def render(header: list[str], positive: list[Tensor], found: list[list[tuple[int, float]]],
           skipped: dict[str, tuple[int, float]], options: dict, notes: list[str]) -> str:
    """positive: per unique query, its positives' scores; found: per unique query, (corpus index,
    score) of its negatives."""
    lines = list(header)
    negative = [torch.tensor([score for _, score in row]) for row in found]
    counts = Counter(len(row) for row in found)
    lines.append("negatives per query: " + ", ".join(
        f"{k}: {counts[k]:,} quer{'y' if counts[k] == 1 else 'ies'}" for k in sorted(counts, reverse=True)))
    pos = torch.cat(positive) if positive else torch.empty(0)
    neg = torch.cat(negative) if negative else torch.empty(0)
    diff = torch.cat([(p.unsqueeze(1) - n.unsqueeze(0)).flatten() for p, n in zip(positive, negative)]) \
        if positive else torch.empty(0)
    lines += [""] + _table(pos, neg, diff) + [""] + _histogram(pos, neg)
    for name, (count, ratio) in skipped.items():
        lines.append(f"Skipped {count:,} potential negatives ({ratio:.2%}) due to the {name} of {options[name]}.")
    return "\n".join(lines + notes) + "\n"


def _table(pos: Tensor, neg: Tensor, diff: Tensor) -> list[str]:
    row = "{:<8} {:>14} {:>14} {:>14}"
    lines = [row.format("Metric", "Positive", "Negative", "Difference"),
             row.format("Count", f"{pos.numel():,}", f"{neg.numel():,}", "")]
    stats = [("Mean", torch.mean), ("Median", torch.median), ("Std", torch.std), ("Min", torch.min),
             ("25%", lambda s: torch.quantile(s, 0.25)), ("50%", lambda s: torch.quantile(s, 0.5)),
             ("75%", lambda s: torch.quantile(s, 0.75)), ("Max", torch.max)]
    for name, fn in stats:
        cells = [f"{float(fn(s.float())):.4f}" if s.numel() > (1 if name == "Std" else 0) else "-"
                 for s in (pos, neg, diff)]
        lines.append(row.format(name, *cells))
    return lines


def _histogram(pos: Tensor, neg: Tensor) -> list[str]:
    both = torch.cat([pos, neg]).float()
    if both.numel() == 0:
        return ["no scores to show"]
    low, high = float(both.min()), float(both.max())
    width = (high - low) / HISTOGRAM_BINS or 1.0
    bins = [torch.histc(s.float(), bins=HISTOGRAM_BINS, min=low, max=low + width * HISTOGRAM_BINS).long().tolist()
            if s.numel() else [0] * HISTOGRAM_BINS for s in (pos, neg)]
    top = max(max(bins[0]), max(bins[1]), 1)
    lines = [f"{'score':<17} {'positives':<{BAR_WIDTH + 8}} negatives"]
    for b in range(HISTOGRAM_BINS):
        start = low + b * width
        cells = [f"{'#' * round(BAR_WIDTH * c[b] / top):<{BAR_WIDTH}} {c[b]:>7,}" for c in bins]
        lines.append(f"[{start:+.3f}, {start + width:+.3f}) {cells[0]} {cells[1]}")
    return lines
