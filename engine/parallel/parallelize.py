"""Turn a task model built for one process into its parallel layout, in place.

The model is built on every rank with the same seed (same LoRA init): whole for random
init, or with its backbone on the meta device when it comes from a checkpoint. Each layer
is swapped for its tensor-parallel counterpart keeping only this rank's slice (tensor.py),
a meta backbone is then filled with just those slices (load.py), every sequence is split over
ring x ulysses ranks (context.py), and FSDP2 shards what remains over dp x ring x ulysses (data.py).
Parameter names do not change, so checkpoints and exports see the single-process names.
"""
from __future__ import annotations

from typing import Callable

from torch import nn
from torch.distributed.tensor import DTensor

from engine.model.lora import LoRALinear, set_submodule
from engine.parallel.context import ContextParallel
from engine.parallel.data import shard_data_parallel
from engine.parallel.mesh import ParallelMesh
from engine.parallel.pipeline.stage import keep_stage, plan_for
from engine.parallel.tensor import (
    ColumnParallelLinear,
    HeadSliceLinear,
    ParallelRMSNorm,
    RegionEntry,
    ReplicatedLinear,
    RowParallelLinear,
    SequenceGather,
    VocabParallelEmbedding,
    VocabParallelHead,
    tp_parameter,
)


def parallelize(task: nn.Module, mesh: ParallelMesh, sequence_parallel: bool,
                load_weights: Callable[[nn.Module], object] | None = None) -> nn.Module:
    """load_weights(task), when given, runs after the tensor-parallel split and before FSDP:
    it fills a meta-device backbone with this rank's slices (engine.parallel.load)."""
    if mesh.pp > 1:
        apply_pipeline(task, mesh)
    if mesh.tp > 1:
        apply_tensor_parallel(task, mesh, sequence_parallel)
    if mesh.layout.ring * mesh.layout.ulysses > 1:
        apply_context_parallel(task.backbone, mesh, sequence_parallel)
    if load_weights is not None:
        load_weights(task)
    if mesh.dp_sp > 1:
        shard_data_parallel(task, mesh)
    if mesh.dp > 1:
        task.dp_group = mesh.group("dp")
    return task


def apply_pipeline(task: nn.Module, mesh: ParallelMesh) -> None:
    """Keep this rank's pipeline stage (engine/parallel/pipeline): its layers, under their global names."""
    keep_stage(task, plan_for(task, mesh.pp, mesh.layout.virtual).chunks_of(mesh.pp_rank))


def apply_context_parallel(backbone: nn.Module, mesh: ParallelMesh, sequence_parallel: bool) -> None:
    """Every sequence split over ring x ulysses ranks (context.py); attention crosses them."""
    tokens_multiple = mesh.tp if sequence_parallel and mesh.tp > 1 else 1
    context = ContextParallel(mesh, backbone.args.causal, tokens_multiple)
    backbone.context_parallel = context
    for layer in backbone.held_layers():
        layer.self_attn.context_attention = context.attention


def apply_tensor_parallel(task: nn.Module, mesh: ParallelMesh, sequence_parallel: bool) -> None:
    tp_mesh, group = mesh.submesh("tp"), mesh.group("tp")
    backbone = task.backbone
    args = backbone.args
    for layer in backbone.held_layers():
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = ColumnParallelLinear(attn.q_proj, tp_mesh)
        if args.num_kv_heads >= mesh.tp:
            attn.k_proj = ColumnParallelLinear(attn.k_proj, tp_mesh)
            attn.v_proj = ColumnParallelLinear(attn.v_proj, tp_mesh)
        else:  # fewer KV heads than ranks: each rank keeps the whole KV head its query heads use
            attn.k_proj = HeadSliceLinear(attn.k_proj, tp_mesh, args.num_kv_heads, args.head_dim)
            attn.v_proj = HeadSliceLinear(attn.v_proj, tp_mesh, args.num_kv_heads, args.head_dim)
        attn.o_proj = RowParallelLinear(attn.o_proj, tp_mesh, sequence_parallel)
        if hasattr(attn, "q_norm"):  # shared by all heads; each rank normalises its own heads
            attn.q_norm = ParallelRMSNorm(attn.q_norm, tp_mesh, sum_grads=True)
            attn.k_norm = ParallelRMSNorm(attn.k_norm, tp_mesh, sum_grads=True)
        mlp.gate_proj = ColumnParallelLinear(mlp.gate_proj, tp_mesh)
        mlp.up_proj = ColumnParallelLinear(mlp.up_proj, tp_mesh)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, tp_mesh, sequence_parallel)
        # Under sequence parallelism the norms see only this rank's tokens.
        layer.input_layernorm = ParallelRMSNorm(layer.input_layernorm, tp_mesh, sum_grads=sequence_parallel)
        layer.post_attention_layernorm = ParallelRMSNorm(
            layer.post_attention_layernorm, tp_mesh, sum_grads=sequence_parallel
        )
        layer.attn_entry = RegionEntry(group, sequence_parallel)
        layer.mlp_entry = RegionEntry(group, sequence_parallel)

    decoder = backbone.model
    # A pipeline stage may hold neither the embedding nor the head (engine/parallel/pipeline/stage.py).
    if decoder.embed_tokens is not None:
        decoder.embed_tokens = VocabParallelEmbedding(decoder.embed_tokens, tp_mesh, sequence_parallel)
    if backbone.lm_head is not None:
        if args.tie_word_embeddings:  # the same stage holds the embedding (keep_stage refuses otherwise)
            head_weight = decoder.embed_tokens.weight
        else:
            head_weight = tp_parameter(backbone.lm_head.weight, tp_mesh, 0, backbone.lm_head.weight.requires_grad)
        rows = args.vocab_size // mesh.tp
        backbone.lm_head = VocabParallelHead(head_weight, mesh.tp_rank * rows, (mesh.tp_rank + 1) * rows, group)
    if decoder.norm is not None:
        decoder.norm = ParallelRMSNorm(decoder.norm, tp_mesh, sum_grads=sequence_parallel)
    if sequence_parallel:
        backbone.output_gather = SequenceGather(group)
        backbone.sequence_pad_multiple = mesh.tp

    for name, module in list(task.named_modules()):
        if type(module) is nn.Linear:  # a task head on replicated (gathered) hidden states
            set_submodule(task, name, ReplicatedLinear(module, tp_mesh))
    stray = [name for name, m in task.named_modules() if isinstance(m, LoRALinear)]
    if stray:  # adapters tensor parallelism does not split (e.g. on lm_head) would be lost silently
        raise TypeError(f"tensor parallelism splits LoRA only on the block projections, not on {', '.join(stray[:5])}")
    plain = [name for name, p in task.named_parameters() if not isinstance(p, DTensor)]
    if plain:
        raise TypeError(f"tensor parallelism left parameters without a tp layout: {', '.join(plain[:5])}")
