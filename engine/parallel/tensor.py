"""Megatron tensor parallelism on torch.distributed: region maps and parallel layers.

Region maps (differentiable collectives over the tp group, built with collectives.mapped;
"f" and "g" in the Megatron paper):

    map                         forward                     backward
    copy_to_tp                  identity                    all-reduce
    reduce_from_tp              all-reduce                  identity
    gather_from_sp(grad=...)    all-gather along tokens     reduce-scatter ("reduce_scatter") or own slice ("split")
    reduce_scatter_to_sp        reduce-scatter along tokens all-gather

copy_to_tp is also how a tp-replicated parameter whose gradient is partial on each rank
(norm weights under sequence parallelism, q/k norms, LoRA A of a column layer, LoRA B of
a row layer, replicated KV projections) gets the sum of the ranks' contributions: apply
it to the weight as it is read.

Parameters are DTensors on the tp mesh with their global shapes and Hugging Face names
(Shard for split weights, Replicate for the rest), so FSDP2 composes with them and DCP
checkpoints reshard between layouts; the layers compute on `.to_local()` shards and do
their own communication, which is what lets packed varlen batches and LoRA through.

Layers (all keep the parameter names weight / bias / lora_A / lora_B):
- ColumnParallelLinear: output features split (q, k, v, gate, up); LoRA A replicated, B split.
- RowParallelLinear: input features split (o, down), reduces its partial output itself
  (all-reduce, or reduce-scatter under sequence parallelism) and adds the bias after;
  LoRA A split, B replicated.
- HeadSliceLinear: k/v when tp > num_kv_heads: the weight is replicated and each rank
  reads the rows of the one KV head its query heads use.
- VocabParallelEmbedding / VocabParallelHead: vocabulary rows split; the head reads just
  the rows a reranker needs from whichever rank holds them.
- ParallelRMSNorm / ReplicatedLinear: replicated parameters read through .to_local().
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from engine.kernels.lora import lora_linear
from engine.model.lora import LoRALinear
from engine.model.norm import RMSNorm, rms_norm
from engine.parallel.collectives import (
    all_gather_rows,
    all_gather_with_grad,
    all_reduce_copy,
    identity,
    mapped,
    own_rows,
    reduce_scatter_rows,
)


def local(tensor: Tensor | None) -> Tensor | None:
    """The rank's own part of a (possibly DTensor) parameter, differentiable."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


# ---- region maps -------------------------------------------------------------------------------


def copy_to_tp(x: Tensor, group) -> Tensor:
    return mapped(x, identity, partial(all_reduce_copy, group=group))


def reduce_from_tp(x: Tensor, group) -> Tensor:
    return mapped(x, partial(all_reduce_copy, group=group), identity)


def gather_from_sp(x: Tensor, group, grad: str = "reduce_scatter") -> Tensor:
    """grad="reduce_scatter" when tp-split layers consume the result (their input gradients
    are partial), "split" when every rank computes the same thing from it (a replicated loss)."""
    if grad == "reduce_scatter":
        return all_gather_with_grad(x, group)
    if grad == "split":
        return mapped(x, partial(all_gather_rows, group=group), partial(own_rows, group=group))
    raise ValueError(f"gather_from_sp: grad={grad!r} is not reduce_scatter or split")


def reduce_scatter_to_sp(x: Tensor, group) -> Tensor:
    return mapped(x, partial(reduce_scatter_rows, group=group), partial(all_gather_rows, group=group))


class RegionEntry(nn.Module):
    """Where a block's replicated (or sequence-split) input enters its tp-split layers."""

    def __init__(self, group, sequence_parallel: bool):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x: Tensor) -> Tensor:
        if self.sequence_parallel:
            return gather_from_sp(x, self.group, grad="reduce_scatter")
        return copy_to_tp(x, self.group)

    def extra_repr(self) -> str:
        return "all-gather tokens" if self.sequence_parallel else "copy (all-reduce in backward)"


class SequenceGather(nn.Module):
    """The final hidden states, gathered for pooling and a loss every tp rank computes alike."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        return gather_from_sp(x, self.group, grad="split")


# ---- parameters --------------------------------------------------------------------------------


def tp_parameter(full: Tensor, tp_mesh, shard_dim: int | None, requires_grad: bool) -> nn.Parameter:
    """A DTensor parameter with the global shape of `full`: this rank's slice, or all of it."""
    if shard_dim is None:
        local_part, placements = full.detach(), [Replicate()]
    else:
        local_part = full.detach().chunk(tp_mesh.size(), dim=shard_dim)[tp_mesh.get_local_rank()]
        placements = [Shard(shard_dim)]
    tensor = DTensor.from_local(local_part.clone().contiguous(), tp_mesh, placements, run_check=False)
    return nn.Parameter(tensor, requires_grad=requires_grad)


