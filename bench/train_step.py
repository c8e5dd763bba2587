"""One training step of the demo recipe, Ember against its peer, as ratios measured in one run.

    python bench/train_step.py [--steps 3] [--batch 16]
    python bench/train_step.py --ablation      # Ember alone, each step optimisation undone in turn
    python bench/train_step.py --profile       # Ember alone: where a step's time goes (torch.profiler)
    python bench/train_step.py --profile --undone   # ... as it went before the optimisations below
    python bench/train_step.py --host-memory   # Ember alone: host memory as it comes, kept, huge pages

Ember: packed sequences (cu_seqlens, no padding), LoRA r=16 on every projection, mean pooling,
InfoNCE over 1 positive + 1 hard negative per query plus in-batch candidates.
Peer: transformers + peft on the same weights, LoRA and loss, with right padding per tower
(the way sentence-transformers and FlagEmbedding batch).
Also measured: this CPU's fp32 matmul rate, so model FLOP/s can be read as a fraction of it.

--ablation times the step as it was before each optimisation of issue 12, in one process on the
same batch: all undone (the towers encoded one pass each, LoRA as five autograd nodes, the
greedy bucket rule re-planned in every layer), then each restored in turn, so every line's
difference from the one above is that optimisation's gain. --profile sorts one step's
torch.profiler operator time into matmuls, attention, element-wise and indexing work.
--host-memory times Ember's step in fresh processes, in turn for --rounds rounds: glibc's malloc
and torch's allocator as they come (EMBER_KEEP_FREED_MEMORY=0 THP_MEM_ALLOC_ENABLE=0), the heap
kept (engine/host_memory.py keep_freed_memory), and huge pages on top (request_huge_pages, the
default of the launch scripts); it prints each one's s/step, minor page faults, system CPU time
per step and peak RSS.
Needs the demo assets (`python launch/prepare_demo.py`).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.host_memory import request_huge_pages  # noqa: E402

request_huge_pages()  # as launch/train.py: before torch is imported (both systems of this process get it)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.cli import compose  # noqa: E402
from engine.losses import info_nce  # noqa: E402
from engine.train.trainer import Trainer  # noqa: E402


def matmul_peak_gflops(n: int = 2048, repeats: int = 10, trials: int = 5) -> float:
    """The best of `trials` timings of `repeats` (n, n) x (n, n) fp32 products: a peak is the fastest
    the machine goes (one trial read 163 GFLOP/s on a VM whose step ran its matmuls at 195)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeats / best / 1e9


def step_flops(trainer: Trainer, batch) -> tuple[float, float]:
    """(model FLOPs, the blocks' frozen matmuls alone) of one step on `batch`. Model FLOPs are MFU's
    count (engine/plan/step_time.py model_flops: the blocks' forward and input-gradient matmuls, the
    adapters' forward and backward as trained weights, attention per sequence); the second, 4 x the
    blocks' weights x tokens, is the count this file reported before 2026-12-07."""
    from engine.plan.step_time import model_flops

    backbone = trainer.model.backbone
    lengths = [int(n) for seqs in (batch.queries, batch.docs) for n in seqs.cu_seqlens.diff()]
    lora = sum(p.numel() for n, p in backbone.named_parameters() if "lora_" in n)
    dense = sum(p.numel() for n, p in backbone.named_parameters()
                if not any(s in n for s in ("embed_tokens", "lm_head", "lora_")))
    return model_flops(backbone.args, lora, lengths), 4 * dense * sum(lengths)


def time_steps(step, steps: int) -> float:
    step()  # warm-up: allocator, thread pools
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def peer_step_fn(trainer: Trainer, path: str, rank: int, alpha: float):
    """transformers + peft, padded batches, the same token ids and loss as Ember's step 0."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = trainer.collator([trainer.train_examples[i] for i in trainer.sampler.indices(0)], 0)

    def padded(seqs):
        rows = [seqs.input_ids[int(a):int(b)] for a, b in zip(seqs.cu_seqlens[:-1], seqs.cu_seqlens[1:])]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        return ids, mask

    towers = [padded(batch.queries), padded(batch.docs)]
    padded_tokens = sum(ids.numel() for ids, _ in towers)

    def embed(ids, mask):
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return F.normalize(pooled, dim=-1)

    def step():
        optimizer.zero_grad()
        q, d = (embed(ids, mask) for ids, mask in towers)
        loss = info_nce(q, d, group_size=batch.group_size, temperature=0.05)
        loss.backward()
        optimizer.step()

    return step, padded_tokens


def greedy_buckets(lengths: list[int], overhead_pairs: float) -> list[list[int]]:
    """The bucket rule before issue 12: a sequence joins the open bucket when its own padding
    costs less than a call (engine/kernels/attention/reference.py has the exact plan now)."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    bucket_len = 0
    for i in order:
        if buckets and bucket_len**2 <= lengths[i] ** 2 + overhead_pairs:
            buckets[-1].append(i)
        else:
            buckets.append([i])
            bucket_len = lengths[i]
    return buckets


