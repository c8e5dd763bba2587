"""Ulysses all-to-all on real gloo ranks: attention over token shards equals attention over the
whole packed stream, forward and backward, for grouped-query heads split or replicated, causal
and bidirectional, with sequences of unequal lengths crossing shard boundaries."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from engine.kernels.attention import attention
from engine.parallel.spawn import spawn_ranks

CU_SEQLENS = [0, 5, 6, 13, 16]  # a 1-token sequence, and sequences crossing every shard boundary
HEADS = [(4, 4), (4, 2), (4, 1)]  # (query heads, KV heads): split, split or replicated, replicated
DIM = 8


def _case(world: int, q_heads: int, kv_heads: int, causal: bool) -> dict:
    from engine.parallel.ulysses import ulysses_attention

    rank = dist.get_rank()
    tokens = CU_SEQLENS[-1]
    generator = torch.Generator().manual_seed(q_heads * 10 + kv_heads)
    q, k, v, g = (torch.randn(tokens, h, DIM, generator=generator) for h in (q_heads, kv_heads, kv_heads, q_heads))
    cu = torch.tensor(CU_SEQLENS, dtype=torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())

    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attention(*full, cu_seqlens=cu, max_seqlen=max_len, causal=causal)
    (out * g).sum().backward()

    own = slice(rank * tokens // world, (rank + 1) * tokens // world)
    parts = [t[own].clone().requires_grad_(True) for t in (q, k, v)]
    got = ulysses_attention(*parts, cu_seqlens=cu, max_seqlen=max_len, causal=causal, group=dist.group.WORLD)
    (got * g[own]).sum().backward()

    errors = {"output": float((got - out[own]).abs().max())}
    for name, part, whole in zip("qkv", parts, full):
        errors[f"d{name}"] = float((part.grad - whole.grad[own]).abs().max())
    return errors


def _round_trip(world: int) -> float:
    from engine.parallel.ulysses import heads_to_seq, seq_to_heads

    x = torch.randn(3, 2 * world, DIM, generator=torch.Generator().manual_seed(dist.get_rank()))
    heads = seq_to_heads(x, dist.group.WORLD)
    assert heads.shape == (3 * world, 2, DIM)
    return float((heads_to_seq(heads, dist.group.WORLD) - x).abs().max())


def _worker(rank: int, world: int, out_dir: str) -> None:
    results = {"round_trip": _round_trip(world)}
    for q_heads, kv_heads in HEADS:
        if kv_heads < world and world % kv_heads or kv_heads >= world and kv_heads % world:
            continue
        for causal in (True, False):
            results[f"{q_heads}q{kv_heads}kv-{'causal' if causal else 'bidirectional'}"] = _case(
                world, q_heads, kv_heads, causal)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_attention_equals_whole_stream_attention(tmp_path, world):
    spawn_ranks(_worker, world, str(tmp_path))
    for rank in range(world):
        with open(tmp_path / f"rank{rank}.json") as f:
            results = json.load(f)
        assert results.pop("round_trip") == 0.0, "heads_to_seq must undo seq_to_heads exactly"
        assert len(results) == 2 * len(HEADS), sorted(results)
        for case, errors in results.items():
            for what, error in errors.items():
                assert error < 1e-5, f"rank {rank}, {case}: {what} differs by {error:.2e}"


def test_expand_kv_heads_rules():
    from engine.parallel.ulysses import expand_kv_heads

    kv = torch.arange(2.0).view(1, 2, 1).expand(3, 2, 4)
    assert expand_kv_heads(kv, 2) is kv
    assert expand_kv_heads(kv, 4)[0, :, 0].tolist() == [0.0, 0.0, 1.0, 1.0]  # rank r gets head r // 2
    with pytest.raises(ValueError, match="cannot be shared out evenly"):
        expand_kv_heads(kv, 3)
    with pytest.raises(ValueError, match="do not split"):
        expand_kv_heads(torch.zeros(3, 6, 4), 4)
