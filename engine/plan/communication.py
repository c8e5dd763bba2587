"""Bytes each rank sends per optimizer step, per process group, from the layout and the model's shapes.

Ring collectives: an all-gather or reduce-scatter of S bytes sends (n-1)/n S from each of n ranks,
an all-reduce twice that, an all-to-all (n-1)/n of its input. Per token a rank holds (its dp share of
the step's tokens, over ring x ulysses), per layer of the heaviest pipeline stage, per forward pass:

- tp: Megatron's sequence parallelism, 2 all-gathers + 2 reduce-scatters of hidden-size rows in each
  forward and the same in backward (without sequence parallelism, 2 all-reduces each way: the same
  bytes);
- ulysses: all-to-all of q, k, v (K and V repeated to ulysses heads where a tp rank has fewer) in,
  the output back, each forward; their gradients in backward;
- ring: ring - 1 hops of the K/V block per forward; backward passes K/V again and carries their
  fp32 gradients round the whole ring (engine/parallel/ring.py);
- pp: each micro-batch's hidden states forward and their gradient backward, per virtual stage;
- dp x ring x ulysses (FSDP): every layer gathered for each forward call and again for its backward
  (reshard after forward; full recomputation reuses the backward's gather), gradients
  reduce-scattered in fp32 once per step when reduction is deferred (pp, grad_accum) and at each
  grad-cache chunk's backward otherwise; plus, for an embedding task across dp, the all-gather of
  the batch's embeddings (InfoNCE over the global batch).

Forward passes per token: 1, +1 with train.recompute=full (the backward runs it again), +1 with
train.grad_cache (its first, gradient-free pass).
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.plan.memory import (
    Precision, defers_gradient_reduction, kv_width_for_attention, layer_calls_per_step, stage_trainable,
    tokens_per_step,
)


@dataclass(frozen=True)
class GroupTraffic:
    group: str  # tp | ulysses | ring | pp | dp_sp
    size: int  # ranks in the group
    span: int  # consecutive ranks the group spans (mesh order pp, dp, ring, ulysses, tp): > a node = across nodes
    bytes_per_step: float  # sent by each rank per optimizer step


def forward_passes(cfg) -> int:
    return 1 + (cfg.train.recompute == "full") + bool(cfg.train.grad_cache)


def traffic_per_step(cfg, args, layout, precision: Precision) -> list[GroupTraffic]:
    """Each group with more than one rank, and what each of its ranks sends per step."""
    from engine.config import reads_lm_head
    from engine.parallel.pipeline.stages import plan_stages

    tp, u, r, pp = layout.tp, layout.ulysses, layout.ring, layout.pp
    c = precision.compute
    h, q, kv = args.hidden_size, args.q_size / tp, args.kv_size / tp
    tokens = tokens_per_step(cfg, layout) / (u * r)  # this rank's share of the step
    plan = plan_stages(args, pp, layout.virtual, head_rows=reads_lm_head(cfg.task))
    heaviest = max(range(pp), key=plan.cost_of)
    layers = len(plan.layers_of(heaviest))
    passes = forward_passes(cfg)
    groups = []
    if tp > 1:
        per_token = (4 * passes + 4) * (tp - 1) / tp * h * c
        groups.append(GroupTraffic("tp", tp, tp, per_token * tokens * layers))
    if u > 1:
        width = q + 2 * kv_width_for_attention(args, layout) + q  # q, k, v in; the output back
        per_token = (passes + 1) * (u - 1) / u * width * c
        groups.append(GroupTraffic("ulysses", u, u * tp, per_token * tokens * layers))
    if r > 1:
        per_token = (passes + 1) * (r - 1) * 2 * kv * c + r * 2 * kv * 4
        groups.append(GroupTraffic("ring", r, r * u * tp, per_token * tokens * layers))
    if pp > 1:
        stream = h / tp if (cfg.parallel.sequence_parallel and tp > 1) else h
        hops = (1 + bool(cfg.train.grad_cache)) + 1  # forward sends (and the grad-cache pass's), one gradient back
        # Neighbouring stages are world / pp ranks apart: the pipeline spans all but one stage's ranks.
        span = (pp - 1) * layout.world_size // pp + 1
        groups.append(GroupTraffic("pp", pp, span, hops * layout.virtual * tokens * stream * precision.stream))
    shards = layout.dp * u * r
    if shards > 1:
        groups.append(GroupTraffic("dp_sp", shards, layout.world_size // pp,
                                   _fsdp_bytes(cfg, args, layout, plan, heaviest, layers, precision)))
    return groups


def _fsdp_bytes(cfg, args, layout, plan, stage: int, layers: int, precision: Precision) -> float:
    from engine.config import reads_lm_head
    from engine.parallel.pipeline.stages import unit_costs

    shards = layout.dp * layout.ulysses * layout.ring
    _, layer_params, _ = unit_costs(args, reads_lm_head(cfg.task))
    stage_params = plan.cost_of(stage)
    trainable = stage_trainable(cfg, args, stage_params, layers)
    root = stage_params - layers * layer_params  # gathered once per step (kept unsharded)
    calls = layer_calls_per_step(cfg, layout)
    gathers = calls * (2 + bool(cfg.train.grad_cache)) * layers * layer_params + root
    reductions = 1 if defers_gradient_reduction(cfg, layout) else (calls if cfg.train.grad_cache else 1)
    volume = (shards - 1) / shards * (gathers * precision.weights + reductions * trainable * 4) / layout.tp
    if cfg.task.type == "embedding" and layout.dp > 1:
        sequences = cfg.train.batch_size * (2 + cfg.task.num_negatives)
        volume += (layout.dp - 1) / layout.dp * sequences * args.hidden_size * 4
    return volume
