"""Real weights: SmolLM2-135M-Instruct (converted from the bundled GGUF) against transformers.

The conversion runs once into the cache (.cache/ember or $EMBER_CACHE, ~25 s) and the
demo reuses it. Three comparisons, each sequence against LlamaForCausalLM run alone:
- fp32, one sequence at a time: bit-for-bit the same operations as transformers' SDPA path;
- fp32, packed: the GEMMs then see another number of rows, and MKL rounds float32 sums
  differently for different row counts. Over 30 layers, with hidden states up to ~45 in
  magnitude, that noise reaches ~2e-5 absolute (5e-7 relative), so the bound here is
  relative: 1e-5 times the largest magnitude; a real mistake is of order one;
- float64, packed: rounding no longer hides anything, so the bound is 1e-10 absolute.
"""
from __future__ import annotations

import pytest
import torch

from engine.data.batch import PackedSequences
from engine.model.gguf import ensure_smollm2
from engine.model.hf_io import load_pretrained

TEXTS = ["What is the capital of France?", "Concrete needs about 28 days to cure.", "Hi", "How long is a permit valid?"]


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    seqs = [tokenizer(t)["input_ids"] for t in TEXTS]
    return folder, hf, seqs


def packed_hidden(model, seqs):
    packed = PackedSequences.from_token_lists(seqs)
    with torch.no_grad():
        hidden = model(packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen)
    bounds = packed.cu_seqlens.tolist()
    return [hidden[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def test_smollm2_hidden_states_match_transformers(smollm2):
    folder, hf, seqs = smollm2
    ours = load_pretrained(folder)
    assert ours.args.family == "llama" and ours.args.num_layers == 30 and ours.args.num_kv_heads == 3
    with torch.no_grad():
        expected = [hf.model(torch.tensor([s])).last_hidden_state[0] for s in seqs]
        alone = [ours(torch.tensor(s)) for s in seqs]
    for got, ref in zip(alone, expected):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    for got, ref in zip(packed_hidden(ours, seqs), expected):
        scale = ref.abs().max().item()
        assert (got - ref).abs().max().item() <= 1e-5 * scale


def test_smollm2_packed_float64_matches_transformers_exactly(smollm2):
    folder, hf, seqs = smollm2
    seqs = seqs[:3]  # float64 is slow on CPU; three sequences (one of a single token) are enough
    ours = load_pretrained(folder, dtype=torch.float64)
    hf64 = hf.to(torch.float64)
    try:
        with torch.no_grad():
            expected = [hf64.model(torch.tensor([s])).last_hidden_state[0] for s in seqs]
        for got, ref in zip(packed_hidden(ours, seqs), expected):
            torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
    finally:
        hf.to(torch.float32)
