"""Stage-to-stage transfers (engine/parallel/pipeline/p2p.py) on real gloo processes: a chain of
stages passes tensors whose shape changes every micro-batch downstream, and gradients back up,
bit for bit, each receiver sizing its buffer itself (torch.distributed.pipelining's buffers, sized
once, abort gloo on a new shape); neighbours that send to each other in the same tick (1F1B's
steady state) both get their tensor; and nothing is waited for until asked."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from engine.parallel.pipeline.p2p import post
from engine.parallel.spawn import spawn_ranks

SHAPES = [(5, 8), (13, 8), (1, 8), (0, 8), (7, 3, 2), (9,)]  # lengths vary; an empty micro-batch too


def payload(shape, seed: int) -> torch.Tensor:
    """Whole numbers in float32: the stages' additions are exact, so equality is bit for bit."""
    return torch.randint(-1000, 1000, shape, generator=torch.Generator().manual_seed(seed)).float()


def receive(shape, peer: int, group) -> torch.Tensor:
    buffer = torch.empty(shape)
    for work in post([], [(buffer, peer)], group)[0]:
        work.wait()
    return buffer


def send(tensor: torch.Tensor, peer: int, group) -> None:
    for work in post([(tensor, peer)], [], group)[0]:
        work.wait()


def _chain(rank: int, world: int) -> dict:
    group = dist.new_group(list(range(world)))
    checked = 0
    for micro, shape in enumerate(SHAPES):
        # Downstream: the first stage makes the activation, each stage adds its rank and passes it on.
        x = payload(shape, micro) if rank == 0 else receive(shape, rank - 1, group)
        assert torch.equal(x, payload(shape, micro) + sum(range(rank))), (rank, micro)
        checked += 1
        if rank < world - 1:
            send(x + rank, rank + 1, group)
        # Upstream: the last stage makes a gradient of another shape, each stage passes it back.
        grad_shape = (shape[0] + 1, 4)
        g = payload(grad_shape, 100 + micro) if rank == world - 1 else receive(grad_shape, rank + 1, group)
        assert torch.equal(g, payload(grad_shape, 100 + micro)), (rank, micro)
        if rank > 0:
            send(g, rank - 1, group)
    return {"checked": checked}


def _both_ways(rank: int, world: int) -> dict:
    """Every rank sends to both neighbours of a ring and receives from both, in one call per tick; the
    receives are waited for only after all ticks were posted."""
    group = dist.new_group(list(range(world)))
    nxt, prev = (rank + 1) % world, (rank - 1) % world
    pending = []
    for tick in range(3):
        sends = [(payload((tick + rank + 1, 2), 10 * rank + tick), nxt)]
        receives = [(torch.empty(tick + prev + 1, 2), prev)]
        if world > 2:
            sends.append((payload((rank + 2,), 50 * rank + tick), prev))
            receives.append((torch.empty(nxt + 2), nxt))
        waits = post(sends, receives, group)
        pending.append((tick, receives, waits, sends))
    for tick, receives, waits, _ in pending:
        for work in (w for ws in waits for w in ws):
            work.wait()
        assert torch.equal(receives[0][0], payload((tick + prev + 1, 2), 10 * prev + tick))
        if world > 2:
            assert torch.equal(receives[1][0], payload((nxt + 2,), 50 * nxt + tick))
    return {"ticks": len(pending)}


@pytest.mark.parametrize("world", [2, 4])
def test_varying_shapes_travel_down_and_up_a_chain_of_stages(world):
    results = spawn_ranks(_chain, world, timeout_s=60)
    assert [r["checked"] for r in results] == [len(SHAPES)] * world


@pytest.mark.parametrize("world", [2, 3])
def test_neighbours_sending_to_each_other_in_one_tick_both_receive(world):
    assert [r["ticks"] for r in spawn_ranks(_both_ways, world, timeout_s=60)] == [3] * world
