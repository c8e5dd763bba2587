"""Pooling of packed hidden states into one vector per sequence (last token, mean, first token)."""
from __future__ import annotations

import torch
from torch import Tensor


def pool(hidden: Tensor, cu_seqlens: Tensor, mode: str) -> Tensor:
    """hidden (total_tokens, H) of packed sequences -> (num_seqs, H)."""
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    if mode == "last":
        # The collator appends EOS after truncation, so the last token is always a real end token.
        return hidden[ends - 1]
    if mode == "cls":
        return hidden[starts]
    if mode == "mean":
        lengths = (ends - starts).to(hidden.dtype)
        seq_index = torch.repeat_interleave(
            torch.arange(len(lengths), device=hidden.device), (ends - starts)
        )
        sums = hidden.new_zeros(len(lengths), hidden.shape[-1]).index_add_(0, seq_index, hidden)
        return sums / lengths[:, None]
    raise ValueError(f"task.pooling={mode!r} is not one of last, mean, cls")


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
