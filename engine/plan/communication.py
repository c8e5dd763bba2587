"""Bytes each rank sends per optimizer step, per process group, from the layout and the model's shapes.

Ring collectives: an all-gather or reduce-scatter of S bytes sends (n-1)/n S from each of n ranks,
an all-reduce twice that, an all-to-all (n-1)/n of its input. Per micro-batch, on the heaviest
pipeline stage's layers, with T the tokens a rank holds (the micro-batch over ring x ulysses):

- tp: Megatron's sequence parallelism, per layer 2 all-gathers + 2 reduce-scatters of T x hidden in
  each forward and the same in backward (without sequence parallelism, 2 all-reduces each way:
  the same bytes);
- ulysses: all-to-all of q, k, v in and the output back, each forward and again in backward;
- ring: ring - 1 hops of the K/V block per forward; backward passes K/V and their gradients;
- pp: each micro-batch's hidden states forward and their gradient backward, per virtual stage;
- dp x ring x ulysses (FSDP): every layer gathered for each forward and again for its backward
  (reshard after forward), gradients reduce-scattered once per step in fp32; plus, for an
  embedding task across dp, the all-gather of the batch's embeddings (InfoNCE over the global batch).

Forward passes per micro-batch: 1, +1 with train.recompute=full (the backward runs it again),
+1 with train.grad_cache (its first, gradient-free pass).
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.plan.memory import Precision, lora_parameter_count, micro_batches_per_pass, tokens_per_microbatch


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
    from engine.parallel.pipeline.stages import plan_stages, unit_costs

    tp, u, r, pp = layout.tp, layout.ulysses, layout.ring, layout.pp
    c = precision.compute
    h, q, kv = args.hidden_size, args.q_size / tp, args.kv_size / tp
    micro = micro_batches_per_pass(cfg, layout) if (pp > 1 or cfg.train.grad_cache) else cfg.train.grad_accum
    tokens = tokens_per_microbatch(cfg, layout) / (u * r)
    plan = plan_stages(args, pp, layout.virtual, head_rows=reads_lm_head(cfg.task))
    heaviest = max(range(pp), key=plan.cost_of)
    layers = len(plan.layers_of(heaviest))
    passes = forward_passes(cfg)
    groups = []
    if tp > 1:
        per_layer = (4 * passes + 4) * (tp - 1) / tp * tokens * h * c
        groups.append(GroupTraffic("tp", tp, tp, per_layer * layers * micro))
    if u > 1:
        per_layer = (passes + 1) * (u - 1) / u * (2 * q + 2 * kv) * tokens * c
        groups.append(GroupTraffic("ulysses", u, u * tp, per_layer * layers * micro))
    if r > 1:
        per_layer = (passes + 2) * (r - 1) * 2 * kv * tokens * c
        groups.append(GroupTraffic("ring", r, r * u * tp, per_layer * layers * micro))
    if pp > 1:
        stream = h / tp if (cfg.parallel.sequence_parallel and tp > 1) else h
        hops = (1 + bool(cfg.train.grad_cache)) + 1  # forward sends (and the grad-cache pass's), one gradient back
        groups.append(GroupTraffic("pp", pp, layout.world_size, hops * layout.virtual * micro * tokens * stream
                                   * precision.stream))
    shards = layout.dp * u * r
    if shards > 1:
        _, layer_params, _ = unit_costs(args, reads_lm_head(cfg.task))
        stage_params = plan.cost_of(heaviest)
        trainable = (lora_parameter_count(args, cfg.lora.rank, list(cfg.lora.targets)) * layers // args.num_layers
                     if cfg.lora.rank > 0 else stage_params)
        root = stage_params - layers * layer_params  # gathered once per step (kept unsharded)
        gathers = (passes + 1) * micro * layers * layer_params + root
        volume = (shards - 1) / shards * (gathers * precision.weights + trainable * 4) / tp
        if cfg.task.type == "embedding" and layout.dp > 1:
            sequences = cfg.train.batch_size * (2 + cfg.task.num_negatives)
            volume += (layout.dp - 1) / layout.dp * sequences * h * 4
        groups.append(GroupTraffic("dp_sp", shards, layout.world_size // pp, volume))
    return groups
