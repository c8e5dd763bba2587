"""Pooling of packed hidden states into one vector per sequence (last token, mean, first token)."""
from __future__ import annotations

import torch
from torch import Tensor


def pool(hidden: Tensor, cu_seqlens: Tensor, mode: str) -> Tensor:
    """hidden (total_tokens, H) of packed sequences -> (num_seqs, H).

    last: the collator appends EOS after truncation, so the last token is a real end token."""
    return pool_rows(hidden, torch.arange(hidden.shape[0], device=hidden.device), cu_seqlens, mode)


def pool_rows(hidden: Tensor, rows: Tensor, cu_seqlens: Tensor, mode: str) -> Tensor:
    """Pooling from some rows of a packed stream: hidden (r, H) holds the stream's rows `rows` (r,).
    -> (num_seqs, H), the share of pool() over the whole stream these rows
    give: the pooled row where this part holds it (else zeros), partial sums for mean. Parts that
    together hold every row once sum to pool(): how context-parallel ranks pool their own tokens
    without rebuilding the whole stream."""
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    rows = rows.long()
    seq = torch.searchsorted(ends, rows, right=True)  # (r,) the sequence of each row
    out = hidden.new_zeros(len(starts), hidden.shape[-1])
    if mode in ("last", "cls"):
        picked = rows == (ends[seq] - 1 if mode == "last" else starts[seq])
        return out.index_copy(0, seq[picked], hidden[picked])
    if mode == "mean":
        lengths = (ends - starts).to(hidden.dtype)
        return out.index_add(0, seq, hidden) / lengths[:, None]
    raise ValueError(f"task.pooling={mode!r} is not one of last, mean, cls")


def vector_prefix(vectors: Tensor, dim: int, normalize: bool) -> Tensor:
    """The first `dim` dimensions of each row, renormalised when the model normalises: a Matryoshka
    vector (training, evaluation and the export's truncate_dim all mean this)."""
    prefix = vectors[:, :dim]
    return torch.nn.functional.normalize(prefix, dim=-1) if normalize else prefix
