"""The Python API for trained models.

    from engine import Embedder, Reranker
    vectors = Embedder.from_pretrained("outputs/demo/export").encode(["a text"], batch_size=32)
    queries = Embedder.from_pretrained(path).encode(["a question"], is_query=True)
    scores = Reranker.from_pretrained(path).score("a question", ["doc one", "doc two"])

`path` is an exported folder (it carries ember_task.json) or any Hugging Face folder of a
supported family (then the task settings are the config defaults). Keyword overrides set
task or data fields by name (pooling="mean", query_max_len=256, ...) and device / dtype.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import torch

from engine.config import DataConfig, ModelConfig, TaskConfig
from engine.export import TASK_FILE


def _configs(path: str, task_type: str, overrides: dict) -> tuple[TaskConfig, DataConfig, bool]:
    task, data, causal = TaskConfig(type=task_type), DataConfig(), True
    info_path = os.path.join(path, TASK_FILE)
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        task = TaskConfig(**info["task"])
        data = dataclasses.replace(data, **info["data"])
        causal = info.get("causal", True)
    if task.type != task_type:
        raise ValueError(f"{path} holds a {task.type} model, not a {task_type} model")
    task_fields = {f.name for f in dataclasses.fields(TaskConfig)}
    data_fields = {f.name for f in dataclasses.fields(DataConfig)}
    for key, value in overrides.items():
        if key in task_fields:
            task = dataclasses.replace(task, **{key: value})
        elif key in data_fields:
            data = dataclasses.replace(data, **{key: value})
        elif key == "causal":
            causal = bool(value)
        else:
            raise TypeError(f"unknown option {key!r} (task/data config fields, causal, device, dtype)")
    return task, data, causal


def load_task_model(path: str, task_cfg: TaskConfig, data_cfg: DataConfig, causal: bool = True,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A task model (backbone + head) and its text encoder from a model folder, ready for inference."""
    from engine.data.tokenize import TextEncoder
    from engine.model.hf_io import load_pretrained
    from engine.tasks import build_task
    from engine.build import load_tokenizer

    device = torch.device(device)
    tokenizer = load_tokenizer(ModelConfig(path=path))
    backbone = load_pretrained(path, causal=causal, dtype=dtype, device=device)
    task = build_task(backbone, task_cfg, tokenizer)
    if task_cfg.type == "reranker" and task_cfg.head == "linear":
        task.score.weight.data.copy_(_read_tensor(path, "score.weight"))
    return task.to(device).eval(), TextEncoder(tokenizer, task_cfg, data_cfg)


def _read_tensor(path: str, name: str) -> torch.Tensor:
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    filename = "model.safetensors"
    if os.path.isfile(index):
        with open(index) as f:
            filename = json.load(f)["weight_map"].get(name, filename)
    with safe_open(os.path.join(path, filename), framework="pt") as f:
        if name not in f.keys():
            from engine.model.hf_io import CheckpointError

            raise CheckpointError(f"{path}: task.head=linear but the weights have no {name}")
        return f.get_tensor(name)


def _load(path: str, task_type: str, overrides: dict):
    from engine.build import resolve_device
    from engine.host_memory import keep_freed_memory

    keep_freed_memory()  # every encode batch frees and reallocates the same activations
    device = resolve_device(overrides.pop("device", "auto"))
    dtype = overrides.pop("dtype", torch.float32)
    task_cfg, data_cfg, causal = _configs(path, task_type, overrides)
    return load_task_model(path, task_cfg, data_cfg, causal, device, dtype) + (device,)


class Embedder:
    def __init__(self, task, text_encoder, device):
        self.task, self.text_encoder, self.device = task, text_encoder, device

    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> "Embedder":
        return cls(*_load(path, "embedding", overrides))

    def encode(self, texts: list[str] | str, batch_size: int = 32, is_query: bool = False,
               instruction: str | None = None) -> np.ndarray:
        """Embed documents (default) or queries (is_query=True: the instruction template applies)."""
        from engine.inference import encode_tokens

        if isinstance(texts, str):
            texts = [texts]
        if is_query:
            tokens = self.text_encoder.queries(list(texts), [instruction] * len(texts))
        else:
            tokens = self.text_encoder.documents(list(texts))
        return encode_tokens(self.task, tokens, batch_size, self.device).numpy()


class Reranker:
    def __init__(self, task, text_encoder, device):
        self.task, self.text_encoder, self.device = task, text_encoder, device

    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> "Reranker":
        return cls(*_load(path, "reranker", overrides))

    def score(self, query: str, documents: list[str], batch_size: int = 16,
              instruction: str | None = None) -> list[float]:
        from engine.inference import encode_tokens

        tokens = self.text_encoder.pairs([query] * len(documents), list(documents), [instruction] * len(documents))
        return encode_tokens(self.task, tokens, batch_size, self.device).tolist()
