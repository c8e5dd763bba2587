"""Turn a RunConfig into the objects a run needs: device, dtype, tokenizer, backbone, task."""
from __future__ import annotations

import torch

from engine.config import ConfigError, ModelConfig, RunConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """cpu, or under torchrun the GPU of this process's LOCAL_RANK (cuda and auto alike)."""
    import os

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Parameter dtype. auto: fp32 weights everywhere (bf16 autocast does the GPU compute)."""
    if name == "auto":
        return torch.float32
    return DTYPES[name]


def autocast_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU by default; fp32 on CPU (exact resumes, parity tests)."""
    if cfg.dtype == "auto" and device.type == "cuda":
        return torch.bfloat16
    return None


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    if cfg.path:
        return AutoTokenizer.from_pretrained(cfg.path)
    if cfg.tokenizer:
        return AutoTokenizer.from_pretrained(cfg.tokenizer)
    from engine.data.byte_tokenizer import byte_tokenizer

    return byte_tokenizer()


def model_args(cfg: ModelConfig):
    """The architecture, from the HF folder's config.json or from the config's own fields."""
    import json
    import os

    from engine.model.args import ModelArgs

    if cfg.path:
        with open(os.path.join(cfg.path, "config.json")) as f:
            return ModelArgs.from_hf_config(json.load(f), causal=cfg.causal)
    return ModelArgs.from_model_config(cfg)


def build_backbone(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int):
    from engine.model.hf_io import load_pretrained
    from engine.model.transformer import Transformer

    if cfg.path:
        model = load_pretrained(cfg.path, causal=cfg.causal, dtype=dtype, device=device)
    else:
        torch.manual_seed(seed)
        model = Transformer(model_args(cfg))  # initialised in the constructor, from this seed
        model.to(device=device, dtype=dtype)
    return model


def build_task_model(cfg: RunConfig, device: torch.device, tokenizer, meta_backbone: bool = False):
    """Backbone (+ LoRA) wrapped in its task; the task head is created after LoRA so it stays trainable.

    meta_backbone: the backbone's weights stay on the meta device (engine.parallel.load fills
    each rank's slices after tensor parallelism); adapters and heads are real and seeded the same.
    """
    from engine.model.lora import apply_lora
    from engine.tasks import build_task

    dtype = resolve_dtype(cfg.model.dtype, device)
    if meta_backbone:
        backbone = meta_backbone_from(cfg.model, dtype)
    else:
        backbone = build_backbone(cfg.model, device, dtype, cfg.train.seed)
    backbone.set_recompute(cfg.train.recompute)
    if cfg.lora.rank > 0:
        # Seeded so that the LoRA A matrices are the same for every run with this seed.
        torch.manual_seed(cfg.train.seed + 1)
        apply_lora(backbone, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, list(cfg.lora.targets),
                   adapter_device=device)
    torch.manual_seed(cfg.train.seed + 2)
    task = build_task(backbone, cfg.task, tokenizer, head_device=device)
    if not meta_backbone:
        task.to(device)
    return task


def meta_backbone_from(cfg: ModelConfig, dtype: torch.dtype):
    from engine.model.hf_io import meta_model

    backbone = meta_model(cfg.path, causal=cfg.causal).to(dtype=dtype)
    return backbone
