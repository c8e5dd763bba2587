"""Memory per rank, from the model's shapes and the layout: the one memory model of the dry run
(engine/train/dry_run.py) and the planner (launch/plan.py). Estimates, validated against measured
peaks of CPU runs by bench/memory.py (docs/performance.md).

Per rank of each pipeline stage, at the step's peak (the start of the last backward, with AdamW's
moments allocated from the second step on):

- weights, gradients, optimizer: the stage's parameters (engine/parallel/pipeline/stages.py's
  rule) split over tp; under FSDP (any of dp, ring, ulysses > 1) also sharded over dp x ring x
  ulysses. Gradients and AdamW's two moments exist for trainable parameters only, in the weights'
  dtype (fp32 for model.dtype=auto, where bf16 autocast does the compute); except that FSDP holds
  whole fp32 gradients when it reduces once after several backward passes (pp, grad_accum).
- activations: the tensors autograd keeps for backward, counted per token per decoder layer from
  the block itself (engine/model/transformer.py: two RMSNorms, q/k/v after RoPE and the kernel's
  output, the four SwiGLU tensors; layer_saved_bytes_per_token), times the tokens this rank holds
  (split over ring x ulysses, the residual stream also over tp under sequence parallelism), times
  the micro-batch layers the pipeline schedule keeps in flight there (its own timeline). Under
  train.recompute=full each layer keeps only its input, plus one layer recomputed at a time;
  selective drops what the attention kernel keeps inside itself. Plus the final norm's.
- workspace: one layer's backward at a time (the gradients of its activations) and, under
  dtype=auto on GPU, autocast's bf16 copies of the weights.
- communication buffers: FSDP's gathered layers (the one running and the one prefetched) and root
  (embedding, norm, head: gathered for the whole step), tensor parallelism's full-sequence
  all-gather / reduce-scatter tensors, ring attention's backward (fp32 gradients of q, K, V, those
  in transit, the K/V block in flight), the pipeline's send and receive buffers.

Not modelled: the runtime's own memory (CUDA context, NCCL channels, the caching allocator's
fragmentation; on CPU, Python and the autograd graph: 15-25 MiB measured); the planner keeps
cluster.reserved_memory for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

GiB = 1024**3
FUSED_ATTENTION = ("flash_attn", "triton")  # backends that keep only the LSE for backward
COMPONENTS = ("weights", "grads", "optimizer", "activations", "workspace", "comm_buffers")


@dataclass
class StageMemory:
    description: str  # "stage 1: layers 40-79 + head"
    weights: float  # bytes per rank of this stage
    grads: float
    optimizer: float
    activations: float
    workspace: float
    comm_buffers: float

    @property
    def total(self) -> float:
        return sum(getattr(self, name) for name in COMPONENTS)

    def line(self) -> str:
        parts = ", ".join(f"{name.replace('_', ' ')} {getattr(self, name) / GiB:.2f}" for name in COMPONENTS)
        return f"{self.description}: {parts}, total {self.total / GiB:.2f} GiB per rank"


@dataclass
class MemoryPlan:
    total_params: int
    trainable_params: int
    tokens_per_microbatch: int  # per dp rank, before sequence splitting
    stages: list[StageMemory] = field(default_factory=list)  # one per pp rank

    @property
    def heaviest(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def total(self) -> float:
        return self.heaviest.total

    def lines(self) -> list[str]:
        where = "memory per rank of the heaviest stage" if len(self.stages) > 1 else "memory per rank"
        heaviest = self.heaviest
        parts = ", ".join(f"{name.replace('_', ' ')} {getattr(heaviest, name) / GiB:.2f} GiB" for name in COMPONENTS)
        return [
            f"parameters: {self.total_params / 1e9:.2f}B total, {self.trainable_params / 1e6:.2f}M trainable",
            f"tokens per micro-batch per data-parallel rank: {self.tokens_per_microbatch}",
            f"{where} (estimate): {parts}, total {heaviest.total / GiB:.2f} GiB",
            *(f"  {stage.line()}" for stage in self.stages if len(self.stages) > 1),
        ]


@dataclass(frozen=True)
class Precision:
    """Bytes per element of what a run keeps: the weights (and their gradients and AdamW moments),
    the residual stream, and the matmul outputs autograd saves."""

    weights: int
    stream: int
    compute: int

    @classmethod
    def of(cls, model_cfg, device: str) -> "Precision":
        """A run's dtypes by the build's own rules (engine/build.py): model.dtype=auto is fp32 weights,
        with bf16 autocast on GPU."""
        import torch

        from engine.build import autocast_dtype, resolve_dtype

        weights = resolve_dtype(model_cfg.dtype, torch.device(device)).itemsize
        autocast = autocast_dtype(model_cfg, torch.device(device))
        return cls(weights, weights, autocast.itemsize if autocast is not None else weights)


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


def stage_trainable(cfg, args, stage_params: int, layers: int) -> int:
    """Trainable parameters of a stage holding `layers` decoder layers and `stage_params` in all:
    its layers' LoRA adapters, or everything it holds."""
    if cfg.lora.rank == 0:
        return stage_params
    return layers * lora_parameter_count(args, cfg.lora.rank, list(cfg.lora.targets)) // args.num_layers