def tower_by_tower(encode, towers):
    return [encode(seqs) for seqs in towers]


# (label, what undoing it patches): module, attribute, the value before the optimisation.
OPTIMISATIONS = [
    ("towers in one pass (engine/tasks/base.py encode_together)",
     [("engine.train.schedule", "encode_together", tower_by_tower)]),
    ("LoRA linear as one autograd node (engine/kernels/lora.py)",
     [("engine.model.lora", "lora_linear", "engine.kernels.lora:lora_linear_reference")]),
    ("LoRA merged into the weight per call, fp32 (engine/kernels/lora.py)",
     [("engine.kernels.lora", "MERGE_DTYPES", ())]),
    ("exact attention buckets, planned once per stream (reference.py plan_buckets)",
     [("engine.kernels.attention.reference", "plan_buckets", greedy_buckets)]),
    ("RMSNorm and rotary embedding as one autograd node each (engine/model/norm.py, rope.py)",
     [("engine.model.norm", "rms_norm", "engine.model.norm:rms_norm_reference"),
      ("engine.model.attention", "apply_rotary", "engine.model.rope:apply_rotary_reference")]),
]


def _resolve(value):
    """A patch value; "module:name" strings are looked up when the patch is applied."""
    if isinstance(value, str):
        source, name = value.split(":")
        return getattr(importlib.import_module(source), name)
    return value


def undo_optimisations() -> dict:
    """Put back what every optimisation replaced; returns what was there, to restore."""
    originals = {}
    for _, patches in OPTIMISATIONS:
        for module_name, attribute, before in patches:
            module = importlib.import_module(module_name)
            originals[module_name, attribute] = getattr(module, attribute)
            setattr(module, attribute, _resolve(before))
    return originals


def ablation(step, steps: int, flops: float, peak: float) -> None:
    from engine.kernels.attention import reference

    originals = undo_optimisations()
    print(f"{'':76s} s/step  model FLOP/s / peak")
    rows = [("before issue 12 (all undone)", [])] + [(f"+ {label}", patches) for label, patches in OPTIMISATIONS]
    for label, patches in rows:
        for module_name, attribute, _ in patches:  # restore this one
            setattr(importlib.import_module(module_name), attribute, originals[module_name, attribute])
        reference._stream_plan.cache_clear()
        seconds = time_steps(step, steps)
        print(f"{label:76s} {seconds:6.2f}  {flops / seconds / 1e9 / peak:.2f}", flush=True)


def profile_step(step) -> None:
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    groups = {"matmul (mm, addmm, bmm)": ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"),
              "attention (SDPA forward + backward)": ("aten::_scaled_dot_product",),
              "indexing / padding (index_*, fill_, copy_, cat)": ("aten::index", "aten::fill_", "aten::copy_",
                                                                 "aten::cat", "aten::scatter", "aten::zero_"),
              "optimizer (AdamW)": ("aten::_fused_adamw",)}
    totals = dict.fromkeys(list(groups) + ["element-wise and the rest"], 0.0)
    everything = 0.0
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        everything += seconds
        group = next((g for g, prefixes in groups.items() if event.key.startswith(prefixes)), "element-wise and the rest")
        totals[group] += seconds
    print(f"operator self time of one step: {everything:.2f} s (profiled, so slower than the timed step)")
    for group, seconds in totals.items():
        print(f"  {group:52s} {seconds:6.2f} s  {seconds / everything:5.1%}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


HOST_MEMORY_SETTINGS = [  # (label, environment)
    ("malloc and torch's allocator as they come", {"EMBER_KEEP_FREED_MEMORY": "0", "THP_MEM_ALLOC_ENABLE": "0"}),
    ("+ freed memory kept (keep_freed_memory)", {"EMBER_KEEP_FREED_MEMORY": "1", "THP_MEM_ALLOC_ENABLE": "0"}),
    ("+ huge pages (request_huge_pages)", {"EMBER_KEEP_FREED_MEMORY": "1", "THP_MEM_ALLOC_ENABLE": "1"}),
]


def host_memory_comparison(args) -> None:
    import json
    import subprocess

    print(f"{'':52s} s/step  page faults/step  system CPU s/step  peak RSS")
    for round_index in range(args.rounds):
        for label, settings in HOST_MEMORY_SETTINGS:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--batch", str(args.batch),
                                  "--steps", str(args.steps), "--ember-only"],
                                 capture_output=True, text=True, env={**os.environ, **settings}, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"round {round_index + 1}: {label:43s} {r['seconds']:6.2f}  {r['faults']:16,.0f}  "
                  f"{r['system_seconds']:17.2f}  {r['peak_rss_mib']:,.0f} MiB", flush=True)


