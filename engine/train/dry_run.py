"""train.dry_run=true: build the model on the meta device, check the layout, print sizes and
the estimated memory per rank. Allocates no parameter memory and needs no data or weights."""
from __future__ import annotations

import time

import torch

from engine.parallel.layout import check_trainable_layout, layout_from_config
from engine.build import model_args
from engine.plan.memory import micro_batches_per_pass, plan_memory
from engine.train.pipeline_timeline import bubble_formula, bubble_fraction


def dry_run(cfg) -> dict:
    from engine.model.transformer import Transformer

    start = time.perf_counter()
    args = model_args(cfg.model)
    layout = layout_from_config(cfg.parallel)
    seq_len = cfg.data.max_len if cfg.task.type == "reranker" else cfg.data.doc_max_len
    check_trainable_layout(cfg, layout, args)  # the rules a launch checks, so a plan that passes can launch
    with torch.device("meta"):
        model = Transformer(args)
    total = sum(p.numel() for p in model.parameters())
    plan = plan_memory(cfg, args, layout)
    print(f"dry run: {cfg.task.type} task, {args.family} backbone, {args.num_layers} layers, hidden {args.hidden_size}")
    print(f"layout: world {layout.world_size} = pp {layout.pp} x dp {layout.dp} x ring {layout.ring} "
          f"x ulysses {layout.ulysses} x tp {layout.tp}; sequence length {seq_len}")
    for line in plan.lines():
        print(line)
    if layout.pp > 1:
        print(pipeline_line(cfg, layout))
    print(f"kernels: attention {cfg.kernels.attention}, infonce {cfg.kernels.infonce} "
          "(auto: flash-attn or Triton on CUDA, PyTorch on CPU; checked against the device at launch)")
    print(f"config is valid; nothing was allocated ({time.perf_counter() - start:.1f}s)")
    return {"total_params": total, "memory_per_rank_bytes": plan.total, "layout": layout}


def pipeline_line(cfg, layout) -> str:
    """The schedule, the micro-batches one pass streams and the bubble its timeline counts."""
    m = micro_batches_per_pass(cfg, layout)
    kind = cfg.parallel.pp_schedule
    chunks = f", {layout.virtual} virtual stages per rank" if layout.virtual > 1 else ""
    bubble = bubble_fraction(kind, layout.pp, layout.virtual, m)
    return (f"pipeline: {kind} schedule{chunks}, {m} micro-batches per pass, bubble {bubble:.1%} of the pass "
            f"(timeline, backward = 2 forwards; (p-1)/(v m+p-1) = {bubble_formula(layout.pp, layout.virtual, m):.1%})")
