"""Forward-only passes over many texts: embeddings for retrieval, scores for reranking.

Sequences are sorted by length and packed `batch_size` at a time, so a batch of short
texts never pays for a long one; results come back in the caller's order.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from engine.data.batch import PackedSequences


def _batched(token_lists: list[list[int]], batch_size: int):
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield index, PackedSequences.from_token_lists([token_lists[i] for i in index])


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def run_packed(forward, token_lists: list[list[int]], batch_size: int, device: torch.device,
               autocast_dtype: torch.dtype | None = None) -> Tensor:
    """forward(PackedSequences) -> (num_seqs, ...) for every text, in input order, on CPU as float32."""
    results: list[Tensor | None] = [None] * len(token_lists)
    for index, packed in _batched(token_lists, batch_size):
        with _autocast(device, autocast_dtype):
            out = forward(packed.to(device)).float().cpu()
        for row, i in enumerate(index):
            results[i] = out[row]
    if not results:
        return torch.empty(0)
    return torch.stack(results)


def _in_eval_mode(task, forward, token_lists, batch_size, device, autocast_dtype) -> Tensor:
    """Dropout off for the pass, then the task's previous mode back (evaluation runs mid-training)."""
    was_training = task.training
    task.eval()
    try:
        return run_packed(forward, token_lists, batch_size, device, autocast_dtype)
    finally:
        task.train(was_training)


def embed_tokens(task, token_lists, batch_size, device, autocast_dtype=None) -> Tensor:
    """(num_texts, hidden) embeddings from an EmbeddingTask."""
    # encode_tower, not embed: it is the method a data-parallel (FSDP) model registers as a forward.
    return _in_eval_mode(task, task.encode_tower, token_lists, batch_size, device, autocast_dtype)


def score_tokens(task, token_lists, batch_size, device, autocast_dtype=None) -> Tensor:
    """(num_texts,) scores from a RerankerTask."""
    return _in_eval_mode(task, task.encode_tower, token_lists, batch_size, device, autocast_dtype)