def tokens_per_microbatch(cfg, layout) -> int:
    """The most tokens one micro-batch holds on one data-parallel rank (before ring x ulysses split
    them), every sequence at its maximum length: a grad-cache chunk (its size is per rank; a chunk of
    documents is the longest), or a dp rank's share of the batch_size / grad_accum queries with their
    documents (both towers at once, for the loss; under pp each tower is its own micro-batch)."""
    t, d, tr = cfg.task, cfg.data, cfg.train
    group = 1 + t.num_negatives
    if tr.grad_cache:
        return tr.grad_cache_chunk * (d.max_len if t.type == "reranker" else max(d.doc_max_len, d.query_max_len))
    queries = max(1, tr.batch_size // (tr.grad_accum * layout.dp))
    if t.type == "reranker":
        return queries * group * d.max_len
    if layout.pp > 1:
        return queries * max(d.query_max_len, group * d.doc_max_len)
    return queries * (d.query_max_len + group * d.doc_max_len)


def tokens_per_step(cfg, layout) -> int:
    """Every token one data-parallel rank encodes in a step (before ring x ulysses split them)."""
    t, d = cfg.task, cfg.data
    queries = max(1, cfg.train.batch_size // layout.dp)
    if t.type == "reranker":
        return queries * (1 + t.num_negatives) * d.max_len
    return queries * (d.query_max_len + (1 + t.num_negatives) * d.doc_max_len)


def layer_calls_per_step(cfg, layout) -> int:
    """Forward calls with a graph of each layer per step on one rank (engine/train/schedule.py): one
    per grad-cache chunk, else one per grad_accum micro-batch (an embedding's query and document
    towers go through as one stream, engine/tasks/base.py encode_together; a pipeline runs them as
    two micro-batches). FSDP gathers a layer's weights for each, and again for its backward."""
    if cfg.train.grad_cache:
        return micro_batches_per_pass(cfg, layout)
    return cfg.train.grad_accum * (2 if cfg.task.type == "embedding" and layout.pp > 1 else 1)


def defers_gradient_reduction(cfg, layout) -> bool:
    """Whether FSDP holds whole (unsharded, fp32) gradients across several backward passes before
    reducing them once: under pp (pipeline_gradient_sync) and grad_accum > 1 (set_gradient_sync);
    a grad-cache step without pp reduces at every chunk's backward."""
    return layout.pp > 1 or (cfg.train.grad_accum > 1 and not cfg.train.grad_cache)


def micro_batches_per_pass(cfg, layout) -> int:
    """Micro-batches one pipeline pass streams through (engine/train/schedule.py's _pipelined): an
    embedding's grad-cache chunks, or its two towers; a reranker's grad_accum micro-batches."""
    t, tr = cfg.task, cfg.train
    if not tr.grad_cache:
        return 2 if t.type == "embedding" else tr.grad_accum
    queries = tr.batch_size // layout.dp
    sequences = queries * (1 + t.num_negatives) + (queries if t.type == "embedding" else 0)
    return -(-sequences // tr.grad_cache_chunk)


def layer_saved_bytes_per_token(args, precision: Precision, layout, *, sequence_parallel: bool,
                                recompute: str, attention_keeps: float) -> float:
    """Bytes one decoder layer keeps for backward per token of the (context-split) stream.

    attention_keeps: elements per token the attention kernel keeps inside itself beyond q, k, v and
    its output (attention_internal_elements); dropped by selective recomputation."""
    tp = layout.tp
    h, q, kv, i = args.hidden_size, args.q_size / tp, args.kv_size / tp, args.intermediate_size / tp
    stream = h / tp if (sequence_parallel and tp > 1) else h  # the residual stream's share per token
    if recompute == "full":
        return precision.stream * stream
    c = precision.compute
    # Each RMSNorm (engine/model/norm.py, one autograd node): its input as it comes, at the stream's
    # width (the fp32 copy and the normed value are recomputed in its backward); its output as the
    # projections read it (gathered to the whole hidden size under sequence parallelism): one tensor
    # shared by q, k, v (gate, up), except under autocast, whose bf16 cast of an activation is made,
    # and kept, by each projection apart.
    norms = 2 * precision.stream * stream
    entries = c * h * ((3 + 2) if precision.compute < precision.weights else 2)
    qk_norm = c * (q + kv) if args.qk_norm else 0
    attention = c * (q + 2 * kv) + c * q  # the kernel's q, k (after RoPE), v, and its output (o_proj's input)
    mlp = 4 * c * i  # gate, silu(gate), up, and their product (down_proj's input)
    kernel = c * attention_keeps if recompute == "none" else 0
    return norms + entries + qk_norm + attention + mlp + kernel


def kv_width_for_attention(args, layout) -> float:
    """K (or V) elements per token the attention kernel reads on a rank: Ulysses repeats KV heads
    when a tp rank has fewer than ulysses of them (engine/parallel/ulysses.py's expand_kv_heads)."""
    kv_heads = max(1, args.num_kv_heads // layout.tp)
    if layout.ulysses > 1:
        kv_heads = max(kv_heads, layout.ulysses)
    return kv_heads * args.head_dim


def attention_internal_elements(args, layout, kernel: str) -> float:
    """Elements per token an attention implementation keeps for backward beyond q, k, v, out.
    flash-attn / Triton keep only the log-sum-exp, and so does ring attention (its own autograd
    Function keeps q, k, v, out, lse: engine/parallel/ring.py); the CPU reference
    (kernels.attention='torch' on CPU) pads q, k, v into per-bucket copies and keeps its own output.
    Under Ulysses the kernel's output is the head-split one (another q-sized tensor) and its K, V the
    repeated ones."""
    q, kv = args.q_size / layout.tp, args.kv_size / layout.tp
    kv_kernel = kv_width_for_attention(args, layout)
    fused = kernel in FUSED_ATTENTION or layout.ring > 1
    keeps = args.num_heads / layout.tp if fused else 2 * q + 2 * kv_kernel
    if layout.ulysses > 1:
        keeps += q + 2 * (kv_kernel - kv)
    return keeps


def plan_memory(cfg, args, layout, *, device: str | None = None) -> MemoryPlan:
    """Every pipeline stage's rank (one stage when pp = 1); plan.total is the heaviest's."""
    total_params = args.num_parameters()
    trainable = (
        lora_parameter_count(args, cfg.lora.rank, list(cfg.lora.targets)) if cfg.lora.rank > 0 else total_params
    )
    return MemoryPlan(
        total_params=total_params,
        trainable_params=trainable,
        tokens_per_microbatch=tokens_per_microbatch(cfg, layout),
        stages=plan_stage_memory(cfg, args, layout, device=device),
    )


def planned_device(cfg) -> str:
    """The device a plan is for: train.device, where auto means a GPU cluster's."""
    return "cuda" if cfg.train.device == "auto" else cfg.train.device


def planned_kernel(cfg, device: str) -> str:
    """The attention backend the run would resolve to (the dispatcher's own rule: on GPU, auto takes
    flash-attn or Triton where installed)."""
    from engine.kernels.attention import resolve_backend

    return resolve_backend(cfg.kernels.attention, device)


def plan_stage_memory(cfg, args, layout, *, device: str | None = None) -> list[StageMemory]:
    """Each pipeline stage's rank: its parameters by the stage rule (engine/parallel/pipeline/stages.py),
    and activations for the most micro-batch layers the schedule keeps in flight there at once (its
    own timeline, engine/train/pipeline_timeline.py: 1F1B pp - stage micro-batches, GPipe all)."""
    from engine.config import reads_lm_head
    from engine.parallel.pipeline.stages import plan_stages, unit_costs
    from engine.train.pipeline_timeline import peak_layers_in_flight

    device = device or planned_device(cfg)
    precision = Precision.of(cfg.model, device)
    head_rows = reads_lm_head(cfg.task)
    plan = plan_stages(args, layout.pp, layout.virtual, head_rows=head_rows)
    _, layer_params, _ = unit_costs(args, head_rows)
    tp, fsdp = layout.tp, layout.dp * layout.ulysses * layout.ring
    sp = cfg.parallel.sequence_parallel and tp > 1
    tokens = tokens_per_microbatch(cfg, layout) / (layout.ulysses * layout.ring)
    h = args.hidden_size
    stream = h / tp if sp else h
    keeps = attention_internal_elements(args, layout, planned_kernel(cfg, device))
    saved = tokens * layer_saved_bytes_per_token(args, precision, layout, sequence_parallel=sp,
                                                 recompute=cfg.train.recompute, attention_keeps=keeps)
    recomputed_layer = 0.0
    if cfg.train.recompute == "full":  # one layer's whole set, rebuilt inside its backward
        recomputed_layer = tokens * layer_saved_bytes_per_token(args, precision, layout, sequence_parallel=sp,
                                                                recompute="none", attention_keeps=keeps)
    final_norm = tokens * (precision.stream * stream + precision.compute * h)
    # The backward's working set, as an upper bound: the gradients of one layer's activations, four at
    # the MLP width and two at the hidden width (autograd frees each node's saved tensors as it runs,
    # so fewer are alive at once: bench/memory.py's tensor peaks come out below the plan). Tensor
    # parallelism adds its full-sequence tensors: the all-gathered gradient, the partial input
    # gradient before its reduce-scatter, and the collective's staging copy.
    workspace = tokens * precision.compute * (4 * args.intermediate_size / tp + 2 * h)
    comm_tp = tokens * precision.compute * 3 * h if tp > 1 else 0.0
    # Ring attention's backward (engine/parallel/ring.py): fp32 dq, this rank's and the received dK, dV,
    # a block's gradients, and the K/V block in transit.
    comm_ring = 0.0
    if layout.ring > 1:
        comm_ring = tokens * (4 + precision.compute) * (args.q_size + 4 * args.kv_size) / tp
    comm_pp = 4 * tokens * precision.stream * stream if layout.pp > 1 else 0.0
    micro = micro_batches_per_pass(cfg, layout)
    in_flight = peak_layers_in_flight(cfg.parallel.pp_schedule if layout.pp > 1 else "gpipe", plan, micro)
    defer = defers_gradient_reduction(cfg, layout)
    stages = []
    for rank in range(layout.pp):
        chunks = plan.chunks_of(rank)
        params = plan.cost_of(rank)
        layers = len(plan.layers_of(rank))
        root = params - layers * layer_params  # embedding, final norm, head: FSDP's root unit
        trainable = stage_trainable(cfg, args, params, layers)
        if fsdp > 1 and defer:  # FSDP keeps them whole, in fp32 (its reduce dtype), until it reduces them
            grads = trainable * 4 / tp
        else:
            grads = trainable * precision.weights / tp / fsdp
        activations = in_flight[rank] * saved + recomputed_layer
        if any(c.head for c in chunks):
            activations += final_norm
        step_workspace = workspace + (params * 2 / tp if precision.compute < precision.weights else 0.0)
        fsdp_buffers = 0.0
        if fsdp > 1:  # the root stays gathered; two layers at a time (running, prefetched)
            fsdp_buffers = (root + 2 * layer_params) * precision.weights / tp
            fsdp_buffers += stage_trainable(cfg, args, layer_params, 1) * 4 / tp  # one layer's fp32 reduce
        stages.append(StageMemory(
            description=plan.describe()[rank],
            weights=params * precision.weights / tp / fsdp,
            # Counted in full: with several backward passes per step the first's are held while the
            # next micro-batch's activations are; with one, the true peak is a little lower (a layer's
            # gradients are written as its activations are freed).
            grads=grads,
            optimizer=2 * trainable * precision.weights / tp / fsdp,
            activations=activations,
            workspace=step_workspace,
            comm_buffers=fsdp_buffers + comm_tp + comm_ring + comm_pp,
        ))
    return stages
