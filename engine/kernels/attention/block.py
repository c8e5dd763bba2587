"""Attention of one block of queries against one block of keys, returning the LSE: the
unit ring attention is built from.

    out, lse = block_forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=Lq,
                             max_seqlen_k=Lk, causal=False)
    dq, dk, dv = block_backward(dout, q, k, v, out, lse, cu_seqlens_q=cq, ...)

q (Tq, Hq, D) and k/v (Tk, Hkv, D) are two packed streams with the same number of
sequences: sequence i's queries q[cq[i]:cq[i+1]] attend its keys k[ck[i]:ck[i+1]] and
nothing else. Either part may be empty; a query row with no keys gets out = 0 and
lse = -inf (and zero gradients). `causal` needs equal query and key lengths per sequence
(the diagonal block, top-left aligned).

There is no autograd here on purpose. Ring attention merges block outputs through their
LSE and differentiates the merged result: its backward calls `block_backward` with the
*final* (merged) out and lse, which gives every block its exact share of the gradient
(P = exp(S - lse_final), D = rowsum(dout * out_final)), as FlashAttention-2's backward does.

Two paths compute it:
- CPU: PyTorch's flash kernel for CPU (`_scaled_dot_product_flash_attention_for_cpu` and
  its backward), which tiles queries and keys and never holds a (Lq, Lk) score matrix, so
  an 8K x 8K ring block costs O(L * H * D) memory. Sequences with the same (query length,
  key length) share one batched call: packed rows of many short equal-length sequences
  are common, and each call has a fixed overhead. The kernel takes grouped-query heads as
  they are, and its backward uses the out and lse it is given (not a recomputed pair),
  which is what the contract above needs.
- Other devices: `math_block_forward` / `math_block_backward`, explicit fp32 scores per
  sequence, O(L^2) memory. They are the spec the CPU path (and the Triton and flash-attn
  block functions, registered under their backends' names) are tested against, and the
  'sdpa' backend's fallback on a GPU; `kernels.attention=auto` picks a real kernel there.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

_flash_cpu_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def block_forward(
    q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, causal: bool, scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """-> out (Tq, Hq, D) in q's dtype, lse (Hq, Tq) float32."""
    if q.device.type != "cpu":
        return math_block_forward(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, causal=causal,
                                  scale=scale)
    _check_shapes(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = q.new_zeros(q.shape)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for q_rows, k_rows, num_seqs in _groups(cu_seqlens_q, cu_seqlens_k, causal):
        o, l = _flash_cpu_forward(_batched(q, q_rows, num_seqs), _batched(k, k_rows, num_seqs),
                                  _batched(v, k_rows, num_seqs), 0.0, causal, scale=scale)  # (n, Hq, lq, D), (n, Hq, lq)
        out.index_copy_(0, q_rows, _packed(o))
        lse.index_copy_(1, q_rows, l.transpose(0, 1).reshape(l.shape[1], -1).float())  # float64 from a float64 q
    return out, lse


def block_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *, cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, causal: bool,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of this block's share, given the final out (Tq, Hq, D) and lse (Hq, Tq) of the query rows.

    -> dq (Tq, Hq, D), dk (Tk, Hkv, D), dv (Tk, Hkv, D) in the dtypes of q, k, v.
    """
    if q.device.type != "cpu":
        return math_block_backward(dout, q, k, v, out, lse, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                   causal=causal, scale=scale)
    _check_shapes(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # The kernel wants dout and out in q's dtype (a merged out may arrive in fp32), and lse in
    # its accumulation dtype: float64 for float64 inputs, float32 otherwise.
    dout, out = dout.to(q.dtype), out.to(q.dtype)
    lse = _zero_gradient_where_no_keys(lse).to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for q_rows, k_rows, num_seqs in _groups(cu_seqlens_q, cu_seqlens_k, causal):
        rows_lse = lse.index_select(1, q_rows).view(lse.shape[0], num_seqs, -1).transpose(0, 1)  # (n, Hq, lq)
        g = _flash_cpu_backward(
            _batched(dout, q_rows, num_seqs), _batched(q, q_rows, num_seqs), _batched(k, k_rows, num_seqs),
            _batched(v, k_rows, num_seqs), _batched(out, q_rows, num_seqs), rows_lse.contiguous(),
            0.0, causal, scale=scale)
        dq.index_copy_(0, q_rows, _packed(g[0]))
        dk.index_copy_(0, k_rows, _packed(g[1]))
        dv.index_copy_(0, k_rows, _packed(g[2]))
    return dq, dk, dv


def math_block_forward(
    q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, causal: bool, scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The spec of `block_forward`, one sequence at a time in fp32 with explicit (Hq, Lq, Lk) scores."""
    _check_shapes(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = q.new_zeros(q.shape)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for (q0, q1), (k0, k1) in _segments(cu_seqlens_q, cu_seqlens_k, causal):
        o, l = _math_forward(q[q0:q1], k[k0:k1], v[k0:k1], causal, scale)
        out[q0:q1] = o.to(q.dtype)
        lse[:, q0:q1] = l
    return out, lse


def math_block_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *, cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, causal: bool,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The spec of `block_backward`, one sequence at a time in fp32 with explicit (Hq, Lq, Lk) scores."""
    _check_shapes(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    lse = _zero_gradient_where_no_keys(lse)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for (q0, q1), (k0, k1) in _segments(cu_seqlens_q, cu_seqlens_k, causal):
        g = _math_backward(dout[q0:q1], q[q0:q1], k[k0:k1], v[k0:k1], out[q0:q1], lse[:, q0:q1], causal, scale)
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = (t.to(q.dtype) for t in g)
    return dq, dk, dv


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3 or k.shape[2] != q.shape[2]:
        raise ValueError(f"attention block: q must be (Tq, Hq, D) and k, v (Tk, Hkv, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention block: {q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")


def _zero_gradient_where_no_keys(lse: Tensor) -> Tensor:
    """lse with -inf (a row that attends no key anywhere) turned into +inf: then P = exp(S - lse)
    is 0 and the row's gradients are 0, where exp(S + inf) would make them NaN."""
    return lse.masked_fill(lse == float("-inf"), float("inf"))


def _segments(cu_q: Tensor, cu_k: Tensor, causal: bool):
    """(query range, key range) of every sequence with both parts non-empty."""
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"attention block: {cu_q.numel() - 1} query sequences but {cu_k.numel() - 1} key sequences")
    qs, ks = cu_q.tolist(), cu_k.tolist()
    for i in range(len(qs) - 1):
        (q0, q1), (k0, k1) = (qs[i], qs[i + 1]), (ks[i], ks[i + 1])
        if causal and q1 - q0 != k1 - k0:
            raise ValueError(f"attention block: causal needs equal query and key lengths, sequence {i} has "
                             f"{q1 - q0} and {k1 - k0}")
        if q1 > q0 and k1 > k0:
            yield (q0, q1), (k0, k1)


def _groups(cu_q: Tensor, cu_k: Tensor, causal: bool):
    """(query rows (n * lq,), key rows (n * lk,), n) for each set of n sequences with the same
    non-empty (lq, lk), rows listed sequence by sequence: one batched kernel call each."""
    starts_by_shape: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for (q0, q1), (k0, k1) in _segments(cu_q, cu_k, causal):
        starts_by_shape[(q1 - q0, k1 - k0)].append((q0, k0))
    for (q_len, k_len), starts in starts_by_shape.items():
        q_starts, k_starts = (torch.tensor(s) for s in zip(*starts))  # CPU only: this path serves CPU tensors
        yield _rows(q_starts, q_len), _rows(k_starts, k_len), len(starts)


def _rows(starts: Tensor, length: int) -> Tensor:
    """Stream indices (n * length,) of `length` consecutive rows from each start."""
    return (starts[:, None] + torch.arange(length, device=starts.device)).reshape(-1)


def _batched(x: Tensor, rows: Tensor, num_seqs: int) -> Tensor:
    """(T, H, D) stream -> (n, H, L, D) batch of the given rows; a transposed view, which the CPU
    kernel reads as it is."""
    return x.index_select(0, rows).view(num_seqs, -1, x.shape[1], x.shape[2]).transpose(1, 2)


def _packed(x: Tensor) -> Tensor:
    """(n, H, L, D) -> (n * L, H, D), the inverse of `_batched` on the gathered rows."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def _scores(q: Tensor, k: Tensor, causal: bool, scale: float) -> Tensor:
    """(Hq, Lq, Lk) float32 scores, -inf where causality forbids."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[1:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


def _math_forward(q, k, v, causal, scale):
    s = _scores(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)  # (Hq, Lq)
    group = q.shape[1] // k.shape[1]
    p = torch.exp(s - lse[..., None])
    out = torch.einsum("hqk,khd->qhd", p, v.float().repeat_interleave(group, dim=1))
    return out, lse


def _math_backward(dout, q, k, v, out, lse, causal, scale):
    group = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(group, dim=1), v.float().repeat_interleave(group, dim=1)
    p = torch.exp(_scores(q, k, causal, scale) - lse[..., None])  # (Hq, Lq, Lk)
    do = dout.float()
    dv = torch.einsum("hqk,qhd->khd", p, do)
    dp = torch.einsum("qhd,khd->hqk", do, vf)
    delta = (do * out.float()).sum(-1).transpose(0, 1)  # (Hq, Lq)
    ds = p * (dp - delta[..., None]) * scale
    dq = torch.einsum("hqk,khd->qhd", ds, kf)
    dk = torch.einsum("hqk,qhd->khd", ds, q.float())
    fold = lambda t: t.view(t.shape[0], k.shape[1], group, t.shape[2]).sum(2)  # GQA: sum each group's copies
    return dq, fold(dk), fold(dv)
