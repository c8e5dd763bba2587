"""Forward-only passes over many texts: embeddings for retrieval, scores for reranking.

Sequences are sorted by length (longest first) and packed `batch_size` at a time, so a batch of short
texts never pays for a long one; results come back in the caller's order.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import Tensor

from engine.data.batch import PackedSequences


def _batched(token_lists: list[list[int]], batch_size: int, share: tuple[int, int] = (0, 1)):
    """(indices, packed batch) in length order; share=(rank, ranks) keeps every ranks-th
    sequence of that order starting at rank, so each rank gets a similar mix of lengths."""
    rank, ranks = share
    # Longest first: each packed batch then lies in the order the attention buckets want (no
    # gather or scatter around them, engine/kernels/attention/reference.py), and the largest
    # batch, the memory peak, comes first.
    order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))[rank::ranks]
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield index, PackedSequences.from_token_lists([token_lists[i] for i in index])


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def run_packed(forward, token_lists: list[list[int]], batch_size: int, device: torch.device,
               autocast_dtype: torch.dtype | None = None, dp_group=None) -> Tensor:
    """forward(PackedSequences) -> (num_seqs, ...) for every text, in input order, on CPU as float32.

    With a data-parallel group the texts are shared out over its ranks (batch_size per forward
    on each) and the results gathered, so every rank returns all of them. Every rank makes the
    same number of forward calls, a rank short of texts repeating one and dropping the output:
    FSDP gathers parameters in each call, and all ranks of the group must take part.
    """
    if not token_lists:
        return torch.empty(0)
    ranks = 1 if dp_group is None else dist.get_world_size(dp_group)
    rank = 0 if dp_group is None else dist.get_rank(dp_group)
    mine = list(_batched(token_lists, batch_size, (rank, ranks)))
    largest_share = math.ceil(len(token_lists) / ranks)  # rank 0's
    rounds = math.ceil(largest_share / batch_size)
    filler = PackedSequences.from_token_lists([token_lists[0]])
    found: list[tuple[list[int], Tensor]] = []
    for r in range(rounds):
        index, packed = mine[r] if r < len(mine) else (None, filler)
        with _autocast(device, autocast_dtype):
            out = forward(packed.to(device)).float().cpu()
        if index is not None:
            found.append((index, out))
    if dp_group is not None:
        gathered: list = [None] * ranks
        dist.all_gather_object(gathered, found, group=dp_group)  # our own tensors, not user files
        found = [item for part in gathered for item in part]
    results: list[Tensor | None] = [None] * len(token_lists)
    for index, out in found:
        for row, i in enumerate(index):
            results[i] = out[row]
    return torch.stack(results)


def encode_tokens(task, token_lists, batch_size, device, autocast_dtype=None, encode=None) -> Tensor:
    """Every text through the task's encode_tower: (num_texts, hidden) embeddings from an
    EmbeddingTask, (num_texts,) scores from a RerankerTask. Dropout is off for the pass, and
    the task's mode is restored afterwards (evaluation runs mid-training). encode_tower, not
    embed/scores: it is the method a data-parallel (FSDP) model registers as a forward.
    `encode` replaces encode_tower where one rank does not hold the whole tower (a pipeline
    stage: engine.train.pipeline.PipelineSchedule.encode, the rows on every stage)."""
    was_training = task.training
    task.eval()
    try:
        return run_packed(encode or task.encode_tower, token_lists, batch_size, device, autocast_dtype,
                          dp_group=task.dp_group)
    finally:
        task.train(was_training)
