"""Ring attention: key/value blocks pass round the ring of context-parallel ranks.

Each of the R ring ranks holds its share of every sequence of a packed stream (the split of
engine.parallel.context: zigzag chunks r and 2R-1-r for causal attention, chunk r otherwise)
and keeps its queries. At step s it attends with the key/value block of rank (r - s) mod R,
while that block already travels on to rank r + 1 (`batch_isend_irecv`, so the transfer
overlaps the compute). Partial outputs merge through their log-sum-exp in float32.

Which queries meet which keys at step s (src = (r - s) mod R), causal zigzag (C = 2R chunks):
    src == r   all local queries x all local keys, causal (chunks r | 2R-1-r are in position order);
    src <  r   all local queries x the first half of src's keys (chunk src): every key is earlier;
    src >  r   the second half of the local queries (chunk 2R-1-r) x all of src's keys: every key
               is earlier, while chunk r precedes every key of src and sees none of them.
Bidirectional (C = R): all queries x the real keys of src (pads excluded); chunk s of a
sequence of length L holds clamp(L - s*c, 0, c) real tokens at its start. Causal pads sit at
sequence ends and are only ever seen by later pad queries, so they need no exclusion.

The backward is ring-flash-attention's: K/V rotate again, dq accumulates locally, and each
block's dK/dV accumulator (float32) travels with it, so after R passes it is back at its owner.
Every block call goes through kernels.attention.attention_block / attention_block_backward,
the latter given the final merged out and lse (see engine/kernels/attention/block.py).

Bytes each rank sends, with n local tokens, Hkv key/value heads, head size D and b bytes per
element of k/v:
    forward   (R - 1) K/V blocks                    = (R - 1) * 2 * n * Hkv * D * b
    backward  (R - 1) K/V blocks + R dK/dV blocks   = (R - 1) * 2 * n * Hkv * D * b + R * 2 * n * Hkv * D * 4
All of it goes through `_pass_round`, so a benchmark can wrap that one function to count it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from engine.kernels.attention import attention_block, attention_block_backward


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor, seq_lens: Tensor, causal: bool,
                   group, scale: float | None = None, backend: str = "auto", plan: list | None = None) -> Tensor:
    """Attention of this rank's share of a packed stream split by engine.parallel.context.shard_for_ring.

    q (n, Hq, D), k/v (n, Hkv, D): this ring rank's local stream (n = cu_seqlens[-1]);
    cu_seqlens (num_seqs + 1,) int32: the local stream's sequences, identical on every ring rank;
    seq_lens (num_seqs,): each sequence's real length (positions >= it are pads, never attended
    as keys in bidirectional attention); causal: zigzag split (2R chunks) if True, plain split (R) if False.
    plan: plan_ring_blocks(...) of these arguments, when the caller reuses one for every layer
    (building it reads sizes back from the device).
    Returns (n, Hq, D) in q's dtype; differentiable in q, k, v.
    """
    group = dist.group.WORLD if group is None else group
    _check_inputs(q, k, v, cu_seqlens, seq_lens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if plan is None:
        plan = plan_ring_blocks(cu_seqlens, seq_lens, causal=causal, group=group)
    return _RingAttention.apply(q, k, v, plan, group, scale, backend)


def plan_ring_blocks(cu_seqlens: Tensor, seq_lens: Tensor, *, causal: bool, group) -> list:
    """Which rows of each source rank's block this rank attends: the same for every layer of a forward."""
    group = dist.group.WORLD if group is None else group
    return _plan_blocks(cu_seqlens, seq_lens, dist.get_world_size(group), dist.get_rank(group), causal)


@dataclass
class _Block:
    """Which local query rows attend which key rows of one source rank's block.

    Rows are None where the whole stream takes part (no gather needed); cu_seqlens_q/k
    describe the selected rows as a packed stream with the local stream's sequences."""

    q_rows: Tensor | None  # (tq,) int64 local query rows, or None for all n
    k_rows: Tensor | None  # (tk,) int64 rows of the source's block, or None for all n
    cu_seqlens_q: Tensor  # (num_seqs + 1,) int32
    cu_seqlens_k: Tensor  # (num_seqs + 1,) int32
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool


