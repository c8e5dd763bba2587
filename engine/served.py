"""What a server does with an exported folder: the settings it reads and how it loads and runs it.

sentence-transformers (and TEI and vLLM, which read its files), transformers AutoModel with the
recorded pooling, *ForCausalLM yes/no and *ForSequenceClassification rerankers, and peft's base model +
adapter, each as a client would call them, in float32. engine/export_parity.py compares their outputs
with the engine's; docs/serving.md gives the servers' flags.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.model.hf_io import CheckpointError


class ExportParityError(CheckpointError):
    """The exported folder, loaded as a server would, does not give the engine's vectors or scores."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What an embedding server reads from a folder: pooling, normalisation, prompt and length per side."""

    pooling: str
    normalize: bool
    prompts: dict[str, str]
    max_len: dict[str, int]


def recipe_from_sentence_transformers_files(folder: str) -> Recipe:
    """What TEI and vLLM read: 1_Pooling/config.json, modules.json, the prompts, max_seq_length."""
    pooling_cfg = read_json(folder, "1_Pooling/config.json")
    modes = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
    chosen = [name for key, name in modes.items() if pooling_cfg.get(key)]
    others = [key for key, on in pooling_cfg.items() if key.startswith("pooling_mode_") and on and key not in modes]
    if len(chosen) != 1 or others:
        raise ExportParityError(f"export parity: 1_Pooling/config.json turns on {chosen + others or 'no mode'}, "
                                "not one of last, mean, cls")
    normalize = any(m["type"].endswith("Normalize") for m in read_json(folder, "modules.json"))
    prompts = read_json(folder, "config_sentence_transformers.json").get("prompts", {})
    length = read_json(folder, "sentence_bert_config.json")["max_seq_length"]
    return Recipe(chosen[0], normalize, {"query": prompts.get("query", ""), "document": prompts.get("document", "")},
                  {"query": length, "document": length})


def recipe_from_task_file(folder: str) -> Recipe:
    """An adapter folder has no sentence-transformers files: the settings come from ember_task.json."""
    from engine.config import TaskConfig
    from engine.export import TASK_FILE, query_prompt

    info = read_json(folder, TASK_FILE)
    task = TaskConfig(**info["task"])
    return Recipe(task.pooling, task.normalize,
                  {"query": query_prompt(task), "document": task.doc_template.partition("{document}")[0]},
                  {"query": info["data"]["query_max_len"], "document": info["data"]["doc_max_len"]})


def sentence_transformer_vectors(folder: str, texts: dict[str, list[str]], device, dims: list[int]) -> dict:
    """side -> vectors, and (side, d) -> the truncate_dim=d vectors, from SentenceTransformer(folder)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(folder, device=str(device), model_kwargs={"dtype": torch.float32})
    out = {}
    for dim in [None, *dims]:
        # The attribute SentenceTransformer(folder, truncate_dim=d) sets: one load serves every d.
        model.truncate_dim = dim
        for side, items in texts.items():
            vectors = model.encode(items, prompt_name=side, batch_size=max(1, len(items)), convert_to_tensor=True,
                                   show_progress_bar=False)
            out[side if dim is None else (side, dim)] = vectors.float().cpu().reshape(len(items), -1)
    return out


def auto_model_vectors(folder: str, recipe: Recipe, texts: dict[str, list[str]], device, load=None) -> dict:
    """side -> vectors from transformers AutoModel: prompt + text, the tokenizer's own special tokens
    (the exported one appends EOS), cut at the recorded length, pooled and normalised as recorded."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = (load() if load else AutoModel.from_pretrained(folder, dtype=torch.float32)).to(device).eval()
    out = {}
    for side, items in texts.items():
        rows = []
        for text in items:  # one at a time: no padding to get right
            ids = tokenizer(recipe.prompts[side] + text, truncation=True, max_length=recipe.max_len[side],
                            return_tensors="pt").to(device)
            with torch.no_grad():
                hidden = model(**ids).last_hidden_state[0].float()
            rows.append(pool(hidden, recipe.pooling))
        vectors = torch.stack(rows).cpu() if rows else torch.empty(0, 0)
        out[side] = F.normalize(vectors, dim=-1) if recipe.normalize and rows else vectors
    return out


def pool(hidden: Tensor, pooling: str) -> Tensor:
    if pooling == "last":
        return hidden[-1]
    if pooling == "mean":
        return hidden.mean(0)
    return hidden[0]


def served_scores(load, folder: str, task_cfg, max_len: int, pairs: list, device) -> Tensor:
    """One score per (query, document): logit(yes) - logit(no) at the last token, or the one label."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load().to(device).eval()
    yes_no = None
    if task_cfg.head == "yes_no":
        yes_no = [tokenizer.convert_tokens_to_ids(t) for t in (task_cfg.yes_token, task_cfg.no_token)]
    scores = []
    for query, document in pairs:
        ids = torch.tensor([pair_ids(tokenizer, task_cfg, query, document, max_len)], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        scores.append(logits[0, -1, yes_no[0]] - logits[0, -1, yes_no[1]] if yes_no else logits[0, 0])
    return torch.stack(scores).cpu()


def pair_ids(tokenizer, task_cfg, query: str, document: str, max_len: int) -> list[int]:
    """A reranker input as a client builds it: the filled template as one string, or, when that is
    too long, Qwen3-Reranker's model-card recipe: prefix and suffix kept whole, the body cut to the
    rest. The tokenizer's default special tokens (a Llama 3 BOS) come first."""
    from engine.data.templates import fill, reranker_instruction, reranker_template

    template = reranker_template(task_cfg)
    body = fill(template.body, instruction=reranker_instruction(task_cfg), query=query, document=document)
    whole = tokenizer(template.prefix + body + template.suffix)["input_ids"]
    if len(whole) <= max_len:
        return list(whole)
    prefix = tokenizer(template.prefix)["input_ids"]
    suffix = tokenizer(template.suffix, add_special_tokens=False)["input_ids"] if template.suffix else []
    kept = tokenizer(body, add_special_tokens=False, truncation=True,
                     max_length=max_len - len(prefix) - len(suffix))["input_ids"]
    return list(prefix) + list(kept) + list(suffix)


def with_adapter(auto_class, base: str, folder: str, task_type: str | None = "as saved", **kwargs):
    """The base model (float32) with the adapter, as PeftModel.from_pretrained(base, folder) gives it."""
    from peft import PeftConfig, PeftModel

    model = auto_class.from_pretrained(base, dtype=torch.float32, **kwargs)
    config = PeftConfig.from_pretrained(folder)
    if task_type != "as saved":
        config.task_type = task_type
    return PeftModel.from_pretrained(model, folder, config=config)


def with_score_head(model, folder: str):
    """An adapter folder keeps the linear head apart (score_head.safetensors): a server loads it in."""
    from safetensors.torch import load_file

    weight = load_file(os.path.join(folder, "score_head.safetensors"))["score.weight"]
    model.get_base_model().score.weight.data.copy_(weight.float())
    return model


def adapter_base(folder: str) -> str:
    base = read_json(folder, "adapter_config.json").get("base_model_name_or_path")
    if not base or not os.path.isfile(os.path.join(base, "config.json")):
        raise ExportParityError(
            f"export parity: the adapter's base model ({base!r}, model.path) is not a Hugging Face folder, so no "
            "server can load base + adapter; export with export.merge_lora=true")
    return base


def read_json(folder: str, name: str):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)
