"""Retrieval metrics (MRR@k, nDCG@k, Recall@k, MAP) computed exactly as trec_eval computes them.

A run maps query id -> {doc id: score}; qrels map query id -> {doc id: relevance}. Every
judged query of the qrels counts in the average (relevant documents or not), and one the run
does not answer scores 0 (trec_eval's `-c`). Ranking follows trec_eval: score descending,
ties by doc id descending (it compares doc ids with strcmp). Tests pin every number to
pytrec_eval; docs/evaluation.md has the formulas.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]


class MetricsInputError(ValueError):
    """The metric arguments cannot be evaluated (a bad cut-off)."""


def rank_documents(scores: Mapping[str, float]) -> list[str]:
    """Doc ids best first, in trec_eval's order: score descending, then doc id descending."""
    # Two stable sorts: the secondary key first. Python compares str by code point, which is
    # the byte order of their UTF-8 encodings, so this is strcmp's order.
    by_doc_id = sorted(scores, reverse=True)
    return sorted(by_doc_id, key=lambda doc: scores[doc], reverse=True)


def compute_metrics(run: Run, qrels: Qrels, ks: Iterable[int] = (1, 10)) -> dict[str, float]:
    """Mean over the queries of `qrels` of mrr@k, ndcg@k, recall@k (each k) and map."""
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise MetricsInputError(f"metric cut-offs must be positive integers, got {ks}")
    names = [f"{metric}@{k}" for k in ks for metric in ("mrr", "ndcg", "recall")] + ["map"]
    totals = dict.fromkeys(names, 0.0)
    # A query id with no judgments at all is not a query of a qrels file, as trec_eval sees it.
    judged_queries = {qid: judged for qid, judged in qrels.items() if judged}
    for qid, judged in judged_queries.items():
        ranking = rank_documents(run.get(qid, {}))
        for name, value in query_metrics(ranking, judged, ks).items():
            totals[name] += value
    num_queries = max(len(judged_queries), 1)
    return {name: total / num_queries for name, total in totals.items()}


def query_metrics(ranking: list[str], judged: Mapping[str, int], ks: list[int]) -> dict[str, float]:
    """All metrics of one query; `ranking` is best first, `judged` its qrels (rel >= 1 relevant)."""
    relevant = {doc for doc, rel in judged.items() if rel >= 1}
    hits = [doc in relevant for doc in ranking]  # hits[r] = the doc at rank r+1 is relevant
    out = {"map": average_precision(hits, len(relevant))}
    for k in ks:
        out[f"mrr@{k}"] = reciprocal_rank(hits[:k])
        out[f"ndcg@{k}"] = ndcg(ranking[:k], judged, k)
        out[f"recall@{k}"] = sum(hits[:k]) / len(relevant) if relevant else 0.0
    return out


def reciprocal_rank(hits: list[bool]) -> float:
    return next((1.0 / (rank + 1) for rank, hit in enumerate(hits) if hit), 0.0)


def average_precision(hits: list[bool], num_relevant: int) -> float:
    """Sum of precision at each relevant rank, over all relevant docs (unretrieved ones add 0)."""
    if num_relevant == 0:
        return 0.0
    found, total = 0, 0.0
    for rank, hit in enumerate(hits):
        if hit:
            found += 1
            total += found / (rank + 1)
    return total / num_relevant


def ndcg(top_k: list[str], judged: Mapping[str, int], k: int) -> float:
    """trec_eval's ndcg_cut: linear gain = rel (gains <= 0 add nothing), discount log2(rank + 1)."""
    dcg = _dcg(max(judged.get(doc, 0), 0) for doc in top_k)
    ideal = _dcg(sorted((rel for rel in judged.values() if rel > 0), reverse=True)[:k])
    return dcg / ideal if ideal > 0 else 0.0


def _dcg(gains: Iterable[int]) -> float:
    return sum(gain / math.log2(rank + 2) for rank, gain in enumerate(gains))