def _plan_blocks(cu_seqlens: Tensor, seq_lens: Tensor, ring: int, rank: int, causal: bool) -> list[_Block]:
    """The block of every source rank (list index = source rank), built once per call."""
    cu = cu_seqlens.long()
    cu_seqlens = cu_seqlens.to(torch.int32)  # the varlen kernels' layout
    local = cu[1:] - cu[:-1]  # (num_seqs,) tokens of each sequence on every rank
    if causal and ring == 1:  # pads sit at sequence ends, after every real query: no exclusion needed
        return [_Block(None, None, cu_seqlens, cu_seqlens, _max(local), _max(local), True)]
    if causal:
        if bool((local % 2).any()):
            raise ValueError("ring_attention: causal zigzag needs an even local length for every sequence "
                             "(two equal chunks); split the stream with engine.parallel.context.shard_for_ring")
        half = local // 2
        first = _leading_rows(cu[:-1], half)  # chunk r of every sequence
        second = _leading_rows(cu[:-1] + half, half)  # chunk 2R-1-r
        whole = _Block(None, None, cu_seqlens, cu_seqlens, _max(local), _max(local), True)
        earlier_keys = _Block(None, first, cu_seqlens, _cumsum(half), _max(local), _max(half), False)
        late_queries = _Block(second, None, _cumsum(half), cu_seqlens, _max(half), _max(local), False)
        return [earlier_keys if src < rank else whole if src == rank else late_queries for src in range(ring)]
    plan = []
    for src in range(ring):
        real = torch.clamp(seq_lens.to(cu.device).long() - src * local, min=0)
        real = torch.minimum(real, local)  # (num_seqs,) real keys at the start of chunk src
        k_rows = None if bool((real == local).all()) else _leading_rows(cu[:-1], real)
        cu_k = cu_seqlens if k_rows is None else _cumsum(real)
        plan.append(_Block(None, k_rows, cu_seqlens, cu_k, _max(local), _max(real), False))
    return plan


def _leading_rows(starts: Tensor, counts: Tensor) -> Tensor:
    """Row indices of the first counts[j] rows after each starts[j], in order: (sum(counts),) int64."""
    total = int(counts.sum())
    seq = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts, output_size=total)
    first_selected = torch.cumsum(counts, 0) - counts  # where each sequence's rows begin in the selection
    return starts[seq] + torch.arange(total, device=counts.device) - first_selected[seq]


def _cumsum(counts: Tensor) -> Tensor:
    cu = torch.zeros(len(counts) + 1, dtype=torch.int32, device=counts.device)
    cu[1:] = torch.cumsum(counts, 0)
    return cu


def _max(counts: Tensor) -> int:
    return int(counts.max()) if counts.numel() else 0


