"""Data parallelism: gradient averaging and optimizer-state sharding over dp x ring x ulysses
(FSDP2), the global-norm gradient clip, reductions of logged numbers, and gathering sharded
parameters back into whole tensors for export. (The cross-rank gather of embeddings is
collectives.all_gather_with_grad.)

Conventions (the numbers equal those of one process on the global batch):
- every dp rank's loss is the mean over its own queries; FSDP2 averages gradients over
  dp_sp, so the update is that of the mean over the global batch;
- all_gather_with_grad hands each rank, in backward, the sum over ranks of the gradient
  of its slice: with the averaging above, exactly the single-process gradient;
- the clip norm counts every parameter element once, whatever its sharding.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from engine.parallel.mesh import ParallelMesh


def shard_data_parallel(task: nn.Module, mesh: ParallelMesh) -> None:
    """FSDP2 over the dp_sp mesh: each decoder layer is one unit, the rest (embedding, head,
    final norm, task head) the root. Parameters, gradients and AdamW state are sharded."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    dp_mesh = mesh.submesh("dp_sp")
    # Gradients are reduced in fp32 whatever the compute dtype (the loss is averaged over many ranks).
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for layer in task.backbone.held_layers():
        fully_shard(layer, mesh=dp_mesh, mp_policy=policy)
    fully_shard(task, mesh=dp_mesh, mp_policy=policy)
    # Training and evaluation run the task through encode_tower (or, on a pipeline stage, encode_stage),
    # not forward(): FSDP must gather the root's parameters (embedding, final norm, heads) around them.
    register_fsdp_forward_method(task, "encode_tower")
    register_fsdp_forward_method(task, "encode_stage")


def set_gradient_sync(task: nn.Module, mesh: ParallelMesh, enabled: bool) -> None:
    """Whether the next backward reduces gradients over dp: FSDP2 does at every backward unless told
    not to, and between the micro-batches of one step it need not (the last one reduces the sum)."""
    if mesh.dp_sp > 1:
        task.set_requires_gradient_sync(enabled)


def pipeline_gradient_sync(task: nn.Module, chunk_layers: dict[int, list[nn.Module]], mesh: ParallelMesh):
    """For a pipeline stage under FSDP: the hook its schedule calls before each backward
    (engine/train/pipeline.py), so each FSDP unit reduces its gradients once per step, at its last
    backward: a chunk's layers at the chunk's, the root (embedding, norm, heads, which every chunk's
    forward passes through as encode_stage) at the stage's. None without data parallelism."""
    if mesh.dp_sp == 1:
        return None

    def before_backward(chunk: int, chunk_done: bool, stage_done: bool) -> None:
        for layer in chunk_layers[chunk]:
            layer.set_requires_gradient_sync(chunk_done, recurse=False)
        task.set_requires_gradient_sync(stage_done, recurse=False)

    return before_backward


def _square_sum_counted_once(grad: Tensor, mesh: ParallelMesh) -> Tensor:
    """Sum of squares of this rank's part of grad, zero where another rank holds the same copy.

    A plain tensor in a distributed run is a copy every rank of its pipeline stage holds
    (parallelize() leaves none when tp > 1 or dp > 1, but a caller may): it counts on the stage's
    first rank only. A DTensor's mesh never spans stages: each stage counts its own parameters.
    """
    if not isinstance(grad, DTensor):
        if not mesh.first_of_stage:
            return torch.zeros((), device=grad.device)
        return grad.float().pow(2).sum()
    coordinate = grad.device_mesh.get_coordinate()
    for dim, placement in enumerate(grad.placements):
        if placement.is_replicate() and coordinate[dim] != 0:
            return torch.zeros((), device=grad.device)
    return grad.to_local().float().pow(2).sum()


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float, mesh: ParallelMesh) -> float:
    """Global L2 norm of all gradients (every element once, over every rank); scale them to
    max_norm when above it. Returns the norm before clipping, the same number on every rank."""
    if not mesh.distributed:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else _collective_device(mesh)
    total = torch.zeros((), device=device, dtype=torch.float64)
    for grad in grads:
        total += _square_sum_counted_once(grad, mesh).double()
    dist.all_reduce(total)
    norm = float(total.sqrt())
    if math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)  # the same epsilon as torch.nn.utils.clip_grad_norm_
        for grad in grads:
            grad.mul_(scale)
    return norm


def reduce_mean(value: float, mesh: ParallelMesh, dim: str = "dp") -> float:
    """The mean of a per-rank number over a mesh dimension (logged loss)."""
    return float(_sum_over(value, torch.float64, mesh, dim)) / _size(mesh, dim)


def reduce_sum(value: int, mesh: ParallelMesh, dim: str = "dp") -> int:
    return int(_sum_over(value, torch.int64, mesh, dim))


def _size(mesh: ParallelMesh, dim: str) -> int:
    return mesh.submesh(dim).size() if mesh.distributed else 1


def _sum_over(value, dtype: torch.dtype, mesh: ParallelMesh, dim: str):
    if _size(mesh, dim) == 1:
        return value
    t = torch.tensor([value], dtype=dtype, device=_collective_device(mesh))
    dist.all_reduce(t, group=mesh.group(dim))
    return t[0].item()


def _collective_device(mesh: ParallelMesh) -> torch.device:
    """Where a small tensor must live for the mesh's groups: nccl takes CUDA tensors only."""
    return torch.device(mesh.device_mesh.device_type)


class _QuietRedistribute(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "sequential all_gather" not in record.getMessage()


@torch.no_grad()
def gather_full_parameters(model: nn.Module, gradients: bool = False, keep: bool = True) -> dict[str, Tensor]:
    """Every parameter this rank's pipeline stage holds (or, with gradients=True, every gradient
    there is) as one whole CPU tensor, by its global name. Collective: every rank of the stage calls
    it, in the same order. keep=False drops each tensor once gathered (returns {}), so that only one
    rank ever holds them (export)."""
    # Strided FSDP x TP shards gather in two steps; DTensor warns about that each time.
    quiet = _QuietRedistribute()
    logger = logging.getLogger("torch.distributed.tensor._redistribute")
    logger.addFilter(quiet)
    try:
        out = {}
        for name, param in model.named_parameters():
            tensor = param.grad if gradients else param
            if tensor is None:
                continue
            tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            if keep:
                out[name] = tensor.detach().cpu()
        return out
    finally:
        logger.removeFilter(quiet)
