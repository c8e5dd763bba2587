"""The THD split of packed rows over ring x ulysses ranks (engine/parallel/context.py), without processes.

Every rank's share is computed here for each rank of the layout; together they must hold every
token of the global stream exactly once, at its global position, with zigzag chunks for causal
attention, equal work per rank, and streams that split evenly over ulysses x tp."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.parallel.context import ContextParallel, ring_chunks, shard_for_ring
from engine.parallel.layout import Layout

LENGTHS = [1, 3, 17, 40, 8]  # one shorter than any chunk count here, one of exactly 8


def _cu(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return cu


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("ring", [1, 2, 4])
def test_ring_shards_hold_every_token_once_at_its_position(ring, causal):
    cu = _cu(LENGTHS)
    shards = [shard_for_ring(cu, ring, rank, causal) for rank in range(ring)]
    held = torch.cat([s.index[s.index >= 0] for s in shards])
    assert sorted(held.tolist()) == list(range(sum(LENGTHS)))
    starts = cu[:-1].long()
    for s in shards:
        assert torch.equal(s.cu_seqlens, shards[0].cu_seqlens), "every ring rank's local stream has the same layout"
        seq = torch.searchsorted(s.cu_seqlens[1:].long(), torch.arange(len(s.index)), right=True)
        real = s.index >= 0
        assert torch.equal(s.index[real] - starts[seq[real]], s.positions[real]), "a token keeps its global position"
        assert (s.positions[~real] >= torch.tensor(LENGTHS)[seq[~real]]).all(), "pads sit past the sequence end"
    chunks = ring_chunks(ring, causal)
    for j, length in enumerate(LENGTHS):
        size = -(-length // chunks)
        for rank, s in enumerate(shards):
            part = s.positions[s.cu_seqlens[j]:s.cu_seqlens[j + 1]]
            held_chunks = (rank, chunks - 1 - rank) if chunks == 2 * ring else (rank,)
            want = torch.cat([torch.arange(c * size, (c + 1) * size) for c in held_chunks])
            assert torch.equal(part, want), f"sequence {j} on rank {rank}: chunks {held_chunks}"


def _mesh(ring, ulysses, ring_rank, ulysses_rank):
    return SimpleNamespace(layout=Layout(ring=ring, ulysses=ulysses),
                           local_rank=lambda dim: {"ring": ring_rank, "ulysses": ulysses_rank}[dim],
                           group=lambda dim: None)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("ring,ulysses,tp", [(1, 2, 1), (1, 4, 1), (2, 2, 1), (2, 1, 3), (4, 1, 1), (1, 2, 2)])
def test_ranks_together_hold_every_token_once_in_even_slices(ring, ulysses, tp, causal):
    cu = _cu(LENGTHS)
    total = sum(LENGTHS)
    ids = torch.arange(100, 100 + total)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    held, sizes = [], set()
    for r in range(ring):
        for u in range(ulysses):
            stream = ContextParallel(_mesh(ring, ulysses, r, u), causal, tokens_multiple=tp).shard(ids, positions, cu)
            real = stream.index >= 0
            assert torch.equal(stream.input_ids[real], ids[stream.index[real]])
            assert torch.equal(stream.position_ids[real], positions[stream.index[real]])
            local = int(stream.cu_seqlens[-1])
            assert local % (ulysses * tp) == 0 and len(stream.input_ids) == local // ulysses
            assert len(stream.seq_lens) == len(stream.cu_seqlens) - 1 == len(LENGTHS) + 1  # the filler last
            if causal and ring > 1:  # zigzag: every sequence (the filler too) is two equal chunks per rank
                assert ((stream.cu_seqlens[1:] - stream.cu_seqlens[:-1]) % 2 == 0).all()
            held.append(stream.index[real])
            sizes.add(local)
    assert sorted(torch.cat(held).tolist()) == list(range(total))
    assert len(sizes) == 1, "every rank does the same work"


def test_ring_block_plan_is_built_once_per_stream(monkeypatch):
    """Every layer of a forward attends with the same stream: its ring plan (which reads sizes back
    from the device) is built once, and again only for another stream."""
    from engine.parallel import ring

    built = []
    monkeypatch.setattr(ring, "plan_ring_blocks", lambda cu, lens, *, causal, group: built.append(cu) or [cu])
    cp = ContextParallel(_mesh(2, 1, 0, 0), causal=True)
    stream = cp.shard(torch.arange(sum(LENGTHS)), torch.cat([torch.arange(n) for n in LENGTHS]), _cu(LENGTHS))
    plans = [cp._ring_plan(stream.cu_seqlens, stream.seq_lens, True) for _layer in range(3)]
    assert len(built) == 1 and all(plan is plans[0] for plan in plans)
    other = cp.shard(torch.arange(7), torch.arange(7), _cu([7]))
    assert cp._ring_plan(other.cu_seqlens, other.seq_lens, True) == [other.cu_seqlens] and len(built) == 2


@pytest.mark.parametrize("mode", ["last", "mean", "cls"])
@pytest.mark.parametrize("ring,ulysses,causal", [(2, 1, True), (4, 1, True), (2, 2, True), (1, 2, False),
                                                 (4, 1, False)])
def test_ranks_pool_their_own_tokens_to_the_whole_streams_pooling(ring, ulysses, causal, mode):
    """Each rank pools only the rows it holds (no (tokens, hidden) stream per rank); the sum over
    the ranks is pool() of the whole stream, exactly for last/cls and to rounding for mean."""
    cu, total = _cu(LENGTHS), sum(LENGTHS)
    whole = torch.randn(total, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ids, positions = torch.arange(total), torch.cat([torch.arange(n) for n in LENGTHS])
    summed = torch.zeros(len(LENGTHS), 6, dtype=torch.float64)
    for r in range(ring):
        for u in range(ulysses):
            cp = ContextParallel(_mesh(ring, ulysses, r, u), causal)
            stream = cp.shard(ids, positions, cu)
            real = stream.index >= 0
            local = torch.where(real[:, None], whole[stream.index.clamp(min=0)], torch.full((1, 6), 7.0,
                                                                                          dtype=torch.float64))
            summed += cp.pool(local, stream, cu, mode)  # pads and filler rows hold 7s: they must not count
    sequences = [whole[start:end] for start, end in zip(cu[:-1].tolist(), cu[1:].tolist())]
    want = torch.stack([{"last": s[-1], "cls": s[0], "mean": s.mean(0)}[mode] for s in sequences])
    torch.testing.assert_close(summed, want, rtol=1e-12, atol=1e-12)
