"""The PyTorch attention backend: varlen, causal or bidirectional, grouped-query heads.

This is the spec every other attention backend is tested against, and the backend that
runs on CPU. Sequences in the packed stream are grouped into length buckets; each
bucket is padded into one (n, H, Lmax, D) batch and handed to
`F.scaled_dot_product_attention(..., enable_gqa=True)`, then unpadded.

Why buckets. Measured on this 2-core CPU (torch 2.13, Hq=9, Hkv=3, D=64, forward plus
backward, milliseconds; one padded batch = every sequence padded to the longest):
                                  per-sequence loop   one padded batch   buckets (this file)
    64 x 10-60 tokens, causal            97                 36                 32
    256 x 5-40 tokens, causal           564                109                 85
    16 x 100-500 tokens, causal         139                262                140
    1 x 2000 + 32 x 50, causal          245               7760                201
    8 x 512 tokens, bidirectional       156                131                131 (one bucket)
Each SDPA call costs about 2 ms of fixed overhead (forward plus backward nodes), so
many short sequences want one padded batch; but padding to the longest sequence
costs n * Lmax^2 and explodes for mixed lengths. Bucketing sorted lengths with a cost
model (query-key pairs computed + a per-call overhead) is never worse than either: the
grouping of least cost, found exactly (plan_buckets), once per stream and reused by every
layer with the index tensors it needs (_stream_plan).

With `return_lse=True` the bucket runs an explicit fp32 math path (scores, mask,
logsumexp, softmax, PV) so that gradients also flow through the returned LSE, which
ring attention's merge differentiates. That path materialises (n, Hq, Lmax, Lmax)
scores: it is the spec, not a long-context kernel.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Fixed cost of one SDPA call (forward + backward) expressed in multiply-adds of
# query-key pairs times heads times head_dim: ~2.2 ms / ~0.135 ns per pair-head-dim,
# measured on the CPU above. Divided by Hq * D it gives the cost in query-key pairs.
_CALL_OVERHEAD_PAIR_HEAD_DIMS = 16_000_000
# plan_buckets' dynamic programme costs (distinct lengths)^2 / 2 steps of Python: 0.3 s at 2,000.
MAX_DISTINCT_LENGTHS = 512


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_seqlens: Tensor,
    max_seqlen: int | None,
    causal: bool,
    scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over each sequence of a packed stream; see the module docstring."""
    _check_inputs(q, k, v, cu_seqlens)
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    bounds = tuple(cu_seqlens.tolist())
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if lengths and max_seqlen is not None and max(lengths) > max_seqlen:
        raise ValueError(f"attention: max_seqlen={max_seqlen} is below the longest sequence ({max(lengths)})")

    overhead_pairs = _CALL_OVERHEAD_PAIR_HEAD_DIMS / (num_q_heads * head_dim)
    buckets, order = _stream_plan(bounds, overhead_pairs, q.device)
    outs, lses = [], []
    for bucket in buckets:
        out, lse = _attend_bucket(q, k, v, bucket, causal, scale, return_lse)
        outs.append(out)
        lses.append(lse)

    total = q.shape[0]
    if not buckets:  # no tokens at all
        out = q.new_zeros(q.shape)
        lse = q.new_full((num_q_heads, total), float("-inf"), dtype=torch.float32)
        return (out, lse) if return_lse else out
    if order is None:  # the buckets hold the stream in its own order (sequences sorted longest first)
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        lse = None if not return_lse else torch.cat(lses, dim=1) if len(lses) > 1 else lses[0]
        return (out, lse) if return_lse else out
    # `order` is a permutation of the stream (every token is in one sequence): no zero fill needed.
    out = q.new_empty(q.shape).index_copy(0, order, torch.cat(outs))  # (total, Hq, D)
    if not return_lse:
        return out
    lse = q.new_empty((num_q_heads, total), dtype=torch.float32).index_copy(1, order, torch.cat(lses, dim=1))
    return out, lse


@dataclass(frozen=True)
class _Bucket:
    """Sequences attended in one padded call: (n, H, Lmax, D), Lmax = lengths[0]."""

    lengths: list[int]  # longest first
    stream_index: Tensor  # (t,) the stream position of each of the bucket's tokens, sequence by sequence
    stream_slice: slice | None  # the same positions as a slice, when they are consecutive (no gather)
    padded_index: Tensor  # (t,) each token's row in the flattened (n * Lmax) padded batch
    key_valid: Tensor | None  # (n, Lmax) real keys, None when no sequence is padded


@functools.lru_cache(maxsize=16)
def _stream_plan(bounds: tuple[int, ...], overhead_pairs: float, device: torch.device):
    """The buckets of a stream (cu_seqlens as a tuple) and the stream position of each
    bucket-ordered token. Every layer of a forward sees the same stream: planned once, not per layer."""
    starts, lengths = bounds[:-1], [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    with torch.inference_mode(False):  # cached: must also serve later passes that save them for backward
        return _plan_stream(starts, lengths, overhead_pairs, device)


def _plan_stream(starts, lengths, overhead_pairs: float, device: torch.device):
    buckets = tuple(_bucket([starts[i] for i in chosen], [lengths[i] for i in chosen], device)
                    for chosen in plan_buckets(lengths, overhead_pairs))
    if not buckets:
        return buckets, None
    # Bucket order = stream order when the stream's sequences come longest first (a sorted encode
    # batch, one sequence, equal lengths): outputs are concatenated, not scattered back.
    slices = [b.stream_slice for b in buckets]
    in_order = all(s is not None for s in slices) and all(
        a.stop == b.start for a, b in zip(slices[:-1], slices[1:])) and slices[0].start == 0
    return buckets, None if in_order else torch.cat([b.stream_index for b in buckets])


def _bucket(starts: list[int], lengths: list[int], device: torch.device) -> _Bucket:
    num_seqs, padded_len = len(lengths), lengths[0]  # longest first
    lengths_t = torch.tensor(lengths, device=device)
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), lengths_t)
    first_token = torch.cumsum(lengths_t, 0) - lengths_t
    pos_in_seq = torch.arange(int(lengths_t.sum()), device=device) - first_token[seq_of_token]
    stream_index = torch.tensor(starts, device=device)[seq_of_token] + pos_in_seq
    padded_index = seq_of_token * padded_len + pos_in_seq
    key_valid = None
    if any(n != padded_len for n in lengths):
        key_valid = torch.arange(padded_len, device=device)[None, :] < lengths_t[:, None]
    consecutive = all(starts[i] + lengths[i] == starts[i + 1] for i in range(num_seqs - 1))
    stream_slice = slice(starts[0], starts[0] + sum(lengths)) if consecutive else None
    return _Bucket(lengths, stream_index, stream_slice, padded_index, key_valid)