def ember_only(step, steps: int) -> None:
    """Time Ember's step; print one JSON line: s/step, minor page faults and system CPU s per step, peak RSS."""
    import json
    import resource

    step()  # warm-up
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": seconds / steps, "faults": (after.ru_minflt - before.ru_minflt) / steps,
                      "system_seconds": (after.ru_stime - before.ru_stime) / steps,
                      "peak_rss_mib": after.ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ablation", action="store_true", help="Ember alone, each optimisation undone in turn")
    parser.add_argument("--profile", action="store_true", help="Ember alone: one step's time by operator group")
    parser.add_argument("--undone", action="store_true", help="with --profile: the step before issue 12's changes")
    parser.add_argument("--host-memory", action="store_true",
                        help="Ember alone, host memory as it comes vs kept vs huge pages (engine/host_memory.py)")
    parser.add_argument("--rounds", type=int, default=2, help="with --host-memory: rounds of the three settings")
    parser.add_argument("--ember-only", action="store_true", help=argparse.SUPPRESS)  # --host-memory's child
    args = parser.parse_args()
    if args.host_memory:
        return host_memory_comparison(args)

    cfg, yaml = compose(["+exp=demo", f"train.batch_size={args.batch}", "train.output_dir=outputs/bench",
                         "train.tensorboard=false", "data.eval="])
    trainer = Trainer(cfg, yaml)
    batch = trainer.collator([trainer.train_examples[i] for i in trainer.sampler.indices(0)], 0)
    real_tokens = batch.num_tokens

    def ember_step():
        trainer.step = 0  # the same batch every time, as the peer
        trainer.train_step()

    if args.ember_only:
        return ember_only(ember_step, args.steps)
    flops, block_flops = step_flops(trainer, batch)
    peak = matmul_peak_gflops()
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s")
    print(f"batch: {args.batch} queries x (1 pos + {batch.group_size - 1} neg); real tokens {real_tokens}")
    print(f"model FLOPs per step: {flops / 1e9:.1f} G (the blocks' frozen matmuls alone, 4 N T: "
          f"{block_flops / 1e9:.1f} G)")
    if args.profile:
        if args.undone:
            undo_optimisations()
        return profile_step(ember_step)
    if args.ablation:
        return ablation(ember_step, args.steps, flops, peak)

    ember_s = time_steps(ember_step, args.steps)
    peer, padded_tokens = peer_step_fn(trainer, cfg.model.path, cfg.lora.rank, cfg.lora.alpha)
    peer_s = time_steps(peer, args.steps)
    print(f"padded tokens {padded_tokens} ({padded_tokens / real_tokens:.2f}x)")
    print(f"ember (packed):      {ember_s:.2f} s/step, {real_tokens / ember_s:.0f} tokens/s, "
          f"model FLOP/s = {flops / ember_s / 1e9:.1f} GFLOP/s = {flops / ember_s / 1e9 / peak:.2f} of peak "
          f"(4 N T alone: {block_flops / ember_s / 1e9 / peak:.2f})")
    print(f"transformers+peft:   {peer_s:.2f} s/step, {real_tokens / peer_s:.0f} real tokens/s")
    print(f"speed-up: {peer_s / ember_s:.2f}x")


if __name__ == "__main__":
    main()
