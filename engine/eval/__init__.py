"""Evaluation: trec_eval-exact retrieval metrics, TREC run files, embedding and reranker evaluation."""
from engine.eval.metrics import compute_metrics, rank_documents
from engine.eval.retrieval import EvalSet, build_eval_set, evaluate_embedding, evaluate_reranker
from engine.eval.trec import read_trec_run, write_trec_run

__all__ = [
    "EvalSet",
    "build_eval_set",
    "compute_metrics",
    "evaluate_embedding",
    "evaluate_reranker",
    "rank_documents",
    "read_trec_run",
    "write_trec_run",
]
