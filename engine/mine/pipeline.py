"""A mining run from examples to negatives: encode, search, exclude, filter, veto, take.

Every rank of a job runs all of it: the encodings are shared out and gathered (engine/mine/
encode.py), the search and the selection are repeated (cheap, and identical on every rank since
the seed is), the reranker's pairs are shared out again. Only rank 0 writes (launch/mine.py).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine.data.example import Example
from engine.mine.corpus import MiningSet, build_mining_set
from engine.mine.encode import cache_key, cached, embed_tokens
from engine.mine.options import MineOptions, resolved_range_max
from engine.mine.rerank import reranker_drops
from engine.mine.search import faiss_or_none, top_candidates
from engine.mine.select import NEG_INF, apply_filters, exclude_known, lowest_positive, take_negatives


@dataclass
class MiningResult:
    mset: MiningSet
    found: list[list[tuple[int, float]]]  # per unique query: (corpus index, embedder score), best first
    positive_scores: list[Tensor]  # per unique query, aligned with mset.positives
    skipped: dict[str, tuple[int, float]]  # filter -> (candidates skipped, ratio)
    range_max: int
    search: str  # "faiss" or "exact"
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def mine(examples: list[Example], embedder, o: MineOptions, *, model_key: str = "", extra=(),
         reranker=None, progress: bool = False, write_cache: bool = True) -> MiningResult:
    mset = build_mining_set(examples, extra)
    range_max = resolved_range_max(o, mset.max_positives)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    corpus, queries = _embeddings(embedder, mset, o, model_key, progress, write_cache)
    seconds["encode"] = time.perf_counter() - start
    start = time.perf_counter()
    faiss = faiss_or_none(o.use_faiss)
    # range_max survivors are needed after excluding up to max_positives positives and the query itself.
    scores, indices = top_candidates(queries, corpus, range_max + mset.max_positives + 1, faiss,
                                     o.faiss_batch_size, progress)
    corpus_t, queries_t = torch.as_tensor(corpus), torch.as_tensor(queries)
    positive_scores = [(queries_t[q] * corpus_t[row]).sum(-1) for q, row in enumerate(mset.positives)]
    exclude_known(scores, indices, mset)
    skipped = apply_filters(scores, lowest_positive(positive_scores), o)
    seconds["search"] = time.perf_counter() - start
    notes = []
    if reranker is not None:
        start = time.perf_counter()
        notes.append(_veto(reranker, mset, scores, indices, o, range_max, progress))
        seconds["rerank"] = time.perf_counter() - start
    neg_scores, neg_indices = take_negatives(scores, indices, o, range_max, random.Random(o.seed))
    found = [[(int(i), float(s)) for i, s in zip(row_i, row_s) if s != NEG_INF]
             for row_i, row_s in zip(neg_indices.tolist(), neg_scores.tolist())]
    return MiningResult(mset, found, positive_scores, skipped, range_max, "faiss" if faiss else "exact",
                        notes, seconds)


def _embeddings(embedder, mset: MiningSet, o: MineOptions, model_key: str, progress: bool, write_cache: bool):
    te = embedder.text_encoder
    doc_tokens = te.documents(mset.corpus)
    query_tokens = te.queries(mset.queries, mset.prompts)
    corpus = cached(o.cache_folder, cache_key(model_key, doc_tokens),
                    lambda: embed_tokens(embedder, doc_tokens, o.batch_size, "Encoding the corpus", progress),
                    write_cache)
    queries = cached(o.cache_folder, cache_key(model_key, query_tokens),
                     lambda: embed_tokens(embedder, query_tokens, o.batch_size, "Encoding the queries", progress),
                     write_cache)
    return corpus, queries


def _veto(reranker, mset, scores: Tensor, indices: Tensor, o: MineOptions, range_max: int, progress: bool) -> str:
    """Drop what the reranker scores above the positive (in place); say how many, and how many of
    them the embedder alone would have chosen."""
    drops = reranker_drops(reranker, mset, scores, indices, o.reranker_margin, o.reranker_batch_size, progress)
    _, would_take = take_negatives(scores.clone(), indices, o, range_max, random.Random(o.seed))
    dropped_ids = indices.masked_fill(~drops, -2)
    chosen = sum(len(set(a) & set(b) - {-1, -2}) for a, b in zip(would_take.tolist(), dropped_ids.tolist()))
    live = int((scores != NEG_INF).sum())
    scores[drops] = NEG_INF
    return (f"Reranker: dropped {int(drops.sum()):,} of {live:,} candidates it scored above their query's positive"
            f"{f' minus {o.reranker_margin}' if o.reranker_margin else ''} (likely false negatives); "
            f"{chosen:,} of them would have been chosen without it.")
