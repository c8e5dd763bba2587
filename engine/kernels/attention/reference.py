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
model (query-key pairs computed + a per-call overhead) is never worse than either.

With `return_lse=True` the bucket runs an explicit fp32 math path (scores, mask,
logsumexp, softmax, PV) so that gradients also flow through the returned LSE, which
ring attention's merge differentiates. That path materialises (n, Hq, Lmax, Lmax)
scores: it is the spec, not a long-context kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Fixed cost of one SDPA call (forward + backward) expressed in multiply-adds of
# query-key pairs times heads times head_dim: ~2.2 ms / ~0.135 ns per pair-head-dim,
# measured on the CPU above. Divided by Hq * D it gives the cost in query-key pairs.
_CALL_OVERHEAD_PAIR_HEAD_DIMS = 16_000_000


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
    starts = cu_seqlens[:-1].tolist()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if lengths and max_seqlen is not None and max(lengths) > max_seqlen:
        raise ValueError(f"attention: max_seqlen={max_seqlen} is below the longest sequence ({max(lengths)})")

    overhead_pairs = _CALL_OVERHEAD_PAIR_HEAD_DIMS / (num_q_heads * head_dim)
    token_indices, outs, lses = [], [], []
    for bucket in plan_buckets(lengths, overhead_pairs):
        bucket_starts = [starts[i] for i in bucket]
        bucket_lengths = [lengths[i] for i in bucket]
        out, lse, tokens = _attend_bucket(q, k, v, bucket_starts, bucket_lengths, causal, scale, return_lse)
        token_indices.append(tokens)
        outs.append(out)
        lses.append(lse)

    total = q.shape[0]
    if not outs:  # no tokens at all
        out = q.new_zeros(q.shape)
        lse = q.new_full((num_q_heads, total), float("-inf"), dtype=torch.float32)
        return (out, lse) if return_lse else out
    order = torch.cat(token_indices)  # stream position of each bucket-ordered token
    out = q.new_zeros(q.shape).index_copy(0, order, torch.cat(outs))  # (total, Hq, D)
    if not return_lse:
        return out
    lse = q.new_zeros((num_q_heads, total), dtype=torch.float32).index_copy(1, order, torch.cat(lses, dim=1))
    return out, lse


def plan_buckets(lengths: list[int], overhead_pairs: float) -> list[list[int]]:
    """Group sequence indices (longest first) so that padding costs less than separate calls.

    A sequence of length l joins the open bucket of longest length L when padding it to L
    (L^2 pairs) costs no more than giving it its own call (l^2 pairs + the call overhead).
    Empty sequences are left out: they have nothing to attend to.
    """
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    bucket_len = 0
    for i in order:
        n = lengths[i]
        if buckets and bucket_len**2 <= n**2 + overhead_pairs:
            buckets[-1].append(i)
        else:
            buckets.append([i])
            bucket_len = n
    return buckets


def _attend_bucket(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    starts: list[int],
    lengths: list[int],
    causal: bool,
    scale: float,
    return_lse: bool,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Attention for one bucket; returns (out (t, Hq, D), lse (Hq, t) or None, stream indices (t,))."""
    device = q.device
    num_seqs, padded_len = len(lengths), lengths[0]  # longest first
    lengths_t = torch.tensor(lengths, device=device)
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), lengths_t)
    first_token = torch.cumsum(lengths_t, 0) - lengths_t
    pos_in_seq = torch.arange(int(lengths_t.sum()), device=device) - first_token[seq_of_token]
    stream_index = torch.tensor(starts, device=device)[seq_of_token] + pos_in_seq  # (t,)
    padded_index = seq_of_token * padded_len + pos_in_seq  # (t,) into (n * Lmax)

    def to_padded(x: Tensor) -> Tensor:
        heads, dim = x.shape[1], x.shape[2]
        rows = x.index_select(0, stream_index)
        if num_seqs == 1:
            return rows.view(1, padded_len, heads, dim).transpose(1, 2)
        padded = x.new_zeros(num_seqs * padded_len, heads, dim).index_copy(0, padded_index, rows)
        return padded.view(num_seqs, padded_len, heads, dim).transpose(1, 2)  # (n, H, Lmax, D)

    qp, kp, vp = to_padded(q), to_padded(k), to_padded(v)
    key_valid = None
    if any(n != padded_len for n in lengths):
        key_valid = torch.arange(padded_len, device=device)[None, :] < lengths_t[:, None]  # (n, Lmax)

    if return_lse:
        out, lse = _math_attention_with_lse(qp, kp, vp, key_valid, causal, scale)
        lse = lse.permute(1, 0, 2).reshape(lse.shape[1], -1)[:, padded_index]  # (Hq, t)
    else:
        # Causal with right padding needs no key mask: a real query at position i only sees
        # keys j <= i < length, never a pad. Pad query rows produce values that are dropped.
        mask = None if (causal or key_valid is None) else key_valid[:, None, None, :]
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
        lse = None
    out = out.transpose(1, 2).reshape(num_seqs * padded_len, out.shape[1], out.shape[3])
    return out.index_select(0, padded_index), lse, stream_index


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

