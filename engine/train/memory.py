"""Plan a run without running it: parameter count and estimated memory per rank.

Estimates, not measurements. Activation memory per transformer layer follows Korthikanti et
al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"): about 34*s*b*h bytes
in 16-bit with flash attention (no s^2 term), divided by tp under Megatron sequence
parallelism (s*b*h*(10 + 24/tp) without it) and by ulysses*ring under context parallelism.
train.recompute=full keeps only each layer's 2-byte input plus one layer being recomputed.
With pipeline stages (pp > 1) each stage is planned apart: its parameters by the stage rule
(engine/parallel/pipeline/stages.py) and its activations times the micro-batch layers its schedule keeps in
flight there; the summary line is the heaviest stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
    stages: list[StageMemory] = field(default_factory=list)  # pp > 1: each stage's rank

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def lines(self) -> list[str]:
        where = "memory per rank of the heaviest stage" if self.stages else "memory per rank"
        return [
            f"parameters: {self.total_params / 1e9:.2f}B total, {self.trainable_params / 1e6:.2f}M trainable",
            f"tokens per micro-batch per data-parallel rank: {self.tokens_per_microbatch}",
            f"{where} (estimate): weights {self.weights / GiB:.2f} GiB, grads {self.grads / GiB:.2f} GiB, "
            f"optimizer {self.optimizer / GiB:.2f} GiB, activations {self.activations / GiB:.2f} GiB, "
            f"total {self.total / GiB:.2f} GiB",
            *(f"  {stage.line()}" for stage in self.stages),
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


def micro_batches_per_pass(cfg, layout) -> int:
    """Micro-batches one pipeline pass streams through (engine/train/schedule.py's _pipelined): an
    embedding's grad-cache chunks, or its two towers; a reranker's grad_accum micro-batches."""
    t, tr = cfg.task, cfg.train
    if not tr.grad_cache:
        return 2 if t.type == "embedding" else tr.grad_accum
    queries = tr.batch_size // layout.dp
    sequences = queries * (1 + t.num_negatives) + (queries if t.type == "embedding" else 0)
    return -(-sequences // tr.grad_cache_chunk)


def plan_memory(cfg, args, total_params: int, layout) -> MemoryPlan:
    """Per rank of the heaviest pipeline stage (the whole model when pp = 1); plan.stages has each stage."""
    stages = plan_stage_memory(cfg, args, layout)
    heaviest = max(stages, key=lambda s: s.total)
    trainable = (
        lora_parameter_count(args, cfg.lora.rank, list(cfg.lora.targets)) if cfg.lora.rank > 0 else total_params
    )
    return MemoryPlan(
        total_params=total_params,
        trainable_params=trainable,
        tokens_per_microbatch=max(1, tokens_per_microbatch(cfg) // layout.dp),
        weights=heaviest.weights,
        grads=heaviest.grads,
        optimizer=heaviest.optimizer,
        activations=heaviest.activations,
        stages=stages if layout.pp > 1 else [],
    )


def plan_stage_memory(cfg, args, layout) -> list["StageMemory"]:
    """Each pipeline stage's rank: its parameters by the stage rule (engine/parallel/pipeline/stages.py),
    and activations for the most micro-batch layers the schedule keeps in flight there at once (its
    own timeline, engine/train/pipeline_timeline.py: 1F1B pp - stage micro-batches, GPipe all)."""
    from engine.config import reads_lm_head
    from engine.parallel.pipeline.stages import plan_stages
    from engine.train.pipeline_timeline import peak_layers_in_flight

    plan = plan_stages(args, layout.pp, layout.virtual, head_rows=reads_lm_head(cfg.task))
    weight_bytes = 2 if cfg.model.dtype in ("bfloat16", "float16") else 4
    lora_per_layer = (
        lora_parameter_count(args, cfg.lora.rank, list(cfg.lora.targets)) // args.num_layers if cfg.lora.rank > 0 else 0
    )
    tokens = max(1, tokens_per_microbatch(cfg) // layout.dp)
    tokens_per_rank = tokens / (layout.ulysses * layout.ring)
    h = args.hidden_size
    # Korthikanti et al.: 34sbh/t with sequence parallelism, sbh(10 + 24/t) without it
    # (norms and dropouts then hold full activations on every tp rank).
    per_token = 34 / layout.tp if cfg.parallel.sequence_parallel or layout.tp == 1 else 10 + 24 / layout.tp
    full_layer = per_token * tokens_per_rank * h
    micro = micro_batches_per_pass(cfg, layout)
    schedule = cfg.parallel.pp_schedule if layout.pp > 1 else "gpipe"
    in_flight = peak_layers_in_flight(schedule, plan, micro)
    stages = []
    for rank in range(layout.pp):
        params = plan.cost_of(rank)
        layers = len(plan.layers_of(rank))
        trainable = layers * lora_per_layer if cfg.lora.rank > 0 else params
        # Selective recomputation frees the attention core's own activations, which the fused
        # varlen kernels assumed here never hold beyond q, k, v, the output and the LSE.
        if cfg.train.recompute == "full":
            activations = in_flight[rank] * 2 * tokens_per_rank * h + full_layer
        else:
            activations = in_flight[rank] * full_layer
        stages.append(StageMemory(
            description=plan.describe()[rank],
            weights=params * weight_bytes / layout.tp,
            grads=trainable * 4 / layout.tp,
            # AdamW's two fp32 moments, sharded over every data-parallel replica (ZeRO-1 and up).
            optimizer=trainable * 8 / layout.tp / (layout.dp * layout.ulysses * layout.ring),
            activations=activations,
        ))
    return stages


@dataclass
class StageMemory:
    description: str  # "stage 1: layers 40-79 + head"
    weights: float  # bytes per rank of this stage
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def line(self) -> str:
        return (f"{self.description}: weights {self.weights / GiB:.2f} GiB, grads {self.grads / GiB:.2f} GiB, "
                f"optimizer {self.optimizer / GiB:.2f} GiB, activations {self.activations / GiB:.2f} GiB, "
                f"total {self.total / GiB:.2f} GiB per rank")
