"""Fill a parallelized model's meta-device parameters with just this rank's slices of a
Hugging Face checkpoint, so no rank ever holds the whole model (a 70B backbone at tp 8 reads
1/8 of each split weight per rank; replicated weights, such as norms, whole).

The slice of each parameter follows its DTensor placement on the tp mesh (Shard(d): this
rank's chunk along d; Replicate: all of it); a plain parameter is read whole.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from engine.model.hf_io import CheckpointError, CheckpointSlices


def _local_index(param: nn.Parameter) -> tuple[slice, ...]:
    if not isinstance(param, DTensor):
        return ()
    mesh = param.device_mesh
    index = [slice(None)] * param.dim()
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard():
            dim, ranks = placement.dim, mesh.size(mesh_dim)
            size = param.shape[dim] // ranks
            start = mesh.get_local_rank(mesh_dim) * size
            index[dim] = slice(start, start + size)
    return tuple(index)


def _filled(param: nn.Parameter, tensor: torch.Tensor) -> nn.Parameter:
    if isinstance(param, DTensor):
        tensor = DTensor.from_local(tensor, param.device_mesh, param.placements, run_check=False,
                                    shape=param.shape, stride=param.stride())
    return nn.Parameter(tensor, requires_grad=param.requires_grad)


@torch.no_grad()
def fill_meta_parameters(model: nn.Module, read: Callable[[str, nn.Parameter], torch.Tensor],
                         prefix: str = "", source: str = "the gathered state") -> int:
    """Replace every meta-device parameter named `prefix...` by read(name without prefix, param);
    returns how many tensors were read. Tied parameters stay one object."""
    names = {id(p): name for name, p in model.named_parameters() if name.startswith(prefix)}
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for attr, param in list(module._parameters.items()):
            if param is None or not param.is_meta or id(param) not in names:
                continue
            if id(param) not in replaced:
                replaced[id(param)] = _filled(param, read(names[id(param)].removeprefix(prefix), param))
            setattr(module, attr, replaced[id(param)])
    still_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CheckpointError(f"{source}: no weights were loaded for {', '.join(still_meta[:5])}")
    return len(replaced)


def load_local_shards(task: nn.Module, slices: CheckpointSlices, dtype: torch.dtype,
                      device: torch.device, prefix: str = "backbone.") -> int:
    """Fill a meta backbone with this rank's slices of the checkpoint `slices` reads, after the
    same architecture checks as a whole load (engine.model.hf_io.load_pretrained)."""
    expected = {name.removeprefix(prefix) for name, _ in task.named_parameters() if name.startswith(prefix)}
    # A pipeline stage reads only its own tensors; the others' belong to the other stages.
    unexpected = sorted(name for name in set(slices.names()) - expected if task.backbone.holds(name))
    if unexpected:
        raise CheckpointError(f"{slices.path}: weights do not match the architecture in config.json: "
                              f"unexpected {', '.join(unexpected[:5])}")

    def read(name: str, param: nn.Parameter) -> torch.Tensor:
        if slices.shape(name) != tuple(param.shape):
            raise CheckpointError(f"{slices.path}: {name} has shape {list(slices.shape(name))} but config.json "
                                  f"makes it {list(param.shape)}")
        return slices.read(name, _local_index(param), dtype=dtype, device=device)

    return fill_meta_parameters(task, read, prefix, source=slices.path)
