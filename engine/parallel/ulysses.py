"""Ulysses sequence parallelism: all-to-all between sequence shards and head shards.

Each of U ranks holds T/U tokens (in rank order) with all heads. Before attention one
all-to-all gives every rank all T tokens for H/U of the heads, so attention itself runs
unchanged (varlen over the global cu_seqlens); after it, the inverse all-to-all returns each
rank its own tokens with all heads. Each all-to-all moves (U-1)/U of the rank's tensor.

    seq_to_heads:  (T/U, H, D) -> (T, H/U, D)        backward: heads_to_seq
    heads_to_seq:  (T, H/U, D) -> (T/U, H, D)        backward: seq_to_heads

KV heads fewer than U are repeated first (expand_kv_heads), so each rank gets whole KV heads;
the repeat's backward sums the copies' gradients.

Training wires it in through engine/parallel/context.py (ContextParallel), which also runs ring
attention inside it for the hybrid layout (Ulysses inside, ring outside, as USP does).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch.distributed as dist
from torch import Tensor

from engine.parallel.collectives import all_to_all_chunks, mapped
from engine.kernels.attention import attention


def _seq_to_heads(x: Tensor, group) -> Tensor:
    ranks = dist.get_world_size(group)
    tokens, heads, dim = x.shape
    if heads % ranks:
        raise ValueError(f"Ulysses: {heads} heads do not split over {ranks} ranks")
    chunks = x.reshape(tokens, ranks, heads // ranks, dim).transpose(0, 1)  # (U, T/U, H/U, D) by head group
    return all_to_all_chunks(chunks, group).reshape(tokens * ranks, heads // ranks, dim)  # rank order = token order


def _heads_to_seq(x: Tensor, group) -> Tensor:
    ranks = dist.get_world_size(group)
    tokens, heads, dim = x.shape
    if tokens % ranks:
        raise ValueError(f"Ulysses: {tokens} tokens do not split over {ranks} ranks")
    chunks = x.reshape(ranks, tokens // ranks, heads, dim)  # (U, T/U, H/U, D) by token shard
    mine = all_to_all_chunks(chunks, group)  # chunk j: head group j of this rank's tokens
    return mine.transpose(0, 1).reshape(tokens // ranks, heads * ranks, dim)


def seq_to_heads(x: Tensor, group) -> Tensor:
    """(T/U, H, D) this rank's tokens, all heads -> (T, H/U, D) all tokens, this rank's heads."""
    return mapped(x, partial(_seq_to_heads, group=group), partial(_heads_to_seq, group=group))


def heads_to_seq(x: Tensor, group) -> Tensor:
    """(T, H/U, D) all tokens, this rank's heads -> (T/U, H, D) this rank's tokens, all heads."""
    return mapped(x, partial(_heads_to_seq, group=group), partial(_seq_to_heads, group=group))


def expand_kv_heads(kv: Tensor, ranks: int) -> Tensor:
    """(T, Hkv, D) with Hkv < ranks: each KV head repeated ranks/Hkv times, in place of its
    group, so rank r's query heads find their KV head on rank r. Unchanged when Hkv >= ranks."""
    heads = kv.shape[1]
    if heads >= ranks:
        if heads % ranks:
            raise ValueError(f"Ulysses: {heads} KV heads do not split over {ranks} ranks")
        return kv
    if ranks % heads:
        raise ValueError(f"Ulysses: {heads} KV heads cannot be shared out evenly over {ranks} ranks")
    return kv.repeat_interleave(ranks // heads, dim=1)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, *, group, cu_seqlens: Tensor | None = None,
                      max_seqlen: int | None = None, causal: bool = True, scale: float | None = None,
                      attend: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """Attention over the whole packed stream for tokens held in U shards.

    q (T/U, Hq, D), k/v (T/U, Hkv, D): this rank's tokens. `attend(q, k, v)` computes attention
    over all T tokens for this rank's heads (ring attention in the hybrid layout); by default the
    kernels dispatcher over cu_seqlens/max_seqlen (the whole stream). Returns (T/U, Hq, D).
    """
    if attend is None:
        attend = partial(_whole_stream_attention, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, causal=causal,
                         scale=scale)
    ranks = dist.get_world_size(group)
    q_heads = seq_to_heads(q, group)
    k_heads = seq_to_heads(expand_kv_heads(k, ranks), group)
    v_heads = seq_to_heads(expand_kv_heads(v, ranks), group)
    return heads_to_seq(attend(q_heads, k_heads, v_heads), group)


def _whole_stream_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    return attention(q, k, v, **kwargs)
