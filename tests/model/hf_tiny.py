"""Tiny random Hugging Face models of each family, saved as HF folders, for parity tests.

The models are built with transformers' own config classes and modules (not with our
ModelArgs), every parameter is randomised, norms and biases included (HF's init would
leave norms at 1 and biases at 0, which hides mistakes in loading them), and the folder
is written by transformers' save_pretrained, so our reader is what is under test.
"""
from __future__ import annotations

import torch

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)

# family variant -> (model_type, extra config); each exercises what distinguishes the family
VARIANTS = {
    # Llama 3.1 rope scaling with a short original context, so the scaled band reaches our positions.
    "llama3": ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 16},
                             tie_word_embeddings=False)),
    "qwen2": ("qwen2", dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                            tie_word_embeddings=True)),  # q/k/v bias, tied head
    "qwen3": ("qwen3", dict(head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                            tie_word_embeddings=True)),  # q/k norm, head_dim != hidden / heads
    "mistral": ("mistral", dict(sliding_window=None, tie_word_embeddings=False,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}


def hf_config(variant: str):
    from transformers import AutoConfig

    model_type, extra = VARIANTS[variant]
    return AutoConfig.for_model(model_type, **TINY, **extra)


def random_hf_model(variant: str, seed: int = 0, attn_implementation: str = "eager"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(variant), attn_implementation=attn_implementation)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.08)
    return model.eval()


def random_token_lists(lengths: list[int], vocab: int = 300, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