def _check_divisible(what: str, size: int, tp: int) -> None:
    if size % tp:
        raise ValueError(f"{what}={size} is not divisible by tp={tp}")


class _ParallelLinearBase(nn.Module):
    """Shared LoRA bookkeeping; subclasses decide which dimension each tensor splits on."""

    weight_dim: int | None = None  # weight (out, in) split dim
    bias_dim: int | None = None
    lora_a_dim: int | None = None  # lora_A (r, in)
    lora_b_dim: int | None = None  # lora_B (out, r)

    def __init__(self, linear: nn.Linear, tp_mesh):
        super().__init__()
        self.group = tp_mesh.get_group()
        self.tp_rank, self.tp = tp_mesh.get_local_rank(), tp_mesh.size()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = tp_parameter(linear.weight, tp_mesh, self.weight_dim, linear.weight.requires_grad)
        self.bias = None
        if linear.bias is not None:
            self.bias = tp_parameter(linear.bias, tp_mesh, self.bias_dim, linear.bias.requires_grad)
        self.lora = isinstance(linear, LoRALinear)
        if self.lora:
            self.rank, self.alpha, self.scaling = linear.rank, linear.alpha, linear.scaling
            self.lora_A = tp_parameter(linear.lora_A, tp_mesh, self.lora_a_dim, linear.lora_A.requires_grad)
            self.lora_B = tp_parameter(linear.lora_B, tp_mesh, self.lora_b_dim, linear.lora_B.requires_grad)
            self.lora_dropout = linear.lora_dropout

    def extra_repr(self) -> str:
        lora = f", lora rank={self.rank}" if self.lora else ""
        return f"in={self.in_features}, out={self.out_features}, tp={self.tp}{lora}"


class ColumnParallelLinear(_ParallelLinearBase):
    """y[:, own output features] = x W_own^T + b_own; x is the full (gathered) input."""

    weight_dim, bias_dim, lora_a_dim, lora_b_dim = 0, 0, None, 0

    def __init__(self, linear: nn.Linear, tp_mesh):
        _check_divisible(f"output features of {type(linear).__name__}", linear.out_features, tp_mesh.size())
        super().__init__(linear, tp_mesh)

    def forward(self, x: Tensor) -> Tensor:
        if not self.lora:
            return F.linear(x, local(self.weight), local(self.bias))
        lora_a = copy_to_tp(local(self.lora_A), self.group)  # each rank's B slice gives part of dA
        return lora_linear(x, local(self.weight), local(self.bias), self.lora_dropout(x), lora_a,
                           local(self.lora_B), self.scaling)


class RowParallelLinear(_ParallelLinearBase):
    """y = sum over ranks of x_own W_own^T, then + b: all-reduce, or reduce-scatter to a token slice."""

    weight_dim, bias_dim, lora_a_dim, lora_b_dim = 1, None, 1, None

    def __init__(self, linear: nn.Linear, tp_mesh, sequence_parallel: bool):
        _check_divisible(f"input features of {type(linear).__name__}", linear.in_features, tp_mesh.size())
        super().__init__(linear, tp_mesh)
        self.sequence_parallel = sequence_parallel

    def forward(self, x: Tensor) -> Tensor:
        if self.lora:
            # (x_own A_own^T) summed over ranks is x A^T; B is linear, so one reduction covers both.
            lora_b = copy_to_tp(local(self.lora_B), self.group)
            partial = lora_linear(x, local(self.weight), None, self._dropout_own_features(x), local(self.lora_A),
                                  lora_b, self.scaling)
        else:
            partial = F.linear(x, local(self.weight))
        if self.sequence_parallel:
            y = reduce_scatter_to_sp(partial, self.group)
            bias = None if self.bias is None else copy_to_tp(local(self.bias), self.group)  # tokens differ per rank
        else:
            y = reduce_from_tp(partial, self.group)
            bias = local(self.bias)
        return y if bias is None else y + bias

    def _dropout_own_features(self, x: Tensor) -> Tensor:
        """LoRA dropout on this rank's input features. Every tp rank draws the same RNG stream,
        so each draws the mask of all features and keeps its own columns: one mask over the
        whole input, as in one process, not the same pattern repeated on every slice."""
        drop = self.lora_dropout
        if not (isinstance(drop, nn.Dropout) and drop.p > 0 and self.training):
            return x
        keep = torch.empty(*x.shape[:-1], x.shape[-1] * self.tp, device=x.device).bernoulli_(1 - drop.p)
        own = keep.chunk(self.tp, dim=-1)[self.tp_rank].to(x.dtype)
        return x * own / (1 - drop.p)


