"""Embed (or rerank) many texts with an Ember model, over every rank of the job, with a progress bar.

Texts are tokenized once, sorted longest first (packed batches of similar lengths) and embedded a
block at a time: each block goes through engine.inference.encode_tokens, which shares it out over
the task's dp_group and gathers the rows, so every rank ends with every embedding. Rows are
L2-normalised, as sentence-transformers' mining asks its model for (normalize_embeddings=True).
An optional cache folder keeps the result as .npy, keyed by everything the vectors depend on.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
import torch.nn.functional as F

BATCHES_PER_BLOCK = 8  # forward passes per rank between two progress updates


def run_blocks(model, token_lists: list[list[int]], batch_size: int, desc: str,
               progress: bool = False) -> torch.Tensor:
    """The task's output for every sequence (embeddings, or reranker scores), in input order.
    model: an engine Embedder or Reranker (its task, with dp_group set under torchrun, and device)."""
    from tqdm import tqdm

    from engine.inference import encode_tokens

    group = model.task.dp_group
    ranks = 1 if group is None else torch.distributed.get_world_size(group)
    order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
    block = batch_size * ranks * BATCHES_PER_BLOCK
    rows: list[torch.Tensor | None] = [None] * len(token_lists)
    with tqdm(total=len(order), desc=desc, unit="text", disable=not progress) as bar:
        for start in range(0, len(order), block):
            index = order[start : start + block]
            out = encode_tokens(model.task, [token_lists[i] for i in index], batch_size, model.device)
            for row, i in enumerate(index):
                rows[i] = out[row]
            bar.update(len(index))
    return torch.stack(rows).float() if rows else torch.empty(0)


def embed_tokens(embedder, token_lists: list[list[int]], batch_size: int, desc: str,
                 progress: bool = False) -> np.ndarray:
    """(len(token_lists), hidden) float32, normalised rows, in input order."""
    return F.normalize(run_blocks(embedder, token_lists, batch_size, desc, progress), p=2, dim=1).numpy()


def cached(folder: str | None, key: str, compute, write: bool = True) -> np.ndarray:
    """compute() once per key: the array is kept in folder/embeddings_<sha256>.npy (plain .npy,
    read back with allow_pickle=False). write=False: read a hit, never store (ranks other than 0)."""
    if not folder:
        return compute()
    path = os.path.join(folder, f"embeddings_{hashlib.sha256(key.encode()).hexdigest()[:32]}.npy")
    if os.path.isfile(path):
        return np.load(path, allow_pickle=False)
    array = compute()
    if write:
        os.makedirs(folder, exist_ok=True)
        tmp = path + ".tmp.npy"
        np.save(tmp, array, allow_pickle=False)
        os.replace(tmp, path)  # a half-written file is never read as a hit
    return array


def cache_key(model_key: str, token_lists: list[list[int]]) -> str:
    """What the vectors depend on: the model (its folder and task settings: model_key) and the exact
    token ids (templates, EOS and truncation already applied)."""
    return repr((model_key, hashlib.sha256(repr(token_lists).encode()).hexdigest()))
