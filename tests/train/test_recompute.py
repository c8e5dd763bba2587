"""train.recompute: none, selective and full recomputation train to identical losses, and keep
less activation memory for the backward pass (measured as the bytes autograd saves in forward)."""
from __future__ import annotations

import pytest
import torch

from engine.data.batch import PackedSequences
from engine.model.args import ModelArgs
from engine.model.transformer import Transformer
from tests.train.test_trainer import make_trainer

MODES = ("none", "selective", "full")


@pytest.fixture(scope="module")
def losses_by_mode(tmp_path_factory):
    from tests.conftest import synthetic_examples, write_jsonl

    root = tmp_path_factory.mktemp("recompute")
    data = (write_jsonl(root / "train.jsonl", synthetic_examples(24, seed=0)),
            write_jsonl(root / "eval.jsonl", synthetic_examples(4, seed=1)))
    out = {}
    for mode in MODES:
        trainer = make_trainer(root / mode, data, f"train.recompute={mode}", "lora.rank=4", "train.save_final=false")
        out[mode] = [trainer.train_step()["loss"] for _ in range(3)]
    return out


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recomputation_never_changes_the_losses(losses_by_mode, mode):
    assert losses_by_mode[mode] == losses_by_mode["none"]  # bit for bit: the same ops, recomputed


def _saved_bytes(mode: str) -> int:
    """Bytes autograd keeps from the forward pass for the backward pass of a tiny model."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(family="llama", vocab_size=128, hidden_size=64, intermediate_size=256,
                                  num_layers=4, num_heads=4, num_kv_heads=2))
    model.set_recompute(mode)
    packed = PackedSequences.from_token_lists([[t % 120 + 1 for t in range(n)] for n in (200, 120, 64)])
    seen: dict[int, int] = {}

    def pack(tensor):
        seen[id(tensor)] = tensor.numel() * tensor.element_size()  # by identity: a tensor saved twice counts once
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model(packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen)
    hidden.sum().backward()
    return sum(seen.values())


def test_recomputation_keeps_less_for_backward():
    none, selective, full = (_saved_bytes(mode) for mode in MODES)
    assert selective < none
    assert full < selective
    assert full < 0.5 * none
