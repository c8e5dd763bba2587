"""bench/peers.py on a tiny random Llama: all five systems (Ember, Ember with GradCache,
sentence-transformers MNRL and cached MNRL, transformers + peft) compute the same loss on the same
batch and LoRA weights, and the table has a row for each; a recipe the peers do not share (Ember
with last-token pooling, the peers with mean) fails the equal-loss check. Every system runs in
this interpreter (--in-process): a fresh one per system costs seconds of imports each."""
from __future__ import annotations

import json
import os
import runpy
import sys

import pytest

from tests.conftest import REPO, synthetic_examples, write_jsonl

SYSTEMS = ["ember", "ember_grad_cache", "st_mnrl", "st_cached_mnrl", "hf_peft"]


@pytest.fixture
def tiny_assets(tmp_path):
    """A random Llama with the byte-level tokenizer, saved as a Hugging Face folder, and FAQ-style data."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.data.byte_tokenizer import byte_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.08, tie_word_embeddings=True)
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(str(model_dir))
    byte_tokenizer().save_pretrained(str(model_dir))
    data = write_jsonl(tmp_path / "faq.jsonl", synthetic_examples(12, seed=0))
    return str(model_dir), data


def run_peers(capsys, monkeypatch, tmp_path, model, data, *args):
    """bench/peers.py in this process; (exit code or message, stdout)."""
    path = os.path.join(REPO, "bench", "peers.py")
    monkeypatch.setattr(sys, "argv", [path, "--model", model, "--data", data, "--work", str(tmp_path / "work"),
                                      "--override", "task.query_instruction=find the item", "--mixes", "faq",
                                      "--batches-faq", "3", "--steps", "1", "--in-process", *args])
    capsys.readouterr()
    try:
        runpy.run_path(path, run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    return code, capsys.readouterr().out


def test_every_system_computes_ember_loss_and_gets_a_row(tmp_path, capsys, monkeypatch, tiny_assets):
    out_file = tmp_path / "peers.json"
    code, out = run_peers(capsys, monkeypatch, tmp_path, *tiny_assets, "--out", str(out_file))
    assert code == 0, out
    results = {r["system"]: r for r in json.loads(out_file.read_text())["results"]}
    assert set(results) == set(SYSTEMS), out
    for r in results.values():
        assert abs(r["loss"] - results["ember"]["loss"]) <= 1e-4, out
        assert r["seconds"] > 0 and r["real_tokens"] == results["ember"]["real_tokens"]
        # Packed Ember computes on real tokens only; the padded peers on at least as many.
        assert r["padded_tokens"] >= r["real_tokens"]
    assert results["ember"]["padded_tokens"] == results["ember"]["real_tokens"]
    for system in SYSTEMS:
        assert f"| faq | 3 | {system} |" in out, out


def test_a_recipe_the_peers_do_not_share_fails_the_check(tmp_path, capsys, monkeypatch, tiny_assets):
    code, out = run_peers(capsys, monkeypatch, tmp_path, *tiny_assets, "--systems", "ember", "hf_peft",
                          "--override", "task.pooling=last")
    assert isinstance(code, str) and "equal-loss check failed" in code, (code, out)
    assert "hf_peft" in code and "| faq |" not in out  # no timing table after a failed check


def test_rounds_run_every_system_again_and_keep_its_fastest(tmp_path, capsys, monkeypatch, tiny_assets):
    out_file = tmp_path / "peers.json"
    code, out = run_peers(capsys, monkeypatch, tmp_path, *tiny_assets, "--systems", "ember", "hf_peft",
                          "--rounds", "2", "--out", str(out_file))
    assert code == 0, out
    results = json.loads(out_file.read_text())["results"]
    assert [r["system"] for r in results] == ["ember", "hf_peft"]  # one row per system, not per round
    for r in results:
        assert len(r["seconds_per_round"]) == 2 and r["seconds"] == min(r["seconds_per_round"])
    assert "ember (round 2):" in out and "hf_peft (round 2):" in out
