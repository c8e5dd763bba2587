"""One training step of the demo recipe, Ember against its peer, as ratios measured in one run.

    python bench/train_step.py [--steps 3] [--batch 16]

Ember: packed sequences (cu_seqlens, no padding), LoRA r=16 on every projection, mean pooling,
InfoNCE over 1 positive + 1 hard negative per query plus in-batch candidates.
Peer: transformers + peft on the same weights, LoRA and loss, with right padding per tower
(the way sentence-transformers and FlagEmbedding batch).
Also measured: this CPU's fp32 matmul rate, so model FLOP/s can be read as a fraction of it.
Needs the demo assets (`python launch/prepare_demo.py`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import compose  # noqa: E402
from engine.losses import info_nce  # noqa: E402
from engine.train.trainer import Trainer  # noqa: E402


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    cfg, yaml = compose(["+exp=demo", f"train.batch_size={args.batch}", "train.output_dir=outputs/bench",
                         "train.tensorboard=false", "data.eval="])
    trainer = Trainer(cfg, yaml)
    batch = trainer.collator([trainer.train_examples[i] for i in trainer.sampler.indices(0)], 0)
    real_tokens = batch.num_tokens

    def ember_step():
        trainer.step = 0  # the same batch every time, as the peer
        trainer.train_step()

    peak = matmul_peak_gflops()
    ember_s = time_steps(ember_step, args.steps)
    peer, padded_tokens = peer_step_fn(trainer, cfg.model.path, cfg.lora.rank, cfg.lora.alpha)
    peer_s = time_steps(peer, args.steps)

    backbone = trainer.model.backbone
    dense = sum(p.numel() for n, p in backbone.named_parameters() if "embed_tokens" not in n and "lora_" not in n)
    # Frozen weights: forward 2*N*T plus the input-gradient half of the backward, 2*N*T.
    flops = 4 * dense * real_tokens
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s")
    print(f"batch: {args.batch} queries x (1 pos + {batch.group_size - 1} neg); real tokens {real_tokens}, "
          f"padded tokens {padded_tokens} ({padded_tokens / real_tokens:.2f}x)")
    print(f"ember (packed):      {ember_s:.2f} s/step, {real_tokens / ember_s:.0f} tokens/s, "
          f"model FLOP/s = {flops / ember_s / 1e9:.1f} GFLOP/s = {flops / ember_s / 1e9 / peak:.2f} of peak")
    print(f"transformers+peft:   {peer_s:.2f} s/step, {real_tokens / peer_s:.0f} real tokens/s")
    print(f"speed-up: {peer_s / ember_s:.2f}x")


if __name__ == "__main__":
    main()
