"""The collectives every parallel scheme here is made of, and one way to make them differentiable.

Plain collectives on the first dimension (rows: tokens, embeddings): all_reduce_copy,
all_gather_rows, reduce_scatter_rows, own_rows, all_to_all_chunks.

`mapped(x, forward, backward)` is an autograd op whose forward applies `forward` to x and whose
backward applies `backward` to the incoming gradient. Every region map (tensor.py), the
cross-rank gather of embeddings (data.py) and the Ulysses all-to-all (ulysses.py) is such a
pair; bench/comm.py wraps this one class to attribute backward collectives to their forward.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

Map = Callable[[Tensor], Tensor]


def all_reduce_copy(x: Tensor, group) -> Tensor:
    """The sum over ranks, in a new tensor (x itself may still be needed by autograd)."""
    x = x.clone()
    dist.all_reduce(x, group=group)
    return x


def all_gather_rows(x: Tensor, group) -> Tensor:
    """(n, ...) on each rank -> (ranks * n, ...) in rank order."""
    size = dist.get_world_size(group)
    out = x.new_empty((x.shape[0] * size, *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous(), group=group)
    return out


def reduce_scatter_rows(x: Tensor, group) -> Tensor:
    """(ranks * n, ...) on each rank -> this rank's n rows of the sum over ranks."""
    size = dist.get_world_size(group)
    if x.shape[0] % size:
        raise ValueError(f"reduce-scatter of {x.shape[0]} rows over {size} ranks: not divisible")
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    dist.reduce_scatter_single(out, x.contiguous(), group=group)
    return out


def own_rows(x: Tensor, group) -> Tensor:
    """This rank's 1/ranks of the rows, no communication."""
    return x.chunk(dist.get_world_size(group))[dist.get_rank(group)].contiguous()


def all_to_all_chunks(chunks: Tensor, group) -> Tensor:
    """chunks (ranks, ...): chunk j goes to rank j; returns (ranks, ...) with chunk j from rank j."""
    chunks = chunks.contiguous()
    out = torch.empty_like(chunks)  # contiguous like its input: the collective writes memory order
    dist.all_to_all_single(out, chunks, group=group)
    return out


class _Mapped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, forward: Map, backward: Map) -> Tensor:
        ctx.backward_map = backward
        return forward(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.backward_map(grad), None, None


def mapped(x: Tensor, forward: Map, backward: Map) -> Tensor:
    return _Mapped.apply(x, forward, backward)


def identity(x: Tensor) -> Tensor:
    return x.view_as(x)  # a new tensor object, so autograd records the op


def all_gather_with_grad(x: Tensor, group) -> Tensor:
    """(n, ...) on each of k ranks -> (k*n, ...) in rank order; the backward hands each rank the
    sum over ranks of the gradient of its own rows (every rank's use of them)."""
    return mapped(x, partial(all_gather_rows, group=group), partial(reduce_scatter_rows, group=group))