class _RingAttention(torch.autograd.Function):
    """forward: R block attentions merged by LSE as K/V pass round | backward: K/V pass round again,
    dK/dV travel with their block back to its owner."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: list[_Block], group, scale: float, backend: str):
        ring, rank = len(plan), dist.get_rank(group)
        out = q.new_zeros(q.shape, dtype=torch.float32)  # (n, Hq, D)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)  # (Hq, n)
        k_held, v_held = k, v
        for step in range(ring):
            last = step == ring - 1
            if not last:  # start the next block's transfer before computing on this one
                requests, (k_next, v_next) = _pass_round([k_held, v_held], group)
            block = plan[(rank - step) % ring]
            out_b, lse_b = attention_block(
                _rows(q, block.q_rows), _rows(k_held, block.k_rows), _rows(v_held, block.k_rows),
                **_block_kwargs(block, scale), backend=backend)
            _merge(out, lse, out_b, lse_b, block.q_rows)
            if not last:
                _wait(requests)
                k_held, v_held = k_next, v_next
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.group, ctx.scale, ctx.backend = plan, group, scale, backend
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        plan, group = ctx.plan, ctx.group
        ring, rank = len(plan), dist.get_rank(group)
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        k_held, v_held = k, v
        for step in range(ring):
            last = step == ring - 1
            if not last:
                kv_requests, (k_next, v_next) = _pass_round([k_held, v_held], group)
            block = plan[(rank - step) % ring]
            dq_b, dk_b, dv_b = attention_block_backward(
                _rows(dout, block.q_rows), _rows(q, block.q_rows), _rows(k_held, block.k_rows),
                _rows(v_held, block.k_rows), _rows(out, block.q_rows), _lse_rows(lse, block.q_rows),
                **_block_kwargs(block, ctx.scale), backend=ctx.backend)
            _add_rows(dq, dq_b, block.q_rows)
            dk = _add_rows(torch.zeros(k.shape, dtype=torch.float32, device=k.device), dk_b, block.k_rows)
            dv = _add_rows(torch.zeros(v.shape, dtype=torch.float32, device=v.device), dv_b, block.k_rows)
            if step > 0:  # the accumulators of this block from the ranks it visited before
                _wait(dkv_requests)
                dk += dk_in
                dv += dv_in
            if not last:
                _wait(kv_requests)
                k_held, v_held = k_next, v_next
            if ring > 1:  # on to the next rank; after the last step that is the block's owner
                dkv_requests, (dk_in, dv_in) = _pass_round([dk, dv], group)
        if ring > 1:
            _wait(dkv_requests)
            dk, dv = dk_in, dv_in
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _pass_round(tensors: list[Tensor], group) -> tuple[list, list[Tensor]]:
    """Send each tensor to the next ring rank and receive same-shaped ones from the previous;
    returns (requests to wait on, received tensors). All of ring attention's traffic is here."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    next_rank = dist.get_global_rank(group, (rank + 1) % size)
    previous_rank = dist.get_global_rank(group, (rank - 1) % size)
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), next_rank, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, t, previous_rank, group) for t in received]
    return dist.batch_isend_irecv(ops), received


def _wait(requests: list) -> None:
    for request in requests:
        request.wait()


def _block_kwargs(block: _Block, scale: float) -> dict:
    return dict(cu_seqlens_q=block.cu_seqlens_q, cu_seqlens_k=block.cu_seqlens_k, max_seqlen_q=block.max_seqlen_q,
                max_seqlen_k=block.max_seqlen_k, causal=block.causal, scale=scale)


def _rows(x: Tensor, rows: Tensor | None) -> Tensor:
    return x if rows is None else x.index_select(0, rows)


def _lse_rows(lse: Tensor, rows: Tensor | None) -> Tensor:
    return lse if rows is None else lse.index_select(1, rows).contiguous()


def _add_rows(total: Tensor, part: Tensor, rows: Tensor | None) -> Tensor:
    """total[rows] += part in total's dtype (float32); rows None means all rows."""
    if rows is None:
        return total.add_(part)
    return total.index_add_(0, rows, part.to(total.dtype))


def _merge(out: Tensor, lse: Tensor, out_b: Tensor, lse_b: Tensor, rows: Tensor | None) -> None:
    """Fold one block's (out_b (t, Hq, D), lse_b (Hq, t)) into the running float32 out/lse at `rows`."""
    out_old = _rows(out, rows)
    lse_old = _lse_rows(lse, rows)
    lse_new = torch.logaddexp(lse_old, lse_b)
    # A row no key has reached yet stays at -inf; measuring from 0 there keeps both weights 0, not NaN.
    reference = lse_new.masked_fill(lse_new == float("-inf"), 0.0)
    weight_old = torch.exp(lse_old - reference).transpose(0, 1).unsqueeze(-1)  # (t, Hq, 1)
    weight_b = torch.exp(lse_b - reference).transpose(0, 1).unsqueeze(-1)
    merged = out_old * weight_old + out_b.float() * weight_b
    if rows is None:
        out.copy_(merged)
        lse.copy_(lse_new)
    else:
        out.index_copy_(0, rows, merged)
        lse.index_copy_(1, rows, lse_new)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, seq_lens: Tensor) -> None:
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"ring_attention: q must be (n, Hq, D) and k, v (n, Hkv, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"ring_attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if int(cu_seqlens[-1]) != q.shape[0]:
        raise ValueError(f"ring_attention: cu_seqlens ends at {int(cu_seqlens[-1])} but the local stream "
                         f"holds {q.shape[0]} tokens")
    if seq_lens.numel() != cu_seqlens.numel() - 1:
        raise ValueError(f"ring_attention: {seq_lens.numel()} seq_lens for {cu_seqlens.numel() - 1} sequences")
