"""Our Transformer against transformers' own implementation, family by family.

Weights travel HF -> safetensors -> load_pretrained (our reader) and back through
save_pretrained (our writer) -> AutoModelForCausalLM.from_pretrained, so the I/O is under
test too. fp32 throughout; tolerance 1e-5 on last hidden states of order one (tiny
random models; observed differences are ~1e-6, from a different GEMM row count).

Bidirectional reference in transformers 5: the models have no switch in their forward,
but two ways work and agree (checked on 5.23): (a) `attn_implementation="eager"` with a
ready 4D float mask (B, 1, S, S) of zeros (and -inf at padded keys): masking_utils
returns a 4D mask as it is and eager attention only adds it; (b) `config.is_causal =
False`, which masking_utils turns into a bidirectional mask (Qwen3-Embedding-style
encoders use this). The reference below is (a); exported bidirectional models carry (b).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from engine.data.batch import PackedSequences
from engine.model.hf_io import load_pretrained, save_pretrained
from hf_tiny import VARIANTS, random_token_lists

ATOL = 1e-5
FAMILIES = list(VARIANTS)


def hf_hidden(hf_model, ids: list[int], four_d_mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        out = hf_model.model(torch.tensor([ids]), attention_mask=four_d_mask)
    return out.last_hidden_state[0]  # (L, hidden)


def bidirectional_mask(length: int) -> torch.Tensor:
    return torch.zeros(1, 1, length, length)  # nothing masked: every token sees every token


@pytest.mark.parametrize("variant", FAMILIES)
def test_padded_batch_matches_transformers(variant, hf_folders):
    hf, folder = hf_folders(variant)
    ours = load_pretrained(folder)
    lengths = [9, 4, 12]
    seqs = random_token_lists(lengths)
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, seq in enumerate(seqs):  # right padding
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    with torch.no_grad():
        expected = hf.model(ids, attention_mask=mask).last_hidden_state
        got = ours(ids, attention_mask=mask)
    assert got.shape == expected.shape
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
    assert torch.all(got[~real] == 0)


@pytest.mark.parametrize("variant", FAMILIES)
def test_packed_sequences_match_transformers_run_alone(variant, hf_folders):
    hf, folder = hf_folders(variant)
    ours = load_pretrained(folder)
    seqs = random_token_lists([7, 1, 15, 4], seed=1)
    packed = PackedSequences.from_token_lists(seqs)
    with torch.no_grad():
        hidden = ours(packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen)
    for i, seq in enumerate(seqs):
        start, end = int(packed.cu_seqlens[i]), int(packed.cu_seqlens[i + 1])
        torch.testing.assert_close(hidden[start:end], hf_hidden(hf, seq), atol=ATOL, rtol=0, msg=f"sequence {i}")


@pytest.mark.parametrize("variant", FAMILIES)
def test_bidirectional_matches_transformers_with_a_full_mask(variant, hf_folders):
    hf, folder = hf_folders(variant)
    ours = load_pretrained(folder, causal=False)
    seqs = random_token_lists([6, 11, 3], seed=2)
    packed = PackedSequences.from_token_lists(seqs)
    with torch.no_grad():
        hidden = ours(packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen)
    for i, seq in enumerate(seqs):
        start, end = int(packed.cu_seqlens[i]), int(packed.cu_seqlens[i + 1])
        expected = hf_hidden(hf, seq, bidirectional_mask(len(seq)))
        torch.testing.assert_close(hidden[start:end], expected, atol=ATOL, rtol=0, msg=f"sequence {i}")
    # Sanity: the first token really sees later ones, i.e. the test can tell the two modes apart.
    causal_first = hf_hidden(hf, seqs[1])[0]
    assert (hidden[int(packed.cu_seqlens[1])] - causal_first).abs().max() > 1e-3


def test_left_padded_bidirectional_batch_matches_transformers(hf_folders):
    hf, folder = hf_folders("qwen3")
    ours = load_pretrained(folder, causal=False)
    seqs = random_token_lists([5, 8], seed=3)
    width = 8
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, seq in enumerate(seqs):  # left padding
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    key_mask = torch.zeros(2, 1, width, width).masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    with torch.no_grad():
        expected = hf.model(ids, attention_mask=key_mask, position_ids=positions).last_hidden_state
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", FAMILIES)
def test_our_export_loads_in_transformers_with_identical_logits(variant, hf_folders, tmp_path):
    from transformers import AutoModelForCausalLM

    _, folder = hf_folders(variant)
    ours = load_pretrained(folder)
    save_pretrained(ours, str(tmp_path))
    with open(os.path.join(tmp_path, "config.json")) as f:
        config = json.load(f)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert type(reloaded).__name__ == config["architectures"][0]
    assert reloaded.config.model_type == VARIANTS[variant][0]
    seq = random_token_lists([10], seed=4)[0]
    with torch.no_grad():
        expected = reloaded(torch.tensor([seq])).logits[0]
        got = ours.logits(ours(torch.tensor(seq)))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_bidirectional_export_is_bidirectional_in_transformers(hf_folders, tmp_path):
    from transformers import AutoModelForCausalLM

    _, folder = hf_folders("llama3")
    ours = load_pretrained(folder, causal=False)
    save_pretrained(ours, str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()  # default (sdpa) attention
    seq = random_token_lists([9], seed=5)[0]
    with torch.no_grad():
        expected = reloaded.model(torch.tensor([seq])).last_hidden_state[0]
        got = ours(torch.tensor(seq))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
