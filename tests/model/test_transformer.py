"""The Transformer module itself: input forms, tied head, meta build, LM-head rows, checkpointing."""
from __future__ import annotations

import pytest
import torch

from engine.data.batch import PackedSequences
from engine.model.args import ModelArgs
from engine.model.transformer import InputError, Transformer, positions_from_cu_seqlens
from hf_tiny import random_token_lists


def tiny_args(**overrides) -> ModelArgs:
    base = dict(family="qwen3", vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=24, tie_word_embeddings=True)
    return ModelArgs(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_args(**overrides))
    with torch.no_grad():  # norms away from 1 so that every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def test_left_right_padding_packed_and_alone_agree():
    model = tiny_model()
    seqs = random_token_lists([6, 2, 9])
    packed = PackedSequences.from_token_lists(seqs)
    with torch.no_grad():
        alone = [model(torch.tensor(s)) for s in seqs]
        flat = model(packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen)
        flat_derived = model(packed.input_ids, cu_seqlens=packed.cu_seqlens)  # positions from cu_seqlens
        for left in (False, True):
            ids = torch.zeros(3, 9, dtype=torch.long)
            mask = torch.zeros(3, 9, dtype=torch.long)
            for row, s in enumerate(seqs):
                cols = slice(9 - len(s), 9) if left else slice(0, len(s))
                ids[row, cols], mask[row, cols] = torch.tensor(s), 1
            padded = model(ids, attention_mask=mask)
            for row, s in enumerate(seqs):
                cols = slice(9 - len(s), 9) if left else slice(0, len(s))
                torch.testing.assert_close(padded[row, cols], alone[row], atol=1e-5, rtol=0)
            assert torch.all(padded[~mask.bool()] == 0)
    torch.testing.assert_close(flat, flat_derived, atol=0, rtol=0)
    for i, ref in enumerate(alone):
        a, b = int(packed.cu_seqlens[i]), int(packed.cu_seqlens[i + 1])
        torch.testing.assert_close(flat[a:b], ref, atol=1e-5, rtol=0)


def test_unmasked_2d_input_is_a_batch_of_whole_sequences():
    model = tiny_model()
    ids = torch.tensor(random_token_lists([5, 5]))
    with torch.no_grad():
        batch = model(ids)
        rows = torch.stack([model(row) for row in ids])
    assert batch.shape == (2, 5, 64)
    torch.testing.assert_close(batch, rows, atol=1e-5, rtol=0)


def test_inputs_that_describe_no_batch_are_refused():
    model = tiny_model()
    with pytest.raises(InputError, match="not both"):
        model(torch.zeros(2, 3, dtype=torch.long), cu_seqlens=torch.tensor([0, 6], dtype=torch.int32),
              attention_mask=torch.ones(2, 3))
    with pytest.raises(InputError, match="same"):
        model(torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4))


@pytest.mark.parametrize("mode", ["last", "mean", "cls"])
def test_pooled_forward_is_each_sequences_pooled_hidden_state(mode):
    model = tiny_model()
    seqs = random_token_lists([6, 2, 9])
    packed = PackedSequences.from_token_lists(seqs)
    with torch.no_grad():
        pooled = model(packed.input_ids, cu_seqlens=packed.cu_seqlens, pooling=mode)
        alone = [model(torch.tensor(s)) for s in seqs]
    want = torch.stack([{"last": h[-1], "cls": h[0], "mean": h.mean(0)}[mode] for h in alone])
    torch.testing.assert_close(pooled, want, atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="pooling= needs packed input"):
        model(torch.zeros(2, 3, dtype=torch.long), pooling=mode)


def test_positions_restart_at_every_sequence():
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    assert positions_from_cu_seqlens(cu).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


def test_tied_head_is_the_embedding_and_stays_out_of_the_state_dict():
    model = tiny_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    state = model.state_dict()
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state
    untied = tiny_model(tie_word_embeddings=False)
    assert "lm_head.weight" in untied.state_dict()
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_meta_build_then_materialise_and_load_keeps_the_tie():
    source = tiny_model(seed=1)
    with torch.device("meta"):
        model = Transformer(source.args)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.load_state_dict(source.state_dict(), strict=True)
    ids = torch.tensor(random_token_lists([7])[0])
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model(ids)), source.logits(source(ids)), atol=0, rtol=0)
    # assign=True replaces parameters; the tie must survive that too.
    with torch.device("meta"):
        assigned = Transformer(source.args)
    assigned.load_state_dict(source.state_dict(), strict=True, assign=True)
    assert assigned.lm_head.weight is assigned.model.embed_tokens.weight


def test_init_weights_follows_the_hf_recipe():
    model = Transformer(tiny_args(family="qwen2", tie_word_embeddings=False, head_dim=None, num_layers=4))
    model.init_weights(std=0.05)
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Linear)])
    assert abs(weights.std().item() - 0.05) < 0.002 and abs(weights.mean().item()) < 0.002
    assert all(torch.all(p == 0) for n, p in model.named_parameters() if n.endswith("bias"))
    assert all(torch.all(p == 1) for n, p in model.named_parameters() if n.endswith("norm.weight"))


def test_lm_head_rows_are_the_logit_columns():
    model = tiny_model(tie_word_embeddings=False)
    ids = torch.tensor(random_token_lists([5])[0])
    with torch.no_grad():
        hidden = model(ids)
        rows = model.lm_head_rows([17, 3])
        full = model.logits(hidden)
    assert rows.shape == (2, 64)
    torch.testing.assert_close(hidden @ rows.T, full[:, [17, 3]], atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode, expected_checkpoints", [("full", 2), ("selective", 2)])
def test_recomputation_gives_the_same_gradients(monkeypatch, mode, expected_checkpoints):
    import engine.model.attention as attention_module
    import engine.model.transformer as transformer_module

    checkpointed = []
    real_checkpoint = transformer_module.checkpoint

    def counting_checkpoint(fn, *args, **kwargs):
        checkpointed.append(kwargs.get("use_reentrant"))
        return real_checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(transformer_module, "checkpoint", counting_checkpoint)
    monkeypatch.setattr(attention_module, "checkpoint", counting_checkpoint)
    seqs = random_token_lists([5, 9, 3], seed=4)
    packed = PackedSequences.from_token_lists(seqs)

    def grads(recompute: str):
        model = tiny_model(seed=2)
        model.set_recompute(recompute)
        hidden = model(packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen)
        loss = (hidden * torch.linspace(-1, 1, hidden.numel()).view_as(hidden)).sum()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, recomputed = grads("none"), grads(mode)
    # one non-reentrant checkpoint per block (full) or per attention core (selective), only when asked
    assert checkpointed == [False] * expected_checkpoints
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=0, msg=name)
