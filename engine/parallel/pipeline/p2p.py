"""Point-to-point between adjacent pipeline stages, for tensors whose shape changes every micro-batch.

A packed varlen stream changes length with every micro-batch (and under context parallelism with
every rank's shard), so a stage cannot size its receive buffer once from the first micro-batch:
torch.distributed.pipelining's PipelineStage does, and a later shape aborts gloo with "Received data
size doesn't match expected size" (measured here, torch 2.13). Each transfer is therefore a
fixed-size header, the shape, then the payload; both sides know the dtype (the run's compute dtype).

    send_to(activation, peer=stage + 1, group=pp_group)      # forward: activations downstream
    grad = recv_from(peer=stage + 1, group=pp_group, dtype=..., device=...)   # backward: gradients upstream

Ranks are positions in `group` (the pp group: rank i holds stage i). Blocking on purpose: the
schedules (engine/train/) order sends and receives so that every send meets its receive.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

MAX_DIMS = 4  # activations are (tokens, hidden); gradients of pooled rows (rows, hidden)


def send_to(tensor: Tensor, peer: int, group: dist.ProcessGroup) -> None:
    if tensor.dim() > MAX_DIMS:
        raise ValueError(f"pipeline transfers carry at most {MAX_DIMS} dimensions, got shape {tuple(tensor.shape)}")
    header = torch.full((1 + MAX_DIMS,), -1, dtype=torch.int64, device=tensor.device)
    header[0] = tensor.dim()
    header[1 : 1 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    dist.send(header, group=group, group_dst=peer)
    if tensor.numel():
        dist.send(tensor.contiguous(), group=group, group_dst=peer)


def recv_from(peer: int, group: dist.ProcessGroup, dtype: torch.dtype, device: torch.device) -> Tensor:
    header = torch.empty(1 + MAX_DIMS, dtype=torch.int64, device=device)
    dist.recv(header, group=group, group_src=peer)
    shape = tuple(int(n) for n in header[1 : 1 + int(header[0])])
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if tensor.numel():
        dist.recv(tensor, group=group, group_src=peer)
    return tensor


def gather_to_first_stage(tensors: dict[str, Tensor], group: dist.ProcessGroup) -> dict[str, Tensor]:
    """Every stage's {name: CPU tensor} merged on stage 0 ({} elsewhere): export gathers each stage's
    whole parameters on its first rank, then here. Pickled between our own ranks, never from a file."""
    gathered = [None] * dist.get_world_size(group) if dist.get_rank(group) == 0 else None
    dist.gather_object(tensors, gathered, group=group, group_dst=0)
    if gathered is None:
        return {}
    return {name: tensor for part in gathered for name, tensor in part.items()}
