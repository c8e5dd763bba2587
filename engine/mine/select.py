"""Which candidates become negatives: sentence-transformers' `mine_hard_negatives` rules, step by step.

The spec is sentence_transformers/util/hard_negatives.py (v6.3); the tensor operations are the same
ones in the same order, so ties and the random sampler's draws come out as they do there:

1. exclude: padding (index -1), the query's own text, and the query's positives (score -> -inf);
2. filter, in this order, each setting -inf: absolute_margin and relative_margin against the
   query's *lowest* positive score (the harder positive), then max_score, then min_score;
3. take: torch.topk of range_max candidates (survivors first, best first), drop the first
   range_min, then the first num_negatives ("top") or num_negatives drawn with
   random.sample over the surviving ones ("random", re-sorted by score).

A row whose survivors run out ends in -inf entries: "not found", left out of the output.
"""
from __future__ import annotations

import random

import torch
from torch import Tensor

from engine.mine.corpus import MiningSet
from engine.mine.options import MineOptions

NEG_INF = -float("inf")


def exclude_known(scores: Tensor, indices: Tensor, mset: MiningSet) -> None:
    """Padding, the query itself and its positives are never negatives (in place)."""
    scores[indices == -1] = NEG_INF
    scores[indices == torch.tensor(mset.query_in_corpus).unsqueeze(1)] = NEG_INF
    # Each (query, positive) pair as one integer key; a candidate is a positive when its key is one.
    stride = len(mset.corpus) + 1  # +1: index -1 (padding) gets a key of its own
    owner = torch.tensor([q for q, row in enumerate(mset.positives) for _ in row])
    flat = torch.tensor([i for row in mset.positives for i in row])
    positive_keys = (owner * stride + flat + 1).sort().values
    candidate_keys = torch.arange(len(mset.queries)).unsqueeze(1) * stride + indices + 1
    at = torch.searchsorted(positive_keys, candidate_keys).clamp(max=len(positive_keys) - 1)
    scores[positive_keys[at] == candidate_keys] = NEG_INF


def lowest_positive(positive_scores: list[Tensor]) -> Tensor:
    """Per query, the score of its hardest positive: the margins are measured from it."""
    return torch.stack([row.min() for row in positive_scores])


def apply_filters(scores: Tensor, lowest: Tensor, o: MineOptions) -> dict[str, tuple[int, float]]:
    """The margin and score filters (in place); {option: (candidates skipped, ratio)} as
    sentence-transformers reports them (the ratio's denominator shrinks after each margin)."""
    skipped: dict[str, tuple[int, float]] = {}
    remaining = scores.numel()
    per_row = lowest.unsqueeze(1).expand_as(scores)
    if o.absolute_margin is not None:
        remaining -= _drop(scores, scores + o.absolute_margin > per_row, "absolute_margin", skipped, remaining)
    if o.relative_margin is not None:
        # |positive| * margin below the positive: (1 - margin) * positive would raise the bar for
        # negative positive scores (sentence-transformers #3819).
        threshold = per_row - per_row.abs() * o.relative_margin
        remaining -= _drop(scores, scores > threshold, "relative_margin", skipped, remaining)
    if o.max_score is not None:
        _drop(scores, scores > o.max_score, "max_score", skipped, remaining)
    if o.min_score is not None:
        _drop(scores, (scores < o.min_score) & (scores != NEG_INF), "min_score", skipped, remaining)
    return skipped


def _drop(scores: Tensor, mask: Tensor, name: str, skipped: dict, remaining: int) -> int:
    scores[mask] = NEG_INF
    count = int(mask.sum())
    if count:
        skipped[name] = (count, count / remaining)
    return count


def take_negatives(scores: Tensor, indices: Tensor, o: MineOptions, range_max: int,
                   rng: random.Random) -> tuple[Tensor, Tensor]:
    """(scores, corpus indices) of each query's negatives, (queries, num_negatives), best first;
    -inf scores mark places no candidate survived for."""
    rows = torch.arange(scores.size(0)).unsqueeze(-1)
    scores, local = torch.topk(scores, k=range_max, dim=1)
    indices = indices[rows, local]
    if o.range_min:
        scores, indices = scores[:, o.range_min :], indices[:, o.range_min :]
    if o.sampling_strategy == "top":
        return scores[:, : o.num_negatives], indices[:, : o.num_negatives]
    # random: draw among the survivors where there are enough (else -inf places are drawn too).
    options = (indices.size(1) - scores.isinf().sum(1)).clamp(min=o.num_negatives)
    drawn = [rng.sample(range(int(n)), k=o.num_negatives) for n in options]
    scores, indices = scores[rows, drawn], indices[rows, drawn]
    scores, local = scores.sort(dim=1, descending=True)
    return scores, indices[rows, local]