def plan_buckets(lengths: list[int], overhead_pairs: float) -> list[list[int]]:
    """Group sequence indices (longest first) into buckets of least total cost.

    A bucket of n sequences padded to its longest, L, costs n * L^2 query-key pairs plus one
    call's overhead. Over the lengths sorted longest first the best grouping is contiguous, so
    a dynamic programme over the distinct lengths finds it exactly (best[j]: the cheapest
    grouping of the j longest distinct lengths). Greedy rules fail both ways: comparing one
    sequence's padding with a call's overhead let 16 queries of 30 tokens join 32 documents of
    100 (the demo step's joined towers: a third of its attention was padding). Empty sequences
    are left out: they have nothing to attend to.
    """
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    if not order:
        return []
    # The programme is quadratic in distinct lengths: beyond MAX_DISTINCT_LENGTHS it plans on
    # lengths rounded up to a coarser grid (the buckets still pad to their real longest).
    grid = -(-lengths[order[0]] // MAX_DISTINCT_LENGTHS)
    key = [-(-n // grid) * grid for n in lengths]
    distinct = sorted({key[i] for i in order}, reverse=True)
    count = {n: 0 for n in distinct}
    for i in order:
        count[key[i]] += 1
    seqs_before = [0]  # sequences among the j longest distinct lengths
    for n in distinct:
        seqs_before.append(seqs_before[-1] + count[n])
    best, cut = [0.0], [0]
    for j in range(1, len(distinct) + 1):
        cost, start = min(
            (best[i] + (seqs_before[j] - seqs_before[i]) * distinct[i] ** 2 + overhead_pairs, i) for i in range(j)
        )
        best.append(cost)
        cut.append(start)
    bounds, j = [], len(distinct)
    while j > 0:
        bounds.append((seqs_before[cut[j]], seqs_before[j]))
        j = cut[j]
    return [order[a:b] for a, b in reversed(bounds)]


def _attend_bucket(
    q: Tensor, k: Tensor, v: Tensor, bucket: _Bucket, causal: bool, scale: float, return_lse: bool,
) -> tuple[Tensor, Tensor | None]:
    """Attention for one bucket; returns (out (t, Hq, D), lse (Hq, t) or None) in bucket order."""
    num_seqs, padded_len = len(bucket.lengths), bucket.lengths[0]

    def to_padded(x: Tensor) -> Tensor:
        heads, dim = x.shape[1], x.shape[2]
        sliced = bucket.stream_slice
        rows = x[sliced] if sliced is not None else x.index_select(0, bucket.stream_index)
        if num_seqs == 1:
            return rows.reshape(1, padded_len, heads, dim).transpose(1, 2)
        padded = x.new_zeros(num_seqs * padded_len, heads, dim).index_copy(0, bucket.padded_index, rows)
        return padded.view(num_seqs, padded_len, heads, dim).transpose(1, 2)  # (n, H, Lmax, D)

    qp, kp, vp = to_padded(q), to_padded(k), to_padded(v)
    key_valid = bucket.key_valid
    if return_lse:
        out, lse = _math_attention_with_lse(qp, kp, vp, key_valid, causal, scale)
        lse = lse.permute(1, 0, 2).reshape(lse.shape[1], -1)[:, bucket.padded_index]  # (Hq, t)
    else:
        # Causal with right padding needs no key mask: a real query at position i only sees
        # keys j <= i < length, never a pad. Pad query rows produce values that are dropped.
        mask = None if (causal or key_valid is None) else key_valid[:, None, None, :]
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
        lse = None
    out = out.transpose(1, 2).reshape(num_seqs * padded_len, out.shape[1], out.shape[3])
    return out.index_select(0, bucket.padded_index), lse


def _math_attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale) v in fp32, returning the LSE; q (n, Hq, L, D), k/v (n, Hkv, L, D)."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)  # (n, Hq, L, D)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale  # (n, Hq, L, L)
    length = q.shape[2]
    allowed = torch.ones(length, length, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed[None, None]  # (1, 1, L, L)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (n, Hq, L); every row sees at least key 0
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.matmul(probs, v).to(q.dtype)  # (n, Hq, L, D)
    return out, lse


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            "attention: q, k, v must be (total, heads, head_dim); "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("attention: cu_seqlens must be a 1-D int32 tensor (num_seqs + 1,)")
    if int(cu_seqlens[-1]) != q.shape[0] or int(cu_seqlens[0]) != 0:
        raise ValueError(
            f"attention: cu_seqlens runs from {int(cu_seqlens[0])} to {int(cu_seqlens[-1])} "
            f"but the stream holds {q.shape[0]} tokens"
        )

