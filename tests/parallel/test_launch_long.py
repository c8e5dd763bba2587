"""Context parallelism through the real entry point: `torchrun ... launch/train.py` on gloo/CPU.

The tiny random model (4 query heads, 2 KV heads) trains for 3 steps on synthetic data, once
in one plain process (the reference) and with every sequence split over 4 ranks; each run is a
separate subprocess, as a user would start it. Checked, through the losses in metrics.jsonl
(relative 1e-4, as tests/parallel/test_launch.py does for tp and dp):
- ring 4 (zigzag: each sequence cut into 8 chunks) logs the reference's losses;
- ulysses 4 (one query head per rank, the 2 KV heads replicated) logs them;
- bidirectional attention (`model.causal=false`, ring's plain split into 4) at ring 4 logs the
  bidirectional reference's losses.
The documents (about 15 tokens) and queries (about 50) have unequal lengths, so each packed row
holds sequences padded differently to the chunk multiple. Training moves the losses of steps 2
and 3 by 1.6e-3 and 8e-3 relative (measured against lr 0), 16 to 80 times the tolerance, so an
update pointing elsewhere (a shard's gradient lost or misplaced) shows from step 2 on; a gradient
off by one common factor would not (AdamW and the norm clip cancel it): the parameter parity
tests (tests/parallel/test_parity.py) check gradients themselves.
"""
from __future__ import annotations

import pytest

from tests.conftest import synthetic_examples, write_jsonl
from tests.parallel.test_launch import TINY, assert_same_losses, launch, losses

STEPS = 3
# test_launch's tiny run with 3 steps (the later override wins) and no export.
ARGS = [*TINY, f"train.max_steps={STEPS}"]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("data")
    return write_jsonl(root / "train.jsonl", synthetic_examples(24, seed=0))


@pytest.fixture(scope="module")
def run(tmp_path_factory, train_file):
    """run(name, nproc, *overrides) -> that run's losses; each run starts once per module."""
    root = tmp_path_factory.mktemp("runs")
    done: dict[str, dict[int, float]] = {}

    def get(name: str, nproc: int, *overrides: str) -> dict[int, float]:
        if name not in done:
            run_dir = root / name
            result = launch(nproc, *ARGS, f"data.train={train_file}", f"train.output_dir={run_dir}", *overrides)
            assert result.returncode == 0, f"{name}: exit {result.returncode}\n{result.stderr[-3000:]}"
            done[name] = losses(run_dir)
        return done[name]

    return get


@pytest.mark.parametrize("dim", ["ring", "ulysses"])
def test_context_parallel_4_logs_the_single_process_losses(run, dim):
    expected = run("single-causal", 0)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert len(set(expected.values())) == STEPS  # the losses move: a frozen run could not match by accident
    assert_same_losses(run(f"{dim}4", 4, f"parallel.{dim}=4"), expected)


def test_bidirectional_ring_4_logs_the_single_process_losses(run):
    expected = run("single-bidirectional", 0, "model.causal=false")
    assert expected != run("single-causal", 0)  # the switch reaches attention
    assert_same_losses(run("ring-bidirectional", 4, "parallel.ring=4", "model.causal=false"), expected)
