"""LoRA: what trains, merging, and PEFT adapters that peft itself loads with the same outputs."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from engine.config import LoRAConfig
from engine.model.args import ModelArgs
from engine.model.hf_io import save_pretrained
from engine.model.lora import LoRAError, LoRALinear, apply_lora, lora_state_dict, merge_lora, save_peft_adapter
from engine.model.transformer import Transformer
from hf_tiny import random_token_lists

TARGETS = LoRAConfig().targets  # all seven projections


def tiny_llama(seed=0) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(family="llama", vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2,
                     num_heads=4, num_kv_heads=2, tie_word_embeddings=False)
    return Transformer(args).eval()


def randomise_lora_b(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.copy_(0.05 * torch.randn(module.lora_B.shape, generator=gen))


def test_only_lora_parameters_train_and_base_weights_are_shared():
    model = tiny_llama()
    q_weight = model.model.layers[0].self_attn.q_proj.weight
    base_keys = set(model.state_dict())
    count = apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=TARGETS)
    assert count == 7 * 2
    assert model.model.layers[0].self_attn.q_proj.weight is q_weight  # wrapped, not copied
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == 2 * count
    assert set(lora_state_dict(model)) == trainable
    assert set(model.state_dict()) == base_keys | trainable  # base names unchanged
    assert not isinstance(model.lm_head, LoRALinear)


def test_fresh_adapters_change_nothing_and_dropout_only_touches_the_lora_path():
    model = tiny_llama()
    ids = torch.tensor(random_token_lists([8])[0])
    with torch.no_grad():
        before = model(ids)
        apply_lora(model, rank=4, alpha=8, dropout=0.5, targets=["q_proj", "v_proj"])
        model.train()  # dropout active, but B = 0 so the output is the base output
        after = model(ids)
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_merge_gives_the_unmerged_outputs():
    model = tiny_llama()
    apply_lora(model, rank=4, alpha=16, dropout=0.0, targets=TARGETS)
    randomise_lora_b(model)
    ids = torch.tensor(random_token_lists([11])[0])
    with torch.no_grad():
        unmerged = model.logits(model(ids))
        assert merge_lora(model) == 14
        merged = model.logits(model(ids))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(m.self_attn.q_proj) is nn.Linear for m in model.model.layers)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    # The merge did change the weights (B is not zero), so the comparison above means something.
    with torch.no_grad():
        assert (merged - tiny_llama().logits(tiny_llama()(ids))).abs().max() > 1e-3


def test_lora_forward_is_the_formula():
    torch.manual_seed(0)
    linear = nn.Linear(12, 7)
    lora = LoRALinear.from_linear(linear, rank=3, alpha=6, dropout=0.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(5, 12)
    expected = x @ linear.weight.T + linear.bias + (x @ lora.lora_A.T @ lora.lora_B.T) * (6 / 3)
    torch.testing.assert_close(lora(x), expected, atol=1e-5, rtol=0)


def test_no_matching_target_is_an_error():
    with pytest.raises(LoRAError, match="no nn.Linear matches"):
        apply_lora(tiny_llama(), rank=4, alpha=8, dropout=0.0, targets=["qproj"])


@pytest.fixture
def base_and_adapted(tmp_path):
    """A saved base folder, and our model with LoRA on it (non-zero B)."""
    model = tiny_llama()
    base = str(tmp_path / "base")
    save_pretrained(model, base)
    apply_lora(model, rank=4, alpha=8, dropout=0.1, targets=TARGETS)
    randomise_lora_b(model)
    return base, model.eval()


def test_peft_loads_our_causal_lm_adapter_with_the_same_outputs(base_and_adapted, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, model = base_and_adapted
    adapter = str(tmp_path / "adapter")
    save_peft_adapter(model, adapter, base_model_path=base, task_type="CAUSAL_LM")
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["task_type"] == "CAUSAL_LM"
    from safetensors import safe_open

    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in f.keys()
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    ids = random_token_lists([9])[0]
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
        got = model.logits(model(torch.tensor(ids)))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_peft_loads_our_feature_extraction_adapter_on_the_bare_backbone(base_and_adapted, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    base, model = base_and_adapted
    adapter = str(tmp_path / "adapter")
    save_peft_adapter(model, adapter, base_model_path=base, task_type="FEATURE_EXTRACTION")
    hf = PeftModel.from_pretrained(AutoModel.from_pretrained(base), adapter).eval()
    ids = random_token_lists([9])[0]
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([ids])).last_hidden_state[0]
        got = model(torch.tensor(ids))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_save_pretrained_folds_unmerged_lora_into_the_weights(base_and_adapted, tmp_path):
    from transformers import AutoModelForCausalLM

    _, model = base_and_adapted
    folder = str(tmp_path / "merged")
    save_pretrained(model, folder)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = random_token_lists([6])[0]
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model(torch.tensor(ids))), hf(torch.tensor([ids])).logits[0],
                                   atol=1e-5, rtol=0)
