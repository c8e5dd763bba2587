"""Attention of one block of queries against one block of keys, returning the LSE: the
unit ring attention is built from.

    out, lse = block_forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=Lq,
                             max_seqlen_k=Lk, causal=False)
    dq, dk, dv = block_backward(dout, q, k, v, out, lse, cu_seqlens_q=cq, ...)

q (Tq, Hq, D) and k/v (Tk, Hkv, D) are two packed streams with the same number of
sequences: sequence i's queries q[cq[i]:cq[i+1]] attend its keys k[ck[i]:ck[i+1]] and
nothing else. Either part may be empty; a query row with no keys gets out = 0 and
lse = -inf. `causal` needs equal query and key lengths per sequence (the diagonal block).

There is no autograd here on purpose. Ring attention merges block outputs through their
LSE and differentiates the merged result: its backward calls `block_backward` with the
*final* (merged) out and lse, which gives every block its exact share of the gradient
(P = exp(S - lse_final), D = rowsum(dout * out_final)), as FlashAttention-2's backward does.
"""
from __future__ import annotations

import torch
from torch import Tensor


def block_forward(
    q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, causal: bool, scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """-> out (Tq, Hq, D) in q's dtype, lse (Hq, Tq) float32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = q.new_zeros(q.shape)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for (q0, q1), (k0, k1) in _segments(cu_seqlens_q, cu_seqlens_k, causal):
        o, l = _math_forward(q[q0:q1], k[k0:k1], v[k0:k1], causal, scale)
        out[q0:q1] = o.to(q.dtype)
        lse[:, q0:q1] = l
    return out, lse


def block_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *, cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, causal: bool,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of this block's share, given the final out and lse of the query rows."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for (q0, q1), (k0, k1) in _segments(cu_seqlens_q, cu_seqlens_k, causal):
        g = _math_backward(dout[q0:q1], q[q0:q1], k[k0:k1], v[k0:k1], out[q0:q1], lse[:, q0:q1], causal, scale)
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = (t.to(q.dtype) for t in g)
    return dq, dk, dv


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
