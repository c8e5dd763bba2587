"""Hugging Face folder I/O: sharding, key layouts, dtypes, and the errors users see."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.model.hf_io import CheckpointError, load_pretrained, read_safetensors, save_pretrained
from hf_tiny import random_token_lists


def test_sharded_save_has_an_index_and_loads_in_both_directions(hf_folders, tmp_path):
    from transformers import AutoModelForCausalLM

    _, folder = hf_folders("qwen2")
    ours = load_pretrained(folder)
    save_pretrained(ours, str(tmp_path), max_shard_bytes=40_000)
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and not (tmp_path / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == 4 * sum(p.numel() for p in ours.parameters())
    assert "lm_head.weight" not in index["weight_map"]  # qwen2 variant is tied
    ids = random_token_lists([8])[0]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    again = load_pretrained(str(tmp_path))
    with torch.no_grad():
        expected = ours.logits(ours(torch.tensor(ids)))
        torch.testing.assert_close(hf(torch.tensor([ids])).logits[0], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(again.logits(again(torch.tensor(ids))), expected, atol=0, rtol=0)
    # Saving again unsharded replaces the shards instead of leaving them beside the new file.
    save_pretrained(ours, str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def test_load_casts_to_the_requested_dtype(hf_folders):
    _, folder = hf_folders("mistral")
    model = load_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert model(torch.tensor(random_token_lists([4])[0])).dtype == torch.bfloat16


def test_bare_backbone_checkpoints_load(hf_folders, tmp_path, caplog):
    # Embedding models are often saved from AutoModel: keys without "model.", no lm_head.
    hf, folder = hf_folders("llama3")
    hf.model.save_pretrained(str(tmp_path))
    assert "embed_tokens.weight" in load_file(str(tmp_path / "model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="engine.model.hf_io"):
        ours = load_pretrained(str(tmp_path))
    assert "no lm_head.weight" in caplog.text
    ids = random_token_lists([5])[0]
    with torch.no_grad():
        torch.testing.assert_close(ours(torch.tensor(ids)), hf.model(torch.tensor([ids])).last_hidden_state[0],
                                   atol=1e-5, rtol=0)


def test_missing_weights_name_the_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                                                      "intermediate_size": 16, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2}))
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=f"{tmp_path}: no model.safetensors.*never loaded"):
        load_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(str(tmp_path / "nowhere"))


def test_key_mismatch_lists_the_keys(hf_folders, tmp_path):
    _, folder = hf_folders("qwen3")
    for name in ("config.json",):
        (tmp_path / name).write_text(open(os.path.join(folder, name)).read())
    state = read_safetensors(folder)
    state.pop("model.layers.1.self_attn.q_norm.weight")
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing model\.layers\.1\.self_attn\.q_norm\.weight; "
                                              r"unexpected model\.layers\.0\.self_attn\.extra\.weight"):
        load_pretrained(str(tmp_path))
