"""Evaluate a task model on held-out examples: embed and rank the corpus, or rerank candidates."""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine.eval.retrieval import evaluate_embedding, evaluate_reranker
from engine.inference import encode_tokens


def evaluate_task(task, text_encoder, examples, cfg, device: torch.device, autocast_dtype=None,
                  save_run: str | None = None, encode=None) -> dict[str, float]:
    """encode: what runs a packed batch where encode_tower cannot (a pipeline stage), see encode_tokens."""
    batch_size, ks = cfg.eval.batch_size, tuple(cfg.eval.k)
    if cfg.eval.max_queries:
        examples = examples[: cfg.eval.max_queries]
    if cfg.task.type == "embedding":
        def encode_queries(batch):
            tokens = text_encoder.queries([e.query for e in batch], [e.prompt for e in batch])
            return encode_tokens(task, tokens, batch_size, device, autocast_dtype, encode)

        def encode_documents(texts):
            return encode_tokens(task, text_encoder.documents(texts), batch_size, device, autocast_dtype, encode)

        return evaluate_embedding(encode_queries, encode_documents, examples, ks=ks, save_run=save_run,
                                  batch_size=batch_size * _dp_size(task), prefix_dims=list(cfg.task.matryoshka_dims),
                                  normalize=cfg.task.normalize)

    def score_pairs(batch, documents):
        tokens = text_encoder.pairs([e.query for e in batch], documents, [e.prompt for e in batch])
        return encode_tokens(task, tokens, batch_size, device, autocast_dtype, encode)

    return evaluate_reranker(score_pairs, examples, ks=ks, save_run=save_run, batch_size=batch_size * _dp_size(task))


def _dp_size(task) -> int:
    """Texts handed to the encoders per call: eval.batch_size for each data-parallel rank, which
    share them out (engine.inference.run_packed), so each forward still holds eval.batch_size."""
    return 1 if task.dp_group is None else dist.get_world_size(task.dp_group)
