"""The parallel layout as numbers: degrees, what the world size leaves for dp, and the
divisibility rules a model must meet. No process groups here (that is mesh.py's job)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from engine.config import ConfigError, reads_lm_head


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    ulysses: int = 1
    ring: int = 1
    dp: int = 1
    virtual: int = 1  # pipeline chunks per pp rank (parallel.pp_virtual; interleaved schedule)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.ulysses * self.ring * self.dp

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.ulysses * self.ring


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _tp_for_heads(args) -> list[int]:
    kv = args.num_kv_heads
    return [t for t in range(1, args.num_heads + 1)
            if args.num_heads % t == 0 and (kv % t == 0 or t % kv == 0)]


def layout_from_config(parallel, world_size: int | None = None) -> Layout:
    p = parallel
    model_parallel = p.tp * p.pp * p.ulysses * p.ring
    if world_size is None:
        world_size = p.world_size or int(os.environ.get("WORLD_SIZE", "0")) or model_parallel
    if world_size % model_parallel:
        raise ConfigError(
            f"parallel: tp*pp*ulysses*ring = {p.tp}*{p.pp}*{p.ulysses}*{p.ring} = {model_parallel} "
            f"does not divide the world size {world_size} (world sizes that work: multiples of {model_parallel}; "
            f"tp*pp*ulysses*ring values that work: {_divisors(world_size)})"
        )
    return Layout(p.tp, p.pp, p.ulysses, p.ring, world_size // model_parallel, p.pp_virtual)


def check_model_fits_layout(args, layout: Layout) -> None:
    """One line per violated rule, naming the numbers and what would work."""
    tp = layout.tp
    if args.num_heads % tp:
        raise ConfigError(
            f"num_heads={args.num_heads} is not divisible by parallel.tp={tp} (tp that works: {_divisors(args.num_heads)})"
        )
    if tp > args.num_kv_heads and tp % args.num_kv_heads:
        raise ConfigError(
            f"parallel.tp={tp} must divide or be a multiple of num_kv_heads={args.num_kv_heads} "
            f"(tp that works: {', '.join(str(t) for t in _tp_for_heads(args))})"
        )
    if tp <= args.num_kv_heads and args.num_kv_heads % tp:
        raise ConfigError(
            f"num_kv_heads={args.num_kv_heads} is not divisible by parallel.tp={tp} "
            f"(tp that works: {', '.join(str(t) for t in _tp_for_heads(args))})"
        )
    if args.intermediate_size % tp:
        raise ConfigError(
            f"intermediate_size={args.intermediate_size} is not divisible by parallel.tp={tp} "
            f"(tp that works: {_divisors(args.intermediate_size)})"
        )
    if args.vocab_size % tp:
        raise ConfigError(
            f"vocab_size={args.vocab_size} is not divisible by parallel.tp={tp} "
            f"(tp that works: {_divisors(args.vocab_size)})"
        )
    if args.num_layers < layout.pp * layout.virtual:
        chunks = f"parallel.pp={layout.pp}" + (f" x parallel.pp_virtual={layout.virtual}" if layout.virtual > 1 else "")
        raise ConfigError(f"num_layers={args.num_layers} is fewer than {chunks} pipeline chunks (a layer each)")
    check_ulysses_heads(args, layout)


def check_ulysses_heads(args, layout: Layout) -> None:
    """Ulysses hands each rank whole heads: the query heads of a tp rank split over ulysses, and its
    KV heads either split too or, when fewer than ulysses, are repeated so each rank gets whole ones."""
    tp, ulysses = layout.tp, layout.ulysses
    if ulysses == 1:
        return
    q_heads = args.num_heads // tp
    kv_heads = max(1, args.num_kv_heads // tp)
    where = f"num_heads={args.num_heads}" if tp == 1 else f"num_heads/tp={args.num_heads}/{tp}={q_heads}"
    if q_heads % ulysses:
        raise ConfigError(f"parallel.ulysses={ulysses}: {where} query heads do not split over {ulysses} ranks "
                          f"(ulysses that works: {_divisors(q_heads)}); use parallel.ring={ulysses} instead, "
                          "which has no head constraint")
    if kv_heads % ulysses and ulysses % kv_heads:
        raise ConfigError(f"parallel.ulysses={ulysses}: {kv_heads} KV heads per tp rank neither split over nor "
                          f"repeat evenly to {ulysses} ranks; use parallel.ring={ulysses} instead")


def check_batch_fits_layout(train, layout: Layout) -> None:
    """Each optimizer step's queries split into grad_accum micro-batches, each into dp equal shares."""
    per_step = layout.dp * train.grad_accum
    if train.batch_size % per_step:
        raise ConfigError(
            f"train.batch_size={train.batch_size} is not divisible by data-parallel size {layout.dp} x "
            f"train.grad_accum={train.grad_accum} = {per_step} (batch sizes that work: multiples of {per_step})"
        )


def check_trainable_layout(cfg, layout: Layout, args) -> None:
    """Everything a training launch must satisfy before any process group or model exists."""
    check_model_fits_layout(args, layout)
    check_batch_fits_layout(cfg.train, layout)
    if layout.pp > 1:
        check_pipeline_fits(cfg, layout, args)
    if layout.tp > 1 and cfg.lora.rank > 0:
        # A target matches module names ending in it ("q_proj", "self_attn.q_proj", "layers.0.self_attn.q_proj").
        others = sorted(t for t in cfg.lora.targets if t.rsplit(".", 1)[-1] not in TENSOR_PARALLEL_PROJECTIONS)
        if others:
            raise ConfigError(
                f"lora.targets={list(cfg.lora.targets)}: with parallel.tp > 1 LoRA adapts only the block "
                f"projections ({', '.join(TENSOR_PARALLEL_PROJECTIONS)}); not {', '.join(others)}"
            )


# The linears tensor parallelism splits (and so can carry LoRA adapters split alike).
TENSOR_PARALLEL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_pipeline_fits(cfg, layout: Layout, args) -> None:
    """The stages can hold what the task reads (check_model_fits_layout already asked for a layer per
    chunk, all the stage rule needs)."""
    if reads_lm_head(cfg.task) and args.tie_word_embeddings:
        raise ConfigError(
            f"parallel.pp={layout.pp} with task.head=yes_no on a model with tied embeddings: the last stage would "
            "need a second copy of the embedding kept in step with the first's (not built yet); use "
            "task.head=linear, or parallel.pp=1"
        )
