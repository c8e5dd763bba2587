"""Export a training checkpoint as a Hugging Face folder that other tools load as they are.

- embedding: the base model (e.g. LlamaModel) + tokenizer + sentence-transformers files
  (modules.json, pooling, normalize, query prompt), so `SentenceTransformer(path).encode(texts)`
  gives the engine's embeddings;
- reranker, yes_no head: a causal LM (score = logit(yes) - logit(no) at the last position);
- reranker, linear head: a *ForSequenceClassification model with one label.
Every export also carries `ember_task.json` (the task settings) so `engine.Embedder`,
`engine.Reranker` and launch/evaluate.py rebuild the exact same scorer.
LoRA is merged unless export.merge_lora=false, which writes a PEFT adapter folder instead.

Every export ends with the parity check (engine/export_parity.py): the folder is loaded the way
a server would and compared with the engine. Passed: `ember_parity.json` records it and the folder
takes its name (an earlier failure's `<output>.unservable` goes). Failed: ExportParityError (one
line), the folder is left as `<output>.unservable` (with PARITY_FAILED.txt) and `<output>`, an
earlier export included, is not touched.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from engine.config import RunConfig, check_prefix_templates
from engine.build import DTYPES

TASK_FILE = "ember_task.json"
PARITY_FILE = "ember_parity.json"  # written only when the parity check passed
FAILED_FILE = "PARITY_FAILED.txt"  # in <output>.unservable: the check's one line
UNSERVABLE_SUFFIX = ".unservable"
_FAMILY_CLASS = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}


def load_run_config(checkpoint_dir: str) -> RunConfig:
    path = os.path.join(checkpoint_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint={checkpoint_dir}: no config.yaml (is this a step_XXXXXXXX folder?)")
    schema = OmegaConf.structured(RunConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(path)))


def export_checkpoint(checkpoint_dir: str, output_dir: str, merge_lora: bool | None = None,
                      dtype: str | None = None) -> str:
    from engine.build import build_task_model, load_tokenizer
    from engine.train.checkpoint import load_checkpoint

    cfg = load_run_config(checkpoint_dir)
    if merge_lora is not None:
        cfg.export.merge_lora = merge_lora
    if dtype is not None:
        cfg.export.dtype = dtype
    tokenizer = load_tokenizer(cfg.model)
    task = build_task_model(cfg, torch.device("cpu"), tokenizer)
    load_checkpoint(checkpoint_dir, task)
    return export_task(task, cfg, tokenizer, output_dir)


def export_task(task, cfg: RunConfig, tokenizer, output_dir: str) -> str:
    """Write the folder under a temporary name, check that it serves as the engine scores, then
    rename: a half-written or unservable export never appears under output_dir."""
    from engine.export_parity import ExportParityError, check_export, trained_reference

    reference = trained_reference(task, cfg, tokenizer)  # before LoRA is merged into the weights
    tmp = output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    dtype = DTYPES[cfg.export.dtype]
    if cfg.lora.rank > 0 and not cfg.export.merge_lora:
        _write_adapter(task, cfg, tokenizer, tmp)
    else:
        if cfg.lora.rank > 0:
            from engine.model.lora import merge_lora

            merge_lora(task.backbone)
        if cfg.task.type == "embedding":
            _write_embedder(task, cfg, tokenizer, tmp, dtype)
        else:
            _write_reranker(task, cfg, tokenizer, tmp, dtype)
    _write_task_file(cfg, tmp)
    try:
        report = check_export(tmp, cfg, reference)
    except ExportParityError as err:
        raise ExportParityError(f"{err} (files kept in {_set_aside(tmp, output_dir, err)})") from None
    _write_json(tmp, PARITY_FILE, report)
    print(f"[ember] export parity: {len(report['comparisons'])} comparisons with the engine passed "
          f"({report['seconds']:.1f} s)", flush=True)
    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)
    shutil.rmtree(output_dir.rstrip("/") + UNSERVABLE_SUFFIX, ignore_errors=True)  # an earlier failure's
    return output_dir


def _set_aside(tmp: str, output_dir: str, err: Exception) -> str:
    """An export that failed its parity check moves to <output>.unservable with the reason beside it:
    kept for inspection, under a name no deployment of <output> picks up."""
    failed = output_dir.rstrip("/") + UNSERVABLE_SUFFIX
    with open(os.path.join(tmp, FAILED_FILE), "w") as f:
        f.write(f"{err}\n")
    shutil.rmtree(failed, ignore_errors=True)
    os.replace(tmp, failed)
    return failed


def _write_task_file(cfg: RunConfig, folder: str) -> None:
    info = {
        "task": dataclasses.asdict(cfg.task),
        "data": {k: getattr(cfg.data, k) for k in ("query_max_len", "doc_max_len", "max_len")},
        "causal": cfg.model.causal,
    }
    with open(os.path.join(folder, TASK_FILE), "w") as f:
        json.dump(info, f, indent=1)


def _hf_config(backbone, architecture: str, tokenizer, dtype: torch.dtype, **extra) -> dict:
    config = backbone.args.to_hf_config()
    config["architectures"] = [architecture]
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        value = getattr(tokenizer, key, None)
        if value is not None:
            config[key] = value
    if config.get("pad_token_id") is None and tokenizer.eos_token_id is not None:
        # *ForSequenceClassification finds each row's last token through pad_token_id.
        config["pad_token_id"] = tokenizer.eos_token_id
    config.update(extra)
    return config


def _save_weights(state: dict[str, torch.Tensor], folder: str, dtype: torch.dtype) -> None:
    from engine.model.hf_io import write_safetensors

    write_safetensors({k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in state.items()}, folder)


def _write_json(folder: str, name: str, value) -> None:
    os.makedirs(os.path.dirname(os.path.join(folder, name)) or folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as f:
        json.dump(value, f, indent=1)


def _write_embedder(task, cfg: RunConfig, tokenizer, folder: str, dtype: torch.dtype) -> None:
    backbone = task.backbone
    family = _FAMILY_CLASS[backbone.args.family]
    state = {k: v for k, v in backbone.model.state_dict().items()}  # base model: no "model." prefix
    _save_weights(state, folder, dtype)
    extra = {}
    if cfg.task.matryoshka_dims:
        # vLLM reads these from config.json and then takes `dimensions` per request (truncated, renormalised).
        extra = {"is_matryoshka": True,
                 "matryoshka_dimensions": [*cfg.task.matryoshka_dims, backbone.args.hidden_size]}
    _write_json(folder, "config.json", _hf_config(backbone, f"{family}Model", tokenizer, dtype, **extra))
    _save_tokenizer(tokenizer, folder, append_eos=cfg.task.append_eos)
    _write_sentence_transformers_files(cfg, backbone.args.hidden_size, folder)


def _write_reranker(task, cfg: RunConfig, tokenizer, folder: str, dtype: torch.dtype) -> None:
    backbone = task.backbone
    family = _FAMILY_CLASS[backbone.args.family]
    state = dict(backbone.state_dict())
    if cfg.task.head == "yes_no":
        if backbone.args.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        config = _hf_config(backbone, f"{family}ForCausalLM", tokenizer, dtype)
    else:
        state.pop("lm_head.weight", None)
        state["score.weight"] = task.score.weight
        config = _hf_config(backbone, f"{family}ForSequenceClassification", tokenizer, dtype, num_labels=1)
    _save_weights(state, folder, dtype)
    _write_json(folder, "config.json", config)
    _save_tokenizer(tokenizer, folder, append_eos=False)


def _write_adapter(task, cfg: RunConfig, tokenizer, folder: str) -> None:
    from engine.model.lora import save_peft_adapter

    task_type = "FEATURE_EXTRACTION" if cfg.task.type == "embedding" else "CAUSAL_LM"
    save_peft_adapter(task.backbone, folder, base_model_path=cfg.model.path, task_type=task_type)
    if cfg.task.type == "reranker" and cfg.task.head == "linear":
        save_file({"score.weight": task.score.weight.detach().contiguous()}, os.path.join(folder, "score_head.safetensors"))
    _save_tokenizer(tokenizer, folder, append_eos=cfg.task.type == "embedding" and cfg.task.append_eos)


def _save_tokenizer(tokenizer, folder: str, append_eos: bool) -> None:
    """Save the tokenizer; for embedders, make it append EOS itself (and add nothing else), which is
    exactly how the engine tokenizes, so sentence-transformers sees the same token ids."""
    tokenizer.save_pretrained(folder)
    if not append_eos:
        return
    path = os.path.join(folder, "tokenizer.json")
    with open(path) as f:
        spec = json.load(f)
    from engine.data.tokenize import implicit_bos

    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    special = {eos: {"id": eos, "ids": [eos_id], "tokens": [eos]}}
    # Keep a BOS where the tokenizer adds one by default (Llama 3, Mistral): so does TextEncoder.
    lead = []
    if implicit_bos(tokenizer):
        bos = tokenizer.bos_token
        special[bos] = {"id": bos, "ids": [tokenizer.bos_token_id], "tokens": [bos]}
        lead = [{"SpecialToken": {"id": bos, "type_id": 0}}]
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": lead + [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": eos, "type_id": 0}}],
        "pair": lead + [
            {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": eos, "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": eos, "type_id": 1}},
        ],
        "special_tokens": special,
    }
    with open(path, "w") as f:
        json.dump(spec, f, ensure_ascii=False)
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            tok_config = json.load(f)
        # Right padding: causal models keep real tokens' states unchanged; HF positions are arange.
        tok_config.update({"add_bos_token": False, "add_eos_token": False, "padding_side": "right"})
        if tok_config.get("pad_token") is None:
            tok_config["pad_token"] = eos
        with open(config_path, "w") as f:
            json.dump(tok_config, f, indent=1)


def query_prompt(task_cfg) -> str:
    """The text before the query in the query template."""
    if not task_cfg.query_instruction:
        return ""
    return task_cfg.query_template.partition("{query}")[0].replace("{instruction}", task_cfg.query_instruction)


def _write_sentence_transformers_files(cfg: RunConfig, hidden: int, folder: str) -> None:
    t = cfg.task
    check_prefix_templates(t)
    doc_prefix = t.doc_template.partition("{document}")[0]
    if cfg.data.query_max_len != cfg.data.doc_max_len:
        # sentence-transformers truncates every text at one length; the engine cuts queries and
        # documents at their own. Texts within both limits embed identically.
        print(f"[ember] note: sentence-transformers truncates queries and documents alike at "
              f"{max(cfg.data.query_max_len, cfg.data.doc_max_len)} tokens; the engine cuts queries at "
              f"data.query_max_len={cfg.data.query_max_len}", flush=True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if t.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(folder, "2_Normalize"), exist_ok=True)
    _write_json(folder, "modules.json", modules)
    _write_json(folder, "sentence_bert_config.json",
                {"max_seq_length": max(cfg.data.query_max_len, cfg.data.doc_max_len), "do_lower_case": False})
    _write_json(folder, "1_Pooling/config.json", {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": t.pooling == "cls",
        "pooling_mode_mean_tokens": t.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": t.pooling == "last",
        "include_prompt": True,
    })
    st_config = {
        "prompts": {"query": query_prompt(t), "document": doc_prefix},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if t.normalize else "dot",
    }
    if t.matryoshka_dims:
        # sentence-transformers ignores this key; it tells users which truncate_dim values were trained.
        st_config["matryoshka_dims"] = list(t.matryoshka_dims)
    _write_json(folder, "config_sentence_transformers.json", st_config)


def settings_from_export(cfg, argv: list[str], path: str):
    """(task, data, causal) for the model folder at `path`, copies: an export's ember_task.json wins
    over the composed config `cfg` except where the command line `argv` names a key (or the task
    group); a plain Hugging Face folder takes the composed config as it is. The one rule that
    launch/evaluate.py, launch/mine.py and launch/score.py apply."""
    task, data, causal = copy.deepcopy(cfg.task), copy.deepcopy(cfg.data), cfg.model.causal
    info_path = os.path.join(path, TASK_FILE)
    if not os.path.isfile(info_path):
        return task, data, causal
    with open(info_path) as f:
        info = json.load(f)
    named = {a.split("=", 1)[0].lstrip("+") for a in argv}
    if "task" not in named:
        for key, value in info["task"].items():
            if f"task.{key}" not in named:
                setattr(task, key, value)
    for key, value in info["data"].items():
        if f"data.{key}" not in named:
            setattr(data, key, value)
    if "model.causal" not in named:
        causal = info.get("causal", True)
    return task, data, causal
