"""The memory model (engine/plan/memory.py) against measured peaks: CPU runs of a small Llama in
several layouts, predicted vs measured peak memory per rank.

    python bench/memory.py                     # every configuration (about 4 minutes on 2 cores)
    python bench/memory.py --only tp2 pp2      # some of them
    python bench/memory.py --markdown          # the table docs/performance.md carries

Each configuration trains the real Trainer on gloo ranks (spawn_ranks): a reranker on a 4-layer
Llama (hidden 256, SwiGLU 704, 8 heads, 4 KV heads), documents long enough that every sequence fills
data.max_len; float32 except the bf16 rows (model.dtype=bfloat16). Two measurements per rank:

resident   the process's peak resident memory during steps 2 and 3 (VmHWM, reset before each step
           through /proc/self/clear_refs), less what it held before the step other than the
           model's parameters (interpreter, libraries, data, tokenizer); glibc's mmap threshold is
           fixed at 64 KiB so that freed tensors go back to the system (by default it grows to
           32 MiB and freed tensors stay mapped). Everything the step costs, the runtime included.
tensors    the peak of live tensor bytes during step 4, from the allocations and frees torch.profiler
           records, plus the parameters and AdamW moments allocated before it: what a GPU's
           max_memory_allocated() reports, without the runtime's own buffers (oneDNN's, gloo's,
           Python's).
AdamW's moments exist from the first step's end, so steps 2-4 are the steady state; the plan's
stage for a rank is compared with it (pp rows: stage 0 / stage 1, the worst error reported).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.parallel.spawn import spawn_ranks  # noqa: E402

# The trainer keeps freed host memory in the process (engine/host_memory.py), so its resident
# memory would be the high-water mark of everything before the step (loading included), not the
# step's own peak that a GPU allocator's counter reports and the model predicts: measured with
# malloc as it comes. The ranks inherit it.
os.environ["EMBER_KEEP_FREED_MEMORY"] = "0"

MiB = 2**20
MODEL = ["model=tiny", "model.hidden_size=256", "model.intermediate_size=704", "model.num_layers=4",
         "model.num_heads=8", "model.num_kv_heads=4", "model.tie_word_embeddings=false"]
RUN = ["task=reranker", "task.num_negatives=3", "task.template=plain", "data.max_len=512", "train.batch_size=2",
       "train.tensorboard=false", "train.save_final=false", "train.device=cpu"]
# name: (ranks, overrides)
CONFIGS = {
    "single": (1, []),
    "selective": (1, ["train.recompute=selective"]),
    "full": (1, ["train.recompute=full"]),
    "bf16": (1, ["model.dtype=bfloat16"]),
    "bf16-tp2-full": (2, ["model.dtype=bfloat16", "parallel.tp=2", "train.recompute=full"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2-no-sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=false"]),
    "tp2-full": (2, ["parallel.tp=2", "train.recompute=full"]),
    "pp2": (2, ["parallel.pp=2", "train.batch_size=4", "train.grad_accum=2"]),
    "pp2-full": (2, ["parallel.pp=2", "train.batch_size=4", "train.grad_accum=2", "train.recompute=full"]),
    "ring2": (2, ["parallel.ring=2"]),
    "ring2-full": (2, ["parallel.ring=2", "train.recompute=full"]),
    "ulysses2": (2, ["parallel.ulysses=2"]),
    "pp2xtp2": (4, ["parallel.pp=2", "parallel.tp=2", "train.batch_size=4", "train.grad_accum=2"]),
}
STEPS = 3


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _held_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers this rank holds (its shards, counted once each)."""
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storage = local.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _tensor_peak(trainer) -> int:
    """Peak live tensor bytes of one training step: what existed before it and stays (parameters and
    AdamW's moments; the last step's gradients are freed first, as the step itself would) plus the
    running sum of the allocations and frees torch.profiler records during the step."""
    from torch.profiler import ProfilerActivity, profile

    trainer.optimizer.zero_grad(set_to_none=True)
    states = [t for state in trainer.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    before = _held_bytes(trainer.model) + sum(t.untyped_storage().nbytes() for t in states)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step()
    # Every allocation and free, in time order (prof.events() folds most of them into their ops).
    changes = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return before + peak


def measure_rank(rank: int, world: int, overrides: list[str]) -> dict:
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so freed tensors leave
    from engine.cli import compose
    from engine.config import validate
    from engine.parallel.layout import layout_from_config
    from engine.parallel.mesh import init_mesh
    from engine.train.trainer import Trainer

    cfg, config_yaml = compose(overrides)
    validate(cfg)
    trainer = Trainer(cfg, config_yaml, init_mesh(layout_from_config(cfg.parallel), torch.device("cpu")))
    outside_model = _status("VmRSS") - _held_bytes(trainer.model)
    peaks, tokens = [], []
    for _ in range(STEPS):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        tokens.append(trainer.train_step()["tokens"])
        peaks.append(_status("VmHWM") - outside_model)
    return {"peaks": peaks, "tokens": tokens, "tensors": _tensor_peak(trainer)}


def predicted(overrides: list[str], world: int):
    """The plan for these overrides on `world` ranks, and its layout."""
    from engine.build import model_args
    from engine.cli import compose
    from engine.parallel.layout import layout_from_config
    from engine.plan.memory import plan_memory

    cfg, _ = compose(overrides)
    layout = layout_from_config(cfg.parallel, world)
    return plan_memory(cfg, model_args(cfg.model), layout, device="cpu"), layout


def write_data(folder: str) -> str:
    """Documents of ~3000 words: every query + document pair is cut to data.max_len."""
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    path = os.path.join(folder, "train.jsonl")
    with open(path, "w") as f:
        for _ in range(32):
            f.write(json.dumps({"query": text(10), "pos": [text(3000)], "neg": [text(3000) for _ in range(3)]}) + "\n")
    return path


def run(names: list[str]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        data = write_data(folder)
        for name in names:
            world, extra = CONFIGS[name]
            overrides = MODEL + RUN + [f"data.train={data}", f"train.output_dir={folder}/{name}"] + extra
            ranks = spawn_ranks(measure_rank, world, overrides, timeout_s=600, threads=None)
            plan, layout = predicted(overrides, world)
            stage_totals = [stage.total for stage in plan.stages]
            # Rank r runs pipeline stage r // (world / pp) (pp is the outermost mesh dimension).
            per_stage = world // layout.pp
            stage_ranks = [ranks[s * per_stage:(s + 1) * per_stage] for s in range(layout.pp)]
            resident = [max(max(r["peaks"][1:]) for r in group) for group in stage_ranks]
            tensors = [max(r["tensors"] for r in group) for group in stage_ranks]
            rows.append({"name": name, "ranks": world, "overrides": " ".join(extra),
                         "tokens": ranks[0]["tokens"][-1], "predicted": stage_totals, "measured": resident,
                         "error": _worst_error(stage_totals, resident), "tensors": tensors,
                         "tensor_error": _worst_error(stage_totals, tensors),
                         "components": {c: getattr(plan.heaviest, c) for c in
                                        ("weights", "grads", "optimizer", "activations", "workspace", "comm_buffers")}})
            print(f"{name:>13}: predicted {_mib(stage_totals)}, resident {_mib(resident)} "
                  f"({rows[-1]['error']:+.1%}), tensors {_mib(tensors)} ({rows[-1]['tensor_error']:+.1%})", flush=True)
    return rows


def _worst_error(predicted: list[float], measured: list[float]) -> float:
    return max((p / m - 1 for p, m in zip(predicted, measured)), key=abs)


def _mib(values: list[float]) -> str:
    return "/".join(f"{v / MiB:.0f}" for v in values) + " MiB"


def markdown(rows: list[dict]) -> str:
    lines = ["| configuration | ranks | predicted peak per rank (MiB) | resident (MiB) | error | tensors (MiB) | error |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['name']} (`{row['overrides'] or 'defaults'}`) | {row['ranks']} | "
                     f"{_mib(row['predicted'])[:-4]} | {_mib(row['measured'])[:-4]} | {row['error']:+.1%} | "
                     f"{_mib(row['tensors'])[:-4]} | {row['tensor_error']:+.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(CONFIGS), help="configurations to run")
    parser.add_argument("--markdown", action="store_true", help="print the table for docs/performance.md")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = run(args.only or list(CONFIGS))
    if args.markdown:
        print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    for key in ("error", "tensor_error"):
        worst = max(rows, key=lambda r: abs(r[key]))
        print(f"largest {key.replace('_', ' ')}: {worst['name']} {worst[key]:+.1%}")


if __name__ == "__main__":
    main()
