"""Under pipeline x data parallelism FSDP reduces each unit's gradients once per optimizer step, not
at every micro-batch's backward: on real gloo processes (pp 2 x dp 2), the reduce-scatters of one
step are counted and equal the FSDP units that hold gradients on the rank, for the 1F1B and the
interleaved schedule, with several grad-cache chunks (pipeline micro-batches) per step and with two
grad_accum passes. The parity suite (tests/parallel/test_parity.py) shows the gradients are right."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist

from engine.cli import compose
from engine.parallel.layout import layout_from_config
from engine.parallel.mesh import init_mesh
from engine.parallel.spawn import spawn_ranks
from tests.parallel.test_parity import TINY, build_trainer
from tests.conftest import synthetic_examples, write_jsonl

CASES = {
    "1f1b-gradcache": ["task=embedding", "model.num_layers=4", "parallel.pp=2", "train.grad_cache=true",
                       "train.grad_cache_chunk=3"],
    "interleaved-gradcache": ["task=embedding", "model.num_layers=4", "parallel.pp=2",
                              "parallel.pp_schedule=interleaved", "parallel.pp_virtual=2", "train.grad_cache=true",
                              "train.grad_cache_chunk=3"],
    "1f1b-reranker-accum2": ["task=reranker", "task.head=linear", "model.num_layers=4", "parallel.pp=2",
                             "train.grad_accum=2"],
}


def _count_reduce_scatters(rank: int, world: int, data_dir: str, out_dir: str, overrides: list[str]) -> dict:
    cfg, _ = compose(TINY + overrides)
    mesh = init_mesh(layout_from_config(cfg.parallel, world_size=world), torch.device("cpu"))
    trainer = build_trainer(overrides, data_dir, out_dir, mesh)
    calls = []
    original = dist.reduce_scatter_single

    def counted(*args, **kwargs):
        if sys._getframe(1).f_globals["__name__"].startswith("torch.distributed.fsdp"):  # not the loss's own
            calls.append(1)
        return original(*args, **kwargs)

    dist.reduce_scatter_single = counted
    try:
        trainer.train_step()
        first = len(calls)
        trainer.train_step()
    finally:
        dist.reduce_scatter_single = original
    # FSDP units: each held decoder layer, and the root (everything outside the layers).
    layers = sum(1 for layer in trainer.model.backbone.held_layers() if any(p.requires_grad for p in layer.parameters()))
    root = any(p.requires_grad for name, p in trainer.model.named_parameters() if ".layers." not in name)
    return {"per_step": [first, len(calls) - first], "units": layers + int(root)}


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_reduces_once_per_step_under_a_pipeline(case, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", synthetic_examples(24, seed=0))
    write_jsonl(tmp_path / "eval.jsonl", synthetic_examples(3, seed=1))
    results = spawn_ranks(_count_reduce_scatters, 4, str(tmp_path), str(tmp_path / "run"), CASES[case],
                          timeout_s=120)
    for rank, r in enumerate(results):
        assert r["units"] >= 3, r  # 2 layers and the root hold gradients on every stage
        assert r["per_step"] == [r["units"], r["units"]], (rank, r)
