"""Hugging Face folders in and out: config.json + safetensors (single file or sharded).

load_pretrained builds the Transformer on the meta device (no memory), reads every
tensor straight to its device and dtype, and assigns it; nothing is initialised twice
and nothing is unpickled (.bin checkpoints are refused, not loaded). save_pretrained
writes what transformers' AutoModelForCausalLM.from_pretrained reads back with
identical logits; un-merged LoRA layers are folded into the written weights.
Tokenizer files are handled elsewhere.
"""
from __future__ import annotations

import glob
import json
import logging
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from engine.model.args import ModelArgs
from engine.model.lora import LoRALinear
from engine.model.transformer import Transformer

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default shard size


class CheckpointError(ValueError):
    """A model folder that cannot be loaded as it is."""


def read_hf_config(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path}: no config.json (a Hugging Face model folder is expected)")
    with open(config_path) as f:
        return json.load(f)


def load_pretrained(
    path: str, *, causal: bool = True, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Transformer:
    """A Transformer with the weights of the Hugging Face folder `path`."""
    model = meta_model(path, causal=causal)
    args = model.args
    state = _normalise_keys(read_safetensors(path, dtype=dtype, device=device), args, path)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the {args.family} architecture in config.json: "
            f"missing {_few(missing)}; unexpected {_few(unexpected)}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    still_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CheckpointError(f"{path}: no weights were loaded for {_few(still_meta)}")
    return model


def read_safetensors(
    path: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """Every tensor of a single-file or sharded safetensors checkpoint (floating ones cast to dtype)."""
    files = _safetensors_files(path)
    state: dict[str, Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                state[key] = tensor
    return state


def save_pretrained(
    model: Transformer, folder: str, dtype: torch.dtype = torch.float32, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> None:
    """Write config.json and safetensors (sharded with an index above max_shard_bytes) into `folder`."""
    write_safetensors(_export_state_dict(model, dtype), folder, max_shard_bytes)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.args.to_hf_config(dtype), f, indent=2)


def write_safetensors(state: dict[str, Tensor], folder: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """HF's weight layout: model.safetensors, or numbered shards plus an index above max_shard_bytes."""
    os.makedirs(folder, exist_ok=True)
    shards = _split_into_shards(state, max_shard_bytes)
    for stale in glob.glob(os.path.join(folder, "model*.safetensors")) + glob.glob(os.path.join(folder, INDEX_FILE)):
        os.remove(stale)  # a previous save with another shard count must not shadow this one
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
        total_size = sum(t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(folder, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)


def _export_state_dict(model: Transformer, dtype: torch.dtype) -> dict[str, Tensor]:
    """The HF-named weights, LoRA folded in, contiguous CPU tensors in `dtype`."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{name}.weight"] = module.weight.detach() + module.delta_weight().detach()
    return {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in state.items()}


def _split_into_shards(state: dict[str, Tensor], max_shard_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor
        shard_bytes += size
    return shards


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = [os.path.join(path, name) for name in dict.fromkeys(weight_map.values())]
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
            raise CheckpointError(f"{path}: {INDEX_FILE} lists shards that are missing: {_few(absent)}")
        return files
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    others = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if len(others) == 1:
        return others
    pickles = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))
    hint = " (pickled .bin/.pt weights are never loaded: convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _normalise_keys(state: dict[str, Tensor], args: ModelArgs, path: str) -> dict[str, Tensor]:
    """Map the key layouts HF folders come in onto *ForCausalLM names."""
    return {name: state[key] for name, key in checkpoint_key_map(list(state), args, path).items()}


def checkpoint_key_map(keys: list[str], args: ModelArgs, path: str) -> dict[str, str]:
    """{*ForCausalLM parameter name: key in the checkpoint} for the key layouts HF folders use.

    Dropped: old Llama exports' rotary_emb.inv_freq, a *ForSequenceClassification `score.weight`
    (the reranker task reads it itself) and a tied model's lm_head (the embedding is the head).
    A bare backbone (AutoModel, e.g. embedding models) has no `model.` prefix. An untied model
    without lm_head.weight gets the embeddings (with a warning).
    """
    keys = [k for k in keys if not k.endswith("rotary_emb.inv_freq") and k != "score.weight"]
    bare = not any(k.startswith("model.") for k in keys) and "embed_tokens.weight" in keys
    mapping = {(k if (k == "lm_head.weight" or not bare) else f"model.{k}"): k for k in keys}
    if args.tie_word_embeddings:
        mapping.pop("lm_head.weight", None)
    elif "lm_head.weight" not in mapping and "model.embed_tokens.weight" in mapping:
        logger.warning(
            "%s: no lm_head.weight although tie_word_embeddings is false; using a copy of the embeddings "
            "(harmless for embedding models, wrong for a reranker's yes/no head)", path,
        )
        mapping["lm_head.weight"] = mapping["model.embed_tokens.weight"]
    return mapping


class CheckpointSlices:
    """Read parts of a Hugging Face folder's tensors without loading whole files: each rank of a
    tensor-parallel run reads just its slice (safetensors maps the file; nothing is unpickled)."""

    def __init__(self, path: str, args: ModelArgs):
        self.path = path
        self.file_of: dict[str, str] = {}
        for file in _safetensors_files(path):
            with safe_open(file, framework="pt") as f:
                self.file_of.update({key: file for key in f.keys()})
        self.key_of = checkpoint_key_map(list(self.file_of), args, path)

    def names(self) -> list[str]:
        return list(self.key_of)

    def shape(self, name: str) -> tuple[int, ...]:
        self._check(name)
        key = self.key_of[name]
        with safe_open(self.file_of[key], framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def _check(self, name: str) -> None:
        if name not in self.key_of:
            raise CheckpointError(f"{self.path}: no weights for {name}")

    def read(self, name: str, index: tuple[slice, ...] = (), dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> Tensor:
        """Tensor `name` (a *ForCausalLM parameter name), or the part `index` of it."""
        self._check(name)
        key = self.key_of[name]
        with safe_open(self.file_of[key], framework="pt") as f:
            tensor = f.get_slice(key)[index] if index else f.get_tensor(key)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor.to(device).contiguous()


def meta_model(path: str, *, causal: bool = True) -> Transformer:
    """The architecture of `path` with no weights (parameters on the meta device), to be filled slice by slice."""
    args = ModelArgs.from_hf_config(read_hf_config(path), causal=causal)
    with torch.device("meta"):
        return Transformer(args)


def _few(items: list[str], limit: int = 5) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
