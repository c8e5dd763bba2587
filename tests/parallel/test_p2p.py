"""Stage-to-stage transfers (engine/parallel/pipeline/p2p.py) on real gloo processes: a chain of
stages passes tensors whose shape changes every micro-batch downstream, and gradients back up,
bit for bit (what torch.distributed.pipelining's fixed buffers cannot do on gloo)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine.parallel.pipeline.p2p import recv_from, send_to
from engine.parallel.spawn import spawn_ranks

SHAPES = [(5, 8), (13, 8), (1, 8), (0, 8), (7, 3, 2), (9,)]  # lengths vary; an empty micro-batch too


def payload(shape, seed: int) -> torch.Tensor:
    """Whole numbers in float32: the stages' additions are exact, so equality is bit for bit."""
    return torch.randint(-1000, 1000, shape, generator=torch.Generator().manual_seed(seed)).float()


def _chain(rank: int, world: int) -> dict:
    group = dist.new_group(list(range(world)))
    cpu = torch.device("cpu")
    checked = 0
    for micro, shape in enumerate(SHAPES):
        # Downstream: the first stage makes the activation, each stage adds its rank and passes it on.
        x = payload(shape, micro) if rank == 0 else recv_from(rank - 1, group, torch.float32, cpu)
        expected = payload(shape, micro) + sum(range(rank))
        assert torch.equal(x, expected), (rank, micro)
        checked += 1
        if rank < world - 1:
            send_to(x + rank, rank + 1, group)
        # Upstream: the last stage makes a gradient of another shape, each stage passes it back.
        grad_shape = (shape[0] + 1, 4)
        g = payload(grad_shape, 100 + micro) if rank == world - 1 else recv_from(rank + 1, group, torch.float32, cpu)
        assert torch.equal(g, payload(grad_shape, 100 + micro)), (rank, micro)
        if rank > 0:
            send_to(g, rank - 1, group)
    return {"checked": checked}


def test_varying_shapes_travel_down_and_up_a_chain_of_stages():
    for world in (2, 4):
        results = spawn_ranks(_chain, world, timeout_s=60)
        assert [r["checked"] for r in results] == [len(SHAPES)] * world


def test_too_many_dimensions_is_refused_before_sending():
    import pytest

    with pytest.raises(ValueError, match="at most 4 dimensions"):
        send_to(torch.zeros(1, 1, 1, 1, 1), 1, None)