class HeadSliceLinear(_ParallelLinearBase):
    """k/v projections when tp > num_kv_heads: replicated weight, each rank uses its KV head's rows.

    Ranks sharing a KV head each contribute part of its gradient (their own query heads),
    so the replicated weight is read through copy_to_tp.
    """

    weight_dim, bias_dim, lora_a_dim, lora_b_dim = None, None, None, None

    def __init__(self, linear: nn.Linear, tp_mesh, num_kv_heads: int, head_dim: int):
        super().__init__(linear, tp_mesh)
        head = self.tp_rank * num_kv_heads // self.tp
        self.rows = slice(head * head_dim, (head + 1) * head_dim)

    def _own_rows(self, tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else copy_to_tp(local(tensor), self.group)[self.rows]

    def forward(self, x: Tensor) -> Tensor:
        if not self.lora:
            return F.linear(x, self._own_rows(self.weight), self._own_rows(self.bias))
        lora_a = copy_to_tp(local(self.lora_A), self.group)
        return lora_linear(x, self._own_rows(self.weight), self._own_rows(self.bias), self.lora_dropout(x), lora_a,
                           self._own_rows(self.lora_B), self.scaling)


class VocabParallelEmbedding(nn.Module):
    """Each rank looks up the ids in its vocabulary slice (zeros elsewhere); the sum over ranks
    is the embedding: all-reduced, or reduce-scattered to a token slice under sequence parallelism."""

    def __init__(self, embedding: nn.Embedding, tp_mesh, sequence_parallel: bool):
        super().__init__()
        _check_divisible("vocab_size", embedding.num_embeddings, tp_mesh.size())
        self.group, self.sequence_parallel = tp_mesh.get_group(), sequence_parallel
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        per_rank = embedding.num_embeddings // tp_mesh.size()
        self.vocab_start = tp_mesh.get_local_rank() * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.weight = tp_parameter(embedding.weight, tp_mesh, 0, embedding.weight.requires_grad)

    def forward(self, ids: Tensor) -> Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, local(self.weight)).masked_fill(outside[..., None], 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sp(partial, self.group)
        return reduce_from_tp(partial, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows {self.vocab_start}:{self.vocab_end} here"


class VocabParallelHead(nn.Module):
    """The LM head with its vocabulary rows split (tied to the embedding when the model ties them)."""

    def __init__(self, weight: nn.Parameter, vocab_start: int, vocab_end: int, group):
        super().__init__()
        self.weight = weight
        self.vocab_start, self.vocab_end, self.group = vocab_start, vocab_end, group

    def rows(self, token_ids: list[int]) -> Tensor:
        """(k, hidden): the rows of these tokens, each from the rank that holds it."""
        weight = local(self.weight)
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=weight.device)
        here = (ids >= self.vocab_start) & (ids < self.vocab_end)
        picked = weight.index_select(0, (ids - self.vocab_start).clamp(0, weight.shape[0] - 1))
        return reduce_from_tp(picked * here[:, None].to(picked.dtype), self.group)

    @torch.no_grad()
    def forward(self, hidden: Tensor) -> Tensor:
        """Full-vocabulary logits, gathered (tests and checks only; training reads rows())."""
        part = F.linear(hidden, local(self.weight))
        pieces = [torch.empty_like(part) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(pieces, part.contiguous(), group=self.group)
        return torch.cat(pieces, dim=-1)


class ParallelRMSNorm(RMSNorm):
    """RMSNorm with a tp-replicated weight; sum_grads when ranks normalise different tokens or heads."""

    def __init__(self, norm: RMSNorm, tp_mesh, sum_grads: bool):
        nn.Module.__init__(self)
        self.eps, self.group, self.sum_grads = norm.eps, tp_mesh.get_group(), sum_grads
        self.weight = tp_parameter(norm.weight, tp_mesh, None, norm.weight.requires_grad)

    def forward(self, x: Tensor) -> Tensor:
        weight = local(self.weight)
        if self.sum_grads:
            weight = copy_to_tp(weight, self.group)
        return rms_norm(x, weight, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sum_grads={self.sum_grads}"


class ReplicatedLinear(nn.Linear):
    """A layer every tp rank computes alike on replicated input (the reranker's score head)."""

    def __init__(self, linear: nn.Linear, tp_mesh):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = tp_parameter(linear.weight, tp_mesh, None, linear.weight.requires_grad)
        self.bias = None if linear.bias is None else tp_parameter(linear.bias, tp_mesh, None, linear.bias.requires_grad)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, local(self.weight), local(self.bias))
