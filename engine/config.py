"""The run configuration: typed dataclasses registered with Hydra, and one validate().

YAML in conf/ only picks values; every key lives here with a comment, and every rule
that ties two fields together lives in validate(), whose failures are one line naming
the keys. Code reads `cfg.train.lr`, never a dict. docs/config.md lists every key.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING  # noqa: F401  (re-exported for conf schemas)


INFONCE_KERNELS = ("auto", "triton", "torch")
ATTENTION_KERNELS = ("auto", "triton", "flash_attn", "sdpa")


class ConfigError(ValueError):
    """A user-facing configuration mistake; launchers print its message as one line."""


@dataclass
class ModelConfig:
    # A Hugging Face folder (config.json + safetensors + tokenizer) of a supported family.
    # null (or ""): build from the architecture fields below with random weights.
    path: Optional[str] = None
    # Architecture for random init or dry runs (ignored when `path` is set).
    family: str = "llama"  # llama | qwen2 | qwen3 | mistral
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0  # 0 = hidden_size // num_heads
    rope_theta: float = 10000.0
    # HF rope_scaling dict (Llama 3 style); {} or null = plain RoPE. {} rather than null by default:
    # OmegaConf cannot merge a command-line dict into a null node (model.rope_scaling={rope_type:...}).
    rope_scaling: Optional[dict[str, Any]] = field(default_factory=dict)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    tokenizer: Optional[str] = None  # tokenizer folder for random-init models; null = byte-level test tokenizer
    # Behaviour
    causal: bool = True  # false = bidirectional attention (some embedding recipes)
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16


@dataclass
class KernelsConfig:
    # Which implementation computes the two hot spots; every choice gives the same results within
    # floating-point tolerance. auto = Triton on CUDA (flash-attn first for attention, when it is
    # installed), PyTorch on CPU. Triton on CPU tensors needs TRITON_INTERPRET=1 (tests: slow).
    infonce: str = "auto"  # auto | triton | torch (the chunked PyTorch path)
    attention: str = "auto"  # auto | triton | flash_attn | sdpa (PyTorch's scaled_dot_product_attention)


@dataclass
class LoRAConfig:
    rank: int = 0  # 0 = full fine-tuning
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TaskConfig:
    type: str = "embedding"  # embedding | reranker
    # --- embedding ---
    pooling: str = "last"  # last | mean | cls
    normalize: bool = True  # L2-normalise embeddings
    append_eos: bool = True  # append the tokenizer's EOS so `last` pools a real end token
    query_instruction: str = "Given a question, retrieve passages that answer it"
    query_template: str = "Instruct: {instruction}\nQuery:{query}"  # Qwen3-Embedding style
    doc_template: str = "{document}"
    temperature: float = 0.05
    in_batch_negatives: bool = True  # other queries' candidates are negatives too
    false_negative_mask: bool = False  # drop candidates scoring above the positive + margin (never the positive)
    false_negative_margin: float = 0.1  # the margin of that mask (Qwen3-Embedding uses 0.1)
    query_query: bool = False  # Qwen3-Embedding: other queries as negatives
    doc_doc: bool = False  # Qwen3-Embedding: other documents as negatives of the positive
    # Matryoshka: the loss is also taken on the first d dimensions of every embedding (renormalised),
    # for each d here, and evaluation reports metrics per d. [] = off; the full size is always trained.
    matryoshka_dims: list[int] = field(default_factory=list)
    # One weight per entry of matryoshka_dims (the full size weighs 1); [] = all 1.
    matryoshka_weights: list[float] = field(default_factory=list)
    # --- reranker ---
    template: str = "qwen3"  # qwen3 | plain | a custom string with {instruction} {query} {document}
    instruction: str = "Given a web search query, retrieve relevant passages that answer the query"
    head: str = "yes_no"  # yes_no | linear
    yes_token: str = "yes"
    no_token: str = "no"
    # auto = infonce (embedding) or listwise (reranker). embedding: infonce | distill (KL to teacher
    # scores over each query's own candidates). reranker: listwise | bce | distill | hinge | ranknet.
    loss: str = "auto"
    distill_temperature: float = 1.0  # teacher's softmax temperature in distill (the student's is task.temperature / 1)
    hinge_margin: float = 1.0  # reranker hinge: max(0, margin - (s_pos - s_neg)) per negative
    # --- both ---
    num_negatives: int = 7  # hard negatives per query in each training group


@dataclass
class DataConfig:
    # Sequences are always packed with cu_seqlens (no padding anywhere in training): varlen
    # attention makes a padded batch strictly slower, so there is no switch for it.
    # A JSONL file (ms-swift or FlagEmbedding format, see docs/data.md), or a list of them: data.train=[a.jsonl,b.jsonl]
    train: Any = None
    # One weight per file of data.train: each file's share of an epoch (drawn in proportion, cycling
    # through a file's own order when it is drawn more than it holds); [] = in proportion to size.
    train_weights: list[float] = field(default_factory=list)
    same_dataset_in_batch: bool = False  # every step from one file of data.train (steps of files interleaved)
    eval: Optional[str] = None  # held-out JSONL in the same formats; null = no evaluation
    on_error: str = "fail"  # fail | skip: what a malformed line does
    query_max_len: int = 128  # tokens, template included
    doc_max_len: int = 512
    max_len: int = 1024  # reranker: query + document, template included


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    seed: int = 42
    max_steps: int = 100
    batch_size: int = 16  # queries per optimizer step (global)
    grad_accum: int = 1  # micro-batches per step; shrinks the negative pool (logged)
    grad_cache: bool = False  # large pools: embed without graph, then replay chunks with the cached gradient
    grad_cache_chunk: int = 16  # sequences per grad-cache chunk
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.0  # final lr as a fraction of lr
    clip_grad_norm: float = 1.0  # 0 = no clipping
    max_bad_steps: int = 5  # abort after this many non-finite losses in a row
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    save_final: bool = True
    keep_checkpoints: int = 0  # 0 = keep all
    eval_every: int = 0  # steps between evaluations; 0 = start and end only
    log_every: int = 1
    resume: Optional[str] = None  # null = fresh | auto = newest complete checkpoint in output_dir | a checkpoint folder
    dry_run: bool = False  # build on meta, validate, print sizes and memory; allocate nothing
    # Activation recomputation in backward: none | selective (the attention core of each block)
    # | full (each block, keeping only its input). Never changes results.
    recompute: str = "none"
    device: str = "auto"  # auto | cpu | cuda
    # Seconds a collective may wait for a rank before every waiting rank fails with one line naming
    # the ranks elsewhere (engine/parallel/progress.py); torch's own default is 30 min (NCCL 10).
    collective_timeout: int = 600
    num_threads: int = 0  # CPU threads for torch; 0 = torch's default
    tensorboard: bool = True  # write TensorBoard events when tensorboard is installed


@dataclass
class EvalConfig:
    batch_size: int = 32  # sequences per forward pass
    k: list[int] = field(default_factory=lambda: [1, 10])
    save_run: Optional[str] = None  # write the ranking as a TREC run file; null = don't
    max_queries: int = 0  # 0 = all


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel degree; 1 = off
    pp: int = 1  # pipeline stages
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved (engine/train/pipeline_timeline.py)
    pp_virtual: int = 1  # virtual stages (model chunks) per pp rank; > 1 needs pp_schedule=interleaved
    ulysses: int = 1  # all-to-all sequence-parallel degree
    ring: int = 1  # ring-attention degree
    sequence_parallel: bool = True  # Megatron SP when tp > 1
    # World size to plan for in dry runs; 0 = the launcher's WORLD_SIZE (or tp*pp*ulysses*ring).
    world_size: int = 0


@dataclass
class ExportConfig:
    merge_lora: bool = True  # false: write a PEFT adapter folder instead
    dtype: str = "float32"  # float32 | bfloat16 | float16
    output_dir: Optional[str] = None  # when set, train.py exports the final model here at the end of training


@dataclass
class ClusterConfig:
    """What launch/plan.py plans for (engine/plan/); training never reads it."""

    gpus: int = 0  # GPUs to lay out; 0 = parallel.world_size
    gpus_per_node: int = 8  # groups within a node use intra_node_bandwidth, across nodes inter_node_bandwidth
    gpu_memory: str = "80GB"  # per GPU; GB = 1e9 bytes, GiB = 2^30
    reserved_memory: str = "4GiB"  # per GPU, kept for what the model leaves out (CUDA context, NCCL, fragmentation)
    peak_tflops: float = 989.0  # dense bf16 TFLOP/s per GPU (H100 SXM)
    mfu: float = 0.4  # the fraction of peak_tflops the step time assumes
    intra_node_bandwidth: float = 450.0  # GB/s each GPU sends within a node (NVLink)
    inter_node_bandwidth: float = 50.0  # GB/s each GPU sends across nodes (400 Gb/s InfiniBand)
    top: int = 8  # fitting layouts to list besides the experiment's own


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value} must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: RunConfig, *, need_train_data: bool = True) -> None:
    """Check every rule that ties fields together; raise ConfigError with one line."""
    m, t, d, tr, p = cfg.model, cfg.task, cfg.data, cfg.train, cfg.parallel
    _one_of("task.type", t.type, ("embedding", "reranker"))
    _one_of("task.pooling", t.pooling, ("last", "mean", "cls"))
    _one_of("task.head", t.head, ("yes_no", "linear"))
    losses = ("auto",) + TASK_LOSSES.get(t.type, ())
    if t.loss not in losses:
        raise ConfigError(f"task.loss={t.loss!r} is not one of {', '.join(losses)} (for task.type={t.type})")
    _one_of("data.on_error", d.on_error, ("fail", "skip"))
    _one_of("train.schedule", tr.schedule, ("cosine", "linear", "constant"))
    _one_of("train.device", tr.device, ("auto", "cpu", "cuda"))
    _one_of("train.recompute", tr.recompute, ("none", "selective", "full"))
    _one_of("model.dtype", m.dtype, ("auto", "float32", "bfloat16", "float16"))
    _one_of("model.family", m.family, ("llama", "qwen2", "qwen3", "mistral"))
    _one_of("export.dtype", cfg.export.dtype, ("float32", "bfloat16", "float16"))
    _one_of("kernels.infonce", cfg.kernels.infonce, INFONCE_KERNELS)
    _one_of("kernels.attention", cfg.kernels.attention, ATTENTION_KERNELS)
    _positive("task.temperature", t.temperature)
    _positive("task.num_negatives", t.num_negatives, allow_zero=True)
    _positive("train.batch_size", tr.batch_size)
    _positive("train.max_steps", tr.max_steps, allow_zero=True)
    _positive("train.grad_accum", tr.grad_accum)
    _positive("train.grad_cache_chunk", tr.grad_cache_chunk)
    _positive("train.lr", tr.lr, allow_zero=True)
    _positive("train.save_every", tr.save_every, allow_zero=True)
    _positive("train.eval_every", tr.eval_every, allow_zero=True)
    _positive("train.max_bad_steps", tr.max_bad_steps)
    _positive("train.log_every", tr.log_every)
    _positive("task.distill_temperature", t.distill_temperature)
    _positive("task.false_negative_margin", t.false_negative_margin, allow_zero=True)
    _positive("eval.batch_size", cfg.eval.batch_size)
    _positive("eval.max_queries", cfg.eval.max_queries, allow_zero=True)
    if not cfg.eval.k or min(cfg.eval.k) < 1:
        raise ConfigError(f"eval.k={list(cfg.eval.k)} must be a non-empty list of cut-offs >= 1")
    if len(tr.betas) != 2 or not all(0 <= b < 1 for b in tr.betas):
        raise ConfigError(f"train.betas={list(tr.betas)} must be two numbers in [0, 1)")
    _positive("lora.rank", cfg.lora.rank, allow_zero=True)
    for key in ("query_max_len", "doc_max_len", "max_len"):
        _positive(f"data.{key}", getattr(d, key))
    if tr.batch_size % tr.grad_accum:
        raise ConfigError(
            f"train.batch_size={tr.batch_size} is not divisible by train.grad_accum={tr.grad_accum}"
        )
    if tr.grad_cache and tr.grad_accum > 1:
        raise ConfigError("train.grad_cache=true and train.grad_accum>1 do the same job: pick one")
    if tr.warmup_steps > tr.max_steps > 0:
        raise ConfigError(f"train.warmup_steps={tr.warmup_steps} exceeds train.max_steps={tr.max_steps}")
    if t.type == "reranker" and task_loss(t) in ("listwise", "hinge", "ranknet") and t.num_negatives == 0:
        raise ConfigError(f"task.loss={task_loss(t)} needs task.num_negatives >= 1 (a group of one has no ranking)")
    _positive("task.hinge_margin", t.hinge_margin, allow_zero=True)
    check_matryoshka(t, cfg.model)
    if not m.path:
        _validate_architecture(m)
    if cfg.export.output_dir and t.type == "embedding":
        check_prefix_templates(t)
    _positive("train.collective_timeout", tr.collective_timeout)
    for key in ("tp", "pp", "pp_virtual", "ulysses", "ring"):
        _positive(f"parallel.{key}", getattr(p, key))
    check_pipeline_schedule(p.pp_schedule, p.pp_virtual)
    if not tr.dry_run:
        if need_train_data:
            files = train_files(d)
            for index, path in enumerate(files):
                if not os.path.isfile(path):
                    key = "data.train" if isinstance(d.train, str) else f"data.train[{index}]"
                    raise ConfigError(f"{key}={path}: no such file")
        if d.eval and not os.path.isfile(d.eval):
            raise ConfigError(f"data.eval={d.eval}: no such file")
        if m.path and not os.path.isfile(os.path.join(m.path, "config.json")):
            raise ConfigError(f"model.path={m.path}: no config.json there (a Hugging Face model folder is expected)")


def train_files(d: DataConfig) -> list[str]:
    """data.train as a list of paths (a single path is a list of one), checked against its weights."""
    files = [d.train] if isinstance(d.train, str) else list(d.train or [])
    if not files:
        raise ConfigError("data.train is empty: give a JSONL file (data.train=PATH) or a list of them "
                          "(data.train=[a.jsonl,b.jsonl])")
    if not all(isinstance(f, str) and f for f in files):
        raise ConfigError(f"data.train={d.train!r}: give a JSONL file (data.train=PATH) or a list of them "
                          "(data.train=[a.jsonl,b.jsonl])")
    if len(set(files)) != len(files):
        raise ConfigError(f"data.train={files} names a file twice: give it a larger weight instead")
    weights = list(d.train_weights)
    if weights and (len(weights) != len(files) or min(weights) < 0 or sum(weights) <= 0):
        raise ConfigError(f"data.train_weights={weights} must be one weight >= 0 per file of data.train "
                          f"({len(files)}), not all 0")
    return files


def validate_cluster(c: ClusterConfig) -> None:
    """The cluster.* keys, which only launch/plan.py reads (a training launch ignores them)."""
    _positive("cluster.gpus", c.gpus, allow_zero=True)
    for key in ("gpus_per_node", "peak_tflops", "mfu", "intra_node_bandwidth", "inter_node_bandwidth", "top"):
        _positive(f"cluster.{key}", getattr(c, key))
    if c.mfu > 1:
        raise ConfigError(f"cluster.mfu={c.mfu} is a fraction of peak_tflops: between 0 and 1")
    parse_bytes("cluster.gpu_memory", c.gpu_memory)
    parse_bytes("cluster.reserved_memory", c.reserved_memory)


_BYTE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(key: str, text: str) -> int:
    """'80GB' -> 80e9, '4GiB' -> 4 * 2^30 (a bare number is bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if not match or (unit and unit not in _BYTE_UNITS):
        raise ConfigError(f"{key}={text!r} is not a size: write e.g. 80GB, 141GB or 4GiB")
    return int(float(match.group(1)) * _BYTE_UNITS[unit or "B"])


PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved")  # engine/train/pipeline_timeline.py runs them


def check_pipeline_schedule(schedule: str, virtual: int) -> None:
    """The schedule rule, written once: validate() and the timeline (engine/train/pipeline_timeline.py) apply it."""
    if schedule not in PIPELINE_SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule={schedule!r}: choose one of {', '.join(PIPELINE_SCHEDULES)}")
    if virtual > 1 and schedule != "interleaved":
        raise ConfigError(f"parallel.pp_virtual={virtual} needs parallel.pp_schedule=interleaved (got {schedule})")
    if schedule == "interleaved" and virtual < 2:
        raise ConfigError("parallel.pp_schedule=interleaved needs parallel.pp_virtual >= 2 "
                          "(virtual stages per pp rank)")


TASK_LOSSES = {"embedding": ("infonce", "distill"), "reranker": ("listwise", "bce", "distill", "hinge", "ranknet")}


def task_loss(t: TaskConfig) -> str:
    """The loss a task trains with: task.loss, or the task's default for `auto`. Written once here."""
    if t.loss != "auto":
        return t.loss
    return "infonce" if t.type == "embedding" else "listwise"


def matryoshka_terms(t: TaskConfig) -> list[tuple[int, float]]:
    """(dimension, weight) of each Matryoshka prefix the loss adds to the full size's."""
    weights = list(t.matryoshka_weights) or [1.0] * len(t.matryoshka_dims)
    return list(zip(t.matryoshka_dims, weights))


def check_matryoshka(t: TaskConfig, m: ModelConfig) -> None:
    """task.matryoshka_dims: increasing sizes below the embedding's, one weight each when weights are given."""
    dims, weights = list(t.matryoshka_dims), list(t.matryoshka_weights)
    if not dims:
        if weights:
            raise ConfigError("task.matryoshka_weights is set but task.matryoshka_dims is empty")
        return
    if t.type != "embedding":
        raise ConfigError("task.matryoshka_dims is for task.type=embedding (a reranker has no vector to truncate)")
    if any(d < 1 for d in dims) or dims != sorted(set(dims)):
        raise ConfigError(f"task.matryoshka_dims={dims} must be distinct sizes >= 1 in increasing order")
    if not m.path and dims[-1] >= m.hidden_size:
        raise ConfigError(f"task.matryoshka_dims={dims}: every size must be below model.hidden_size={m.hidden_size} "
                          "(the full size is always trained)")
    if weights and (len(weights) != len(dims) or min(weights) < 0):
        raise ConfigError(f"task.matryoshka_weights={weights} must be one weight >= 0 per entry of "
                          f"task.matryoshka_dims={dims}")


def reads_lm_head(t: TaskConfig) -> bool:
    """Whether the task's head reads rows of the LM head (the reranker's yes/no score): then a
    pipeline's last stage holds the LM head. The one place this rule is written."""
    return t.type == "reranker" and t.head == "yes_no"


def check_prefix_templates(t: TaskConfig) -> None:
    """sentence-transformers prompts are prefixes: templates with text after the slot cannot export
    (checked at startup when the run exports, and again by engine.export)."""
    for key, slot in (("query_template", "{query}"), ("doc_template", "{document}")):
        template = getattr(t, key)
        if template.partition(slot)[2]:
            raise ConfigError(
                f"task.{key}={template!r} has text after {slot}: sentence-transformers prompts are prefixes, "
                "so an embedding with this template cannot be exported for it"
            )


def _validate_architecture(m: ModelConfig) -> None:
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        _positive(f"model.{key}", getattr(m, key))
    if m.head_dim == 0 and m.hidden_size % m.num_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads} "
            "(set model.head_dim explicitly)"
        )
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}"
        )


def register_configs() -> None:
    """Register the schema with Hydra so unknown keys and wrong types fail at compose time."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="run_schema", node=RunConfig)
