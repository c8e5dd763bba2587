"""The reranker's veto on mined candidates: a candidate a cross-encoder scores above the query's
positive is more likely an unlabelled positive than a hard negative, so it is dropped.

Only candidates still alive after the embedder's filters are scored (one reranker pass over every
(query, candidate) pair, plus every (query, positive) pair), so the veto costs queries x window
pairs at most. The bar is the query's lowest positive score, as for the margins, minus
mine.reranker_margin. Ordering and selection stay the embedder's: the reranker only removes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from engine.mine.corpus import MiningSet
from engine.mine.encode import run_blocks
from engine.mine.select import NEG_INF


def reranker_drops(reranker, mset: MiningSet, scores: Tensor, indices: Tensor, margin: float,
                   batch_size: int, progress: bool = False) -> Tensor:
    """A (queries, window) mask of the live candidates the reranker scores above the positive."""
    alive = (scores != NEG_INF).nonzero().tolist()
    pos_pairs = [(q, i) for q, row in enumerate(mset.positives) for i in row]
    cand_pairs = [(q, int(indices[q, j])) for q, j in alive]
    pairs = pos_pairs + cand_pairs
    tokens = reranker.text_encoder.pairs([mset.queries[q] for q, _ in pairs], [mset.corpus[i] for _, i in pairs],
                                         [mset.prompts[q] for q, _ in pairs])
    out = run_blocks(reranker, tokens, batch_size, "Rescoring with the reranker", progress)
    bar = torch.full((len(mset.queries),), float("inf"))
    for (q, _), score in zip(pos_pairs, out[: len(pos_pairs)].tolist()):
        bar[q] = min(bar[q], score)
    drops = torch.zeros_like(scores, dtype=torch.bool)
    for (q, j), score in zip(alive, out[len(pos_pairs) :].tolist()):
        drops[q, j] = score > bar[q] - margin
    return drops
