"""The pipeline stage rule (engine/parallel/pipeline/stages.py): contiguous, complete, balanced by
parameters, the embedding first and the head last, interleaved chunks round-robin over ranks."""
from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from engine.model.args import ModelArgs
from engine.parallel.pipeline.stages import StagePlanError, plan_stages, unit_costs

TINY = ModelArgs(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=8,
                 num_heads=4, num_kv_heads=2)
LLAMA_70B = ModelArgs(family="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                      num_heads=64, num_kv_heads=8, tie_word_embeddings=False)


def brute_force_best(args, parts: int, head_rows: bool) -> int:
    """The smallest possible largest-chunk cost over every contiguous cut (small models only)."""
    embedding, layer, head = unit_costs(args, head_rows)
    best = None
    for cuts in itertools.combinations(range(1, args.num_layers), parts - 1):
        bounds = [0, *cuts, args.num_layers]
        costs = [(b - a) * layer + (embedding if a == 0 else 0) + (head if b == args.num_layers else 0)
                 for a, b in zip(bounds, bounds[1:])]
        best = max(costs) if best is None else min(best, max(costs))
    return best


@pytest.mark.parametrize("pp, virtual", [(1, 1), (2, 1), (4, 1), (2, 2), (2, 4), (8, 1)])
@pytest.mark.parametrize("head_rows", [True, False])
def test_chunks_cover_every_layer_once_in_order_with_the_ends_in_place(pp, virtual, head_rows):
    plan = plan_stages(TINY, pp, virtual, head_rows)
    assert [layer for c in plan.chunks for layer in c.layers] == list(range(TINY.num_layers))
    assert all(len(c.layers) >= 1 for c in plan.chunks)
    assert [c.embedding for c in plan.chunks] == [True] + [False] * (pp * virtual - 1)
    assert [c.head for c in plan.chunks] == [False] * (pp * virtual - 1) + [True]
    assert [c.rank for c in plan.chunks] == [i % pp for i in range(pp * virtual)]  # interleaved order
    for rank in range(pp):
        assert len(plan.chunks_of(rank)) == virtual


@pytest.mark.parametrize("parts", [2, 3, 4, 5])
@pytest.mark.parametrize("vocab", [64, 512, 4096])  # an embedding lighter than, like, heavier than a layer
def test_the_cut_is_optimal(parts, vocab):
    args = replace(TINY, vocab_size=vocab)
    for head_rows in (True, False):
        plan = plan_stages(args, parts, 1, head_rows)
        assert max(c.cost for c in plan.chunks) == brute_force_best(args, parts, head_rows)


def test_a_heavy_embedding_takes_layers_off_the_first_stage():
    embedding, layer, _ = unit_costs(LLAMA_70B, head_rows=False)
    assert 1.2 < embedding / layer < 1.3  # a 128K vocabulary weighs about a layer of a 70B model
    plan = plan_stages(LLAMA_70B, 4, head_rows=False)
    assert [len(c.layers) for c in plan.chunks] == [19, 20, 21, 20]
    plan = plan_stages(LLAMA_70B, 4, head_rows=True)  # and an untied head the last
    assert [len(c.layers) for c in plan.chunks] == [19, 21, 21, 19]


def test_costs_add_up_to_the_models_parameter_count():
    import torch

    from engine.model.transformer import Transformer

    variants = (TINY, replace(TINY, family="qwen3", qk_norm=True), replace(TINY, family="qwen2", attention_bias=True),
                replace(TINY, mlp_bias=True, attention_bias=True, o_proj_bias=True),
                replace(TINY, tie_word_embeddings=False))
    for args in variants:
        with torch.device("meta"):
            model = Transformer(args)
        named = dict(model.named_parameters())  # a tied head is the embedding: counted once
        head_rows = not args.tie_word_embeddings
        plan = plan_stages(args, 2, head_rows=head_rows)
        assert sum(c.cost for c in plan.chunks) == sum(p.numel() for p in named.values())


def test_too_many_stages_is_a_one_line_error():
    with pytest.raises(StagePlanError, match=r"num_layers=8 cannot fill pp=4 x 3 virtual stages = 12 chunks"):
        plan_stages(TINY, 4, 3)


def test_describe_names_each_ranks_layers():
    plan = plan_stages(TINY, 2, 2)
    lines = plan.describe()
    assert lines[0].startswith("stage 0: embedding + layers 0-") and "; layers" in lines[0]
    assert lines[1].endswith("+ head")
