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
