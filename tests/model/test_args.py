"""ModelArgs: config.json mapping both ways, family rules, and the analytic parameter count."""
from __future__ import annotations

import logging

import pytest
import torch

from engine.config import ModelConfig
from engine.model.args import ModelArgs, ModelArgsError
from engine.model.transformer import Transformer
from hf_tiny import VARIANTS, hf_config

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_from_hf_config_reads_what_transformers_writes(variant):
    config = hf_config(variant)
    args = ModelArgs.from_hf_config(config.to_dict())
    assert args.family == config.model_type
    assert (args.vocab_size, args.hidden_size, args.intermediate_size) == (300, 64, 128)
    assert (args.num_layers, args.num_heads, args.num_kv_heads) == (2, 4, 2)
    assert args.head_dim == (getattr(config, "head_dim", None) or 64 // 4)
    assert args.rope_theta == config.rope_parameters["rope_theta"]
    assert args.tie_word_embeddings == config.tie_word_embeddings
    assert args.attention_bias == (variant == "qwen2")
    assert args.qk_norm == (variant == "qwen3")
    if variant == "llama3":
        assert args.rope_scaling["rope_type"] == "llama3"
        assert args.rope_scaling["original_max_position_embeddings"] == 16
    else:
        assert args.rope_scaling is None


def test_legacy_rope_keys_and_defaults_are_read():
    # transformers-4 layout: rope_theta at the top, rope_scaling with "type"; no head_dim, no kv heads.
    d = {"model_type": "llama", "vocab_size": 10, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 1, "num_attention_heads": 4, "rope_theta": 500000.0,
         "rope_scaling": {"type": "linear", "factor": 2.0}, "eos_token_id": [7, 8]}
    args = ModelArgs.from_hf_config(d, causal=False)
    assert args.rope_theta == 500000.0 and args.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert args.head_dim == 8 and args.num_kv_heads == 4 and not args.causal
    assert args.token_ids == {"eos_token_id": [7, 8]}
    # llama3 without original_max_position_embeddings takes max_position_embeddings, as transformers does.
    d["rope_scaling"] = {k: v for k, v in LLAMA3_SCALING.items() if k != "original_max_position_embeddings"}
    d["max_position_embeddings"] = 4096
    assert ModelArgs.from_hf_config(d).rope_scaling["original_max_position_embeddings"] == 4096


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_to_hf_config_loads_as_the_right_class_and_round_trips(variant):
    from transformers import AutoConfig, AutoModelForCausalLM

    args = ModelArgs.from_hf_config(hf_config(variant).to_dict())
    d = args.to_hf_config(torch.bfloat16)
    assert d["torch_dtype"] == "bfloat16"
    config = AutoConfig.for_model(**d)
    assert type(AutoModelForCausalLM.from_config(config)).__name__ == d["architectures"][0]
    assert ModelArgs.from_hf_config(config.to_dict()) == args
    assert ModelArgs.from_hf_config(d) == args


def test_unknown_model_type_names_it_and_the_supported_ones():
    with pytest.raises(ModelArgsError, match="model_type='gpt2'.*llama, qwen2, qwen3, mistral"):
        ModelArgs.from_hf_config({"model_type": "gpt2", "vocab_size": 10})


def test_unsupported_rope_type_is_a_clear_error():
    d = hf_config("mistral").to_dict()
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    with pytest.raises(ModelArgsError, match="rope_type='yarn' is not supported"):
        ModelArgs.from_hf_config(d)


def test_active_sliding_window_is_warned_about(caplog):
    d = hf_config("mistral").to_dict()
    d["sliding_window"] = 64  # < max_position_embeddings = 256
    with caplog.at_level(logging.WARNING, logger="engine.model.args"):
        ModelArgs.from_hf_config(d)
    assert "full attention" in caplog.text
    caplog.clear()
    d = hf_config("qwen2").to_dict()
    d.update(sliding_window=64, use_sliding_window=False)  # present but switched off: silent
    with caplog.at_level(logging.WARNING, logger="engine.model.args"):
        ModelArgs.from_hf_config(d)
    assert caplog.text == ""


def test_from_model_config_lets_the_family_decide_bias_and_qk_norm():
    qwen2 = ModelArgs.from_model_config(ModelConfig(family="qwen2"))
    qwen3 = ModelArgs.from_model_config(ModelConfig(family="qwen3", head_dim=24, causal=False))
    llama = ModelArgs.from_model_config(ModelConfig(family="llama", rope_scaling=LLAMA3_SCALING))
    assert qwen2.attention_bias and not qwen2.o_proj_bias and not qwen2.qk_norm
    assert qwen3.qk_norm and not qwen3.attention_bias and qwen3.head_dim == 24 and not qwen3.causal
    assert llama.head_dim == 16 and llama.rope_scaling["rope_type"] == "llama3"


def test_combinations_a_family_cannot_save_are_refused():
    base = dict(vocab_size=10, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4)
    with pytest.raises(ModelArgsError, match="qwen2 has q/k/v bias"):
        ModelArgs(family="qwen2", attention_bias=False, **base)
    with pytest.raises(ModelArgsError, match="qk_norm"):
        ModelArgs(family="llama", qk_norm=True, **base)
    with pytest.raises(ModelArgsError, match="not divisible"):
        ModelArgs(family="llama", num_kv_heads=3, **base)


PARAM_COUNT_CASES = [
    dict(family="llama", tie_word_embeddings=False),
    dict(family="llama", attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    dict(family="qwen2", tie_word_embeddings=True),
    dict(family="qwen3", head_dim=24, attention_bias=True),
    dict(family="mistral", num_kv_heads=1),
]


@pytest.mark.parametrize("case", PARAM_COUNT_CASES)
def test_num_parameters_equals_the_built_module(case):
    case = {"num_kv_heads": 2, **case}
    args = ModelArgs(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, **case)
    with torch.device("meta"):
        model = Transformer(args)
    assert args.num_parameters() == sum(p.numel() for p in model.parameters())


def test_llama3_70b_builds_on_meta_without_memory():
    args = ModelArgs(family="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                     num_heads=64, num_kv_heads=8, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING,
                     rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False)
    with torch.device("meta"):
        model = Transformer(args)
    params = list(model.parameters())
    assert all(p.is_meta for p in params)  # 282 GB of fp32 would not fit here anyway
    total = sum(p.numel() for p in params)
    assert total == args.num_parameters()
    assert abs(total - 70.6e9) / 70.6e9 < 0.005  # Meta's model card: 70.6B
