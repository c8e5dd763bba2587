"""Plan a run without running it: parameter count and estimated memory per rank.

Estimates, not measurements. Activation memory per transformer layer follows Korthikanti et
al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"): about 34*s*b*h bytes
in 16-bit with flash attention (no s^2 term), divided by tp under Megatron sequence
parallelism (s*b*h*(10 + 24/tp) without it) and by ulysses*ring under context parallelism.
train.recompute=full keeps only each layer's 2-byte input plus one layer being recomputed.
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3


@dataclass
class MemoryPlan:
    total_params: int
    trainable_params: int
    tokens_per_microbatch: int  # per dp rank, before sequence splitting
    weights: float  # bytes per rank
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def lines(self) -> list[str]:
        return [
            f"parameters: {self.total_params / 1e9:.2f}B total, {self.trainable_params / 1e6:.2f}M trainable",
            f"tokens per micro-batch per data-parallel rank: {self.tokens_per_microbatch}",
            f"memory per rank (estimate): weights {self.weights / GiB:.2f} GiB, grads {self.grads / GiB:.2f} GiB, "
            f"optimizer {self.optimizer / GiB:.2f} GiB, activations {self.activations / GiB:.2f} GiB, "
            f"total {self.total / GiB:.2f} GiB",
        ]


def lora_parameter_count(args, rank: int, targets: list[str]) -> int:
    h, kv = args.hidden_size, args.num_kv_heads * args.head_dim
    q = args.num_heads * args.head_dim
    shapes = {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, args.intermediate_size), "up_proj": (h, args.intermediate_size),
        "down_proj": (args.intermediate_size, h),
    }
    per_layer = sum(rank * (i + o) for name, (i, o) in shapes.items() if name in targets)
    return per_layer * args.num_layers


def tokens_per_microbatch(cfg) -> int:
    t, d, tr = cfg.task, cfg.data, cfg.train
    group = 1 + t.num_negatives
    if tr.grad_cache:
        return tr.grad_cache_chunk * (d.max_len if t.type == "reranker" else d.doc_max_len)
    queries = tr.batch_size // tr.grad_accum
    if t.type == "reranker":
        return queries * group * d.max_len
    return queries * (d.query_max_len + group * d.doc_max_len)


def plan_memory(cfg, args, total_params: int, layout) -> MemoryPlan:
    trainable = (
        lora_parameter_count(args, cfg.lora.rank, list(cfg.lora.targets)) if cfg.lora.rank > 0 else total_params
    )
    weight_bytes = 2 if cfg.model.dtype in ("bfloat16", "float16") else 4
    model_shards = layout.tp * layout.pp
    tokens = max(1, tokens_per_microbatch(cfg) // layout.dp)
    tokens_per_rank = tokens / (layout.ulysses * layout.ring)
    layers_per_stage = -(-args.num_layers // layout.pp)
    h = args.hidden_size
    # Korthikanti et al.: 34sbh/t with sequence parallelism, sbh(10 + 24/t) without it
    # (norms and dropouts then hold full activations on every tp rank).
    per_token = 34 / layout.tp if cfg.parallel.sequence_parallel or layout.tp == 1 else 10 + 24 / layout.tp
    full_layer = per_token * tokens_per_rank * h
    # Selective recomputation frees the attention core's own activations, which the fused
    # varlen kernels assumed here never hold beyond q, k, v, the output and the LSE.
    if cfg.train.recompute == "full":
        activations = layers_per_stage * 2 * tokens_per_rank * h + full_layer
    else:
        activations = layers_per_stage * full_layer
    return MemoryPlan(
        total_params=total_params,
        trainable_params=trainable,
        tokens_per_microbatch=tokens,
        weights=total_params * weight_bytes / model_shards,
        grads=trainable * 4 / model_shards,
        # AdamW's two fp32 moments, sharded over every data-parallel replica (ZeRO-1 and up).
        optimizer=trainable * 8 / model_shards / (layout.dp * layout.ulysses * layout.ring),
        activations=activations,
    )
