"""Ring attention on real gloo ranks equals attention over the whole packed stream, forward and
backward: causal (zigzag) and bidirectional (plain split, pad keys excluded), grouped-query
heads, sequences of unequal lengths including an empty one and ones shorter than the number of
chunks. Also counts the bytes ring attention sends against the module docstring's formula."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from engine.parallel.context import shard_for_ring
from engine.kernels.attention import attention
from engine.parallel.spawn import spawn_ranks

# Empty, 1 and 3 tokens (fewer than the 2R = 8 chunks at R = 4), and longer ones that leave
# pads at the end of their last chunk.
LENGTHS = [5, 1, 0, 3, 61, 12]
Q_HEADS = 4
KV_HEADS = [4, 2, 1]  # plain, grouped, multi-query
DIM = 8
# float32: the ring changes only the order of the softmax sums. bfloat16 keeps ~3 significant
# digits and each block's output is rounded to it before the float32 merge.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _global_stream(kv_heads: int, dtype: torch.dtype):
    """The same packed stream on every rank: cu_seqlens and q, k, v, upstream gradient g."""
    cu = torch.zeros(len(LENGTHS) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(LENGTHS), 0)
    generator = torch.Generator().manual_seed(kv_heads)
    tokens = int(cu[-1])
    q, k, v, g = (torch.randn(tokens, h, DIM, generator=generator).to(dtype)
                  for h in (Q_HEADS, kv_heads, kv_heads, Q_HEADS))
    return cu, q, k, v, g


def _reference(cu, q, k, v, g, causal: bool):
    """Single-process float32 attention over the whole stream: out and the gradients of q, k, v."""
    leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
    out = attention(*leaves, cu_seqlens=cu, max_seqlen=max(LENGTHS), causal=causal)
    grads = torch.autograd.grad(out, leaves, g.float())
    return out.detach(), grads


def _relative_error(got, want) -> float:
    return float((got.detach().float() - want).abs().max() / want.abs().max().clamp(min=1e-12))


def _case(rank: int, world: int, kv_heads: int, causal: bool, dtype: torch.dtype) -> dict:
    from engine.parallel.ring import ring_attention

    cu, q, k, v, g = _global_stream(kv_heads, dtype)
    ref_out, ref_grads = _reference(cu, q, k, v, g, causal)

    shard = shard_for_ring(cu, world, rank, causal)
    real = shard.index >= 0
    at = shard.index[real]
    noise = torch.Generator().manual_seed(100 + rank)

    def local(x, pad_value):  # this rank's rows; pads get `pad_value` rows
        filled = pad_value(x[:1].expand(len(real), *x.shape[1:]))
        filled[real] = x[at]
        return filled

    random_pads = lambda rows: torch.randn(rows.shape, generator=noise).to(rows.dtype)
    parts = [local(t, random_pads).requires_grad_(True) for t in (q, k, v)]
    g_local = local(g, torch.zeros_like)  # pad outputs are dropped by the model: no gradient reaches them
    out = ring_attention(*parts, cu_seqlens=shard.cu_seqlens, seq_lens=shard.seq_lens, causal=causal,
                         group=dist.group.WORLD)
    grads = torch.autograd.grad(out, parts, g_local, retain_graph=True)

    result = {"real_tokens": int(real.sum()),
              "output": _relative_error(out[real], ref_out[at]),
              "finite": bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(d).all()) for d in grads)}
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        result[f"d{name}"] = _relative_error(grad[real], ref_grad[at])
    if not causal:
        # Pad keys are excluded outright: even an upstream gradient on every row, pads included,
        # must leave them without gradient.
        dk, dv = torch.autograd.grad(out, parts[1:], torch.randn(out.shape, generator=noise).to(dtype))
        pads = torch.cat([dk[~real].flatten(), dv[~real].flatten(), torch.zeros(1, dtype=dtype)])
        result["pad_key_grad"] = float(pads.abs().max())
    return result


def _bytes_sent(rank: int, world: int) -> dict:
    """Bytes this rank passes round in one forward and one backward, counted at _pass_round."""
    import engine.parallel.ring as ring

    counted = []
    original = ring._pass_round

    def counting(tensors, group):
        counted.append(sum(t.numel() * t.element_size() for t in tensors))
        return original(tensors, group)

    cu, q, k, v, g = _global_stream(2, torch.float32)
    shard = shard_for_ring(cu, world, rank, causal=True)
    parts = [t[shard.index.clamp(min=0)].requires_grad_(True) for t in (q, k, v)]
    ring._pass_round = counting
    try:
        out = ring.ring_attention(*parts, cu_seqlens=shard.cu_seqlens, seq_lens=shard.seq_lens, causal=True,
                                  group=dist.group.WORLD)
        forward = sum(counted)
        out.backward(torch.ones_like(out))
    finally:
        ring._pass_round = original
    return {"forward": forward, "backward": sum(counted) - forward, "tokens": len(shard.index), "kv_heads": 2}


def _worker(rank: int, world: int, out_dir: str) -> None:
    results = {}
    for causal in (True, False):
        mode = "causal" if causal else "bidirectional"
        for kv_heads in KV_HEADS:
            results[f"float32 {Q_HEADS}q{kv_heads}kv {mode}"] = _case(rank, world, kv_heads, causal, torch.float32)
        results[f"bfloat16 {Q_HEADS}q2kv {mode}"] = _case(rank, world, 2, causal, torch.bfloat16)
    results["bytes"] = _bytes_sent(rank, world)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_equals_whole_stream_attention(tmp_path, world):
    spawn_ranks(_worker, world, str(tmp_path))
    covered = {}
    for rank in range(world):
        with open(tmp_path / f"rank{rank}.json") as f:
            results = json.load(f)
        sent = results.pop("bytes")
        kv_block = 2 * sent["tokens"] * sent["kv_heads"] * DIM * 4  # K and V, float32
        assert sent["forward"] == (world - 1) * kv_block, f"rank {rank}: forward sent {sent['forward']} bytes"
        assert sent["backward"] == (2 * world - 1) * kv_block, f"rank {rank}: backward sent {sent['backward']} bytes"
        assert len(results) == 8, sorted(results)
        for case, errors in results.items():
            covered[case] = covered.get(case, 0) + errors.pop("real_tokens")
            assert errors.pop("finite"), f"rank {rank}, {case}: NaN or inf in the output or a gradient"
            if "pad_key_grad" in errors:
                assert errors.pop("pad_key_grad") == 0.0, f"rank {rank}, {case}: pad keys got a gradient"
            tolerance = TOLERANCE[torch.float32 if case.startswith("float32") else torch.bfloat16]
            for what, error in errors.items():
                assert error < tolerance, f"rank {rank}, {case}: {what} differs by {error:.2e} (relative)"
    for case, tokens in covered.items():  # the ranks' real tokens are the whole stream, once each
        assert tokens == sum(LENGTHS), f"{case}: ranks hold {tokens} real tokens of {sum(LENGTHS)}"


def test_causal_zigzag_rejects_odd_local_lengths():
    from engine.parallel.ring import _plan_blocks

    cu = torch.tensor([0, 4, 7], dtype=torch.int32)  # the second sequence's 3 tokens cannot be two chunks
    with pytest.raises(ValueError, match="even local length"):
        _plan_blocks(cu, torch.tensor([8, 5]), ring=2, rank=0, causal=True)
