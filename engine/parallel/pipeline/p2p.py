"""Point-to-point between pipeline stages: one tick's sends and receives posted together.

    works = post(sends=[(activation, next_rank)], receives=[(buffer, prev_rank)], group=pp_group)

A packed varlen stream changes length with every micro-batch (and under context parallelism with
every rank's shard), so buffers cannot be sized once from the first micro-batch:
torch.distributed.pipelining's PipelineStage does, and a later shape aborts gloo with "Received data
size doesn't match expected size" (measured here, torch 2.13). Here the receiver sizes each buffer
from the micro-batch itself (every stage lays out the same stream: PipelineStage.hidden_shape), so
no shape travels and nothing waits on the host for one.

One call is one tick of a schedule (engine/train/pipeline_timeline.py): every send and receive of
the tick in one batch_isend_irecv, which is what keeps 1F1B from deadlocking where two neighbours
each send before they receive (NCCL's sends wait for the matching receive; Megatron batches them
the same way). The calls return at once; a receive is waited for when its tensor is needed, a send
before its tensor could change (engine/train/pipeline.py). Ranks are positions in `group` (the pp
group: rank i holds stage i).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist
from torch import Tensor


def post(sends: Sequence[tuple[Tensor, int]], receives: Sequence[tuple[Tensor, int]],
         group: dist.ProcessGroup | None) -> list:
    """Start sending each (tensor, peer) and receiving into each (buffer, peer), all at once. At most
    one message per (sender, receiver) pair per call; empty tensors are not sent (both ends know their
    shape). Returns, per send then per receive, the works to wait for before its tensor is used
    ([] for an empty tensor): its own on gloo, the tick's coalesced ones on NCCL."""
    ops, index = [], []
    for position, (tensor, peer) in enumerate(list(sends) + list(receives)):
        if tensor.numel():
            op = dist.isend if position < len(sends) else dist.irecv
            ops.append(dist.P2POp(op, tensor, group=group, group_peer=peer))
            index.append(position)
    waits: list[list] = [[] for _ in range(len(sends) + len(receives))]
    if ops:
        works = dist.batch_isend_irecv(ops)
        per_op = [[work] for work in works] if len(works) == len(ops) else [works] * len(ops)
        for position, op_works in zip(index, per_op):
            waits[position] = op_works
    return waits


def gather_to_first_stage(tensors: dict[str, Tensor], group: dist.ProcessGroup) -> dict[str, Tensor]:
    """Every stage's {name: CPU tensor} merged on stage 0 ({} elsewhere): export gathers each stage's
    whole parameters on its first rank, then here. Pickled between our own ranks, never from a file."""
    gathered = [None] * dist.get_world_size(group) if dist.get_rank(group) == 0 else None
    dist.gather_object(tensors, gathered, group=group, group_dst=0)
    if gathered is None:
        return {}
    return {name: tensor for part in gathered for name, tensor in part.items()}
