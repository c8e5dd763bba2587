"""AdamW and the learning-rate schedule (linear warmup, then cosine or linear decay)."""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(params: list[torch.nn.Parameter], cfg, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms and biases: weight decay hurts them
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # The fused kernel exists for CUDA and CPU tensors in torch >= 2.4; it is one launch per step.
    fused = device.type in ("cuda", "cpu") and all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)


def lr_multiplier(step: int, *, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Factor on the peak lr for optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or max_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> LambdaLR:
    return LambdaLR(
        optimizer,
        lambda step: lr_multiplier(
            step, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
            schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio,
        ),
    )
