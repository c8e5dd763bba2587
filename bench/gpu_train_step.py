"""One bf16 training step of a Qwen3-1.7B-shaped embedding model on one GPU: tokens/s and MFU.

    python bench/gpu_train_step.py                    # GPU: conf/model/qwen3_1_7b, random weights, 16 x 2048 tokens
    python bench/gpu_train_step.py --tiny             # CPU: a toy Qwen3 in float32 (the GPU check's dry run)
    python bench/gpu_train_step.py kernels.attention=sdpa train.recompute=selective   # any run override

Model: Qwen3-1.7B's architecture (conf/model/qwen3_1_7b.yaml: hidden 2048, 28 layers, 16 query and
8 KV heads of 128, intermediate 6144, q/k RMSNorm, vocab 151936 tied), built from those fields with
random weights (no download): 1.41B parameters in the blocks, the N of the FLOP count, and 0.31B in
the embedding, which the count leaves out.

Step: Ember's own Trainer.train_step on the embedding task, full fine-tuning: 4 queries x (1 positive
+ 2 hard negatives) and in-batch negatives, every text long enough to fill its max length, so one
step packs 16 sequences x 2048 tokens = 32,768 tokens. bf16 weights, gradients and AdamW state
(model.dtype=bfloat16, as conf/exp/embedding_qwen3_8b.yaml) and recompute=full as there: launch/plan.py
puts this step at 22 GiB per GPU with it and 111 GiB without (97 GiB of activations), and predicts
1.01 s per step at its default 40% MFU of 989 TFLOP/s. Attention: kernels.attention=auto, what a run on
this machine picks (flash-attn when installed, else Triton); InfoNCE: the chunked PyTorch path.

Timing: --warmup steps (autotuning, the allocator), then --steps steps between CUDA syncs.
FLOPs: engine/plan/step_time.py's flops_per_step. MFU counts model FLOPs, the same step with
train.recompute=none (6 N T for the blocks' matmuls + 4 s^2 (heads x head_dim) per layer and
sequence for attention, halved under causal masking, x3 for forward + backward); the executed
FLOP/s add the recompute forward. MFU = model FLOPs / step time / the card's dense bf16 peak
(PEAK_BF16_TFLOPS; an unknown card gets TFLOP/s and no MFU).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import compose  # noqa: E402
from engine.config import validate  # noqa: E402
from engine.plan.step_time import flops_per_step, sequences_per_step  # noqa: E402
from engine.train.trainer import Trainer  # noqa: E402

# Dense bf16 tensor-core TFLOP/s from NVIDIA's datasheets (their headline figures with sparsity are
# twice these), matched in order against torch.cuda.get_device_name(): "NVIDIA H100 80GB HBM3" is
# the SXM card, "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" the others; GH200 matches H200.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))

# The measured step: 4 queries x (1 + 2) documents = 16 sequences, each filled to 2048 tokens. InfoNCE
# over 4 x 16 scores is ~1e-8 of the step's FLOPs: its chunked PyTorch path spares the step the Triton
# kernel's autotuning for that shape (the kernel has its own benchmark, kernel_bench.py --what infonce).
GPU_OVERRIDES = ["model=qwen3_1_7b", "model.dtype=bfloat16", "train.device=cuda", "train.recompute=full",
                 "train.batch_size=4", "task.num_negatives=2", "data.query_max_len=2048", "data.doc_max_len=2048",
                 "kernels.infonce=torch"]
# The same code path on CPU in seconds: a two-layer Qwen3 (q/k norm, GQA 4:2), 16 x 32 tokens, fp32 (a
# one-word instruction leaves the queries room).
TINY_OVERRIDES = ["model.family=qwen3", "model.dtype=float32", "train.device=cpu", "train.recompute=full",
                  "train.batch_size=4", "task.num_negatives=2", "task.query_instruction=find",
                  "data.query_max_len=32", "data.doc_max_len=32"]


def peak_tflops(card: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in card), None)


def in_units(params: float) -> str:
    return f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"


def write_long_texts(path: str, lines: int, chars: int, num_negatives: int) -> None:
    """FlagEmbedding-format lines whose every text outruns `chars` tokens (the byte tokenizer: one per
    byte), so that truncation fills each sequence to its max length."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma"]

    def text() -> str:
        out = []
        while sum(len(w) + 1 for w in out) < chars + 64:
            out.append(rng.choice(words))
        return " ".join(out)

    with open(path, "w") as f:
        for _ in range(lines):
            line = {"query": text(), "pos": [text()], "neg": [text() for _ in range(num_negatives)]}
            f.write(json.dumps(line) + "\n")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy Qwen3 in float32 on CPU: checks the code path")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; --tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5; --tiny 1)")
    parser.add_argument("overrides", nargs="*", help="run overrides after the bench's own, e.g. kernels.attention=sdpa")
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    steps = args.steps if args.steps is not None else (1 if args.tiny else 5)
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_train_step: needs a CUDA GPU (none here); --tiny runs the same step on CPU at a toy size")
        sys.exit(1)

    with tempfile.TemporaryDirectory() as scratch:
        overrides = TINY_OVERRIDES if args.tiny else GPU_OVERRIDES
        base = [*overrides, f"data.train={scratch}/train.jsonl", "data.eval=null", f"train.output_dir={scratch}/run",
                "train.tensorboard=false", f"train.max_steps={warmup + steps}", "train.save_final=false"]
        cfg, config_yaml = compose([*base, *args.overrides])
        longest = max(cfg.data.query_max_len, cfg.data.doc_max_len)
        write_long_texts(cfg.data.train, 4 * cfg.train.batch_size, longest, cfg.task.num_negatives)
        validate(cfg)
        trainer = Trainer(cfg, config_yaml)
        device, backbone = trainer.device, trainer.model.backbone
        model_args = backbone.args

        for _ in range(warmup):
            trainer.train_step()
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        records = [trainer.train_step() for _ in range(steps)]
        synchronize(device)
        step_s = (time.perf_counter() - start) / steps

    # Model FLOPs: the same step without the recompute forward (and without GradCache's first pass).
    model_cfg = copy.deepcopy(cfg)
    model_cfg.train.recompute, model_cfg.train.grad_cache = "none", False
    model_flops, executed_flops = flops_per_step(model_cfg, model_args), flops_per_step(cfg, model_args)
    tokens = records[-1]["tokens"]
    planned = sum(seqs * length for seqs, length in sequences_per_step(cfg))
    block_params = model_args.num_parameters() - model_args.vocab_size * model_args.hidden_size * (
        1 if model_args.tie_word_embeddings else 2)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = peak_tflops(card) if device.type == "cuda" else None
    model_tflops = model_flops / step_s / 1e12
    if device.type != "cuda":
        mfu = "MFU n/a (CPU)"
    elif peak is None:
        mfu = "MFU n/a (no bf16 peak known for this card)"
    else:
        mfu = f"MFU {100 * model_tflops / peak:.1f}% of {peak:.0f}"
    lengths = " + ".join(f"{seqs} x {length}" for seqs, length in sequences_per_step(cfg))
    tuning = f"LoRA r={cfg.lora.rank}" if cfg.lora.rank > 0 else "full fine-tuning"
    memory = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""

    print(f"card: {card}, torch {torch.__version__}, kernels: attention {trainer.kernels['attention']}, "
          f"infonce {trainer.kernels['infonce']}")
    print(f"model: {model_args.family}, hidden {model_args.hidden_size}, {model_args.num_layers} layers, "
          f"{model_args.num_heads}/{model_args.num_kv_heads} heads of {model_args.head_dim}, intermediate "
          f"{model_args.intermediate_size}: {in_units(block_params)} block + "
          f"{in_units(model_args.num_parameters() - block_params)} embedding parameters, random init")
    print(f"step: {cfg.model.dtype} weights, {tuning}, recompute {cfg.train.recompute}; sequences "
          f"{lengths} = {planned} tokens planned, {tokens} packed; {warmup} warm-up + {steps} timed step(s); "
          f"losses {[round(r['loss'], 4) for r in records]}")
    print(f"FLOPs per step: model {model_flops / 1e12:.4g} T, executed {executed_flops / 1e12:.4g} T")
    if tokens != planned:
        print(f"warning: the step packed {tokens} tokens, not the {planned} the FLOP count assumes")
    print(f"figure: train step, {model_args.family} {in_units(block_params)} block parameters "
          f"({'toy, ' if args.tiny else 'Qwen3-1.7B shape, '}random init), {tuning}, {cfg.model.dtype}, "
          f"recompute {cfg.train.recompute}, {lengths} tokens, {card}: {step_s:.3f} s/step, "
          f"{tokens / step_s:,.0f} tokens/s, {model_tflops:.3g} TFLOP/s model "
          f"({executed_flops / step_s / 1e12:.3g} executed), {mfu}{memory}")


if __name__ == "__main__":
    main()
