"""Context parallelism through the real entry point: `torchrun ... launch/train.py` on gloo/CPU.

The tiny random model (4 query heads, 2 KV heads) trains for 3 steps on synthetic data, once
in one plain process (the reference) and with every sequence split over 4 ranks; each run is a
separate subprocess, as a user would start it. Checked, through metrics.jsonl: the loss and
the gradient norm of every step equal the reference's (relative 1e-4, the tolerance of
tests/parallel/test_launch.py for tp and dp), for
- ring 4 (zigzag: each sequence cut into 8 chunks);
- ulysses 4 (one query head per rank, the 2 KV heads repeated);
- bidirectional attention (`model.causal=false`, ring's plain split into 4) at ring 4.
The documents (about 15 tokens) and queries (about 50) have unequal lengths, so each packed row
holds sequences padded differently to the chunk multiple.

Why the gradient norms too. AdamW's first steps move each weight by about lr whatever the
gradient's size, so a gradient wrong in size but not in sign barely changes the next losses:
with ring attention's backward made to drop the dK that other ranks send back, the losses of
steps 2 and 3 were still within 5.1e-5 (relative) of the reference, while the gradient norms
were off by 4e-5, 1.1e-3 and 1.1e-3. Correct runs measured: losses within 1.0e-6, gradient
norms within 7.5e-6 (bidirectional ring 4, step 2; causal within 1.9e-6). Per-parameter
gradients are checked by tests/parallel/test_parity.py.

Also checked: exp/demo_long's synthetic documents (engine/demo/long_data.py) are exactly
data.doc_max_len tokens each, with the fact the query asks for stated once.
"""
from __future__ import annotations

import json
import re

import pytest

from engine.cli import compose
from engine.data.byte_tokenizer import byte_tokenizer
from engine.data.tokenize import TextEncoder
from engine.demo.long_data import write_long_data
from tests.conftest import read_metrics, synthetic_examples, write_jsonl
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
    """run(name, nproc, *overrides) -> that run's folder; each run starts once per module."""
    root = tmp_path_factory.mktemp("runs")
    done: dict[str, str] = {}

    def get(name: str, nproc: int, *overrides: str) -> str:
        if name not in done:
            run_dir = root / name
            result = launch(nproc, *ARGS, f"data.train={train_file}", f"train.output_dir={run_dir}", *overrides)
            assert result.returncode == 0, f"{name}: exit {result.returncode}\n{result.stderr[-3000:]}"
            done[name] = str(run_dir)
        return done[name]

    return get


def grad_norms(run_dir) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in read_metrics(run_dir) if "grad_norm" in r}


def assert_same_training(got_dir: str, expected_dir: str) -> None:
    """The losses and the gradient norms (before clipping) of every step, relative 1e-4."""
    assert_same_losses(losses(got_dir), losses(expected_dir))
    assert_same_losses(grad_norms(got_dir), grad_norms(expected_dir))


@pytest.mark.parametrize("dim", ["ring", "ulysses"])
def test_context_parallel_4_logs_the_single_process_losses(run, dim):
    expected = run("single-causal", 0)
    assert sorted(losses(expected)) == list(range(1, STEPS + 1))
    assert sorted(grad_norms(expected)) == list(range(1, STEPS + 1))
    # The losses move: a frozen run could not match by accident.
    assert len(set(losses(expected).values())) == STEPS
    assert_same_training(run(f"{dim}4", 4, f"parallel.{dim}=4"), expected)


def test_bidirectional_ring_4_logs_the_single_process_losses(run):
    expected = run("single-bidirectional", 0, "model.causal=false")
    assert losses(expected) != losses(run("single-causal", 0))  # the switch reaches attention
    assert_same_training(run("ring-bidirectional", 4, "parallel.ring=4", "model.causal=false"), expected)


def test_demo_long_documents_are_exactly_doc_max_len_tokens_with_one_fact(tmp_path):
    """exp/demo_long's data: every document fills data.doc_max_len with its EOS (nothing truncated,
    no token merged), the positive states the query's vault once, the negative another vault."""
    cfg, _ = compose(["+exp=demo_long"])
    path = write_long_data(tmp_path / "a", num_queries=3, doc_bytes=cfg.data.doc_max_len - 1, seed=0)
    assert path.read_bytes() == write_long_data(tmp_path / "b", 3, cfg.data.doc_max_len - 1, 0).read_bytes()
    encoder = TextEncoder(byte_tokenizer(), cfg.task, cfg.data)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 3
    for k, line in enumerate(lines):
        vault = re.fullmatch(r"What is the access code of vault (\d+)\?", line["query"]).group(1)
        assert int(vault) == k
        assert len(encoder.queries([line["query"]])[0]) < cfg.data.query_max_len  # the query is whole
        for text, owner in ((line["pos"][0], vault), (line["neg"][0], str(k + 1))):
            assert [len(ids) for ids in encoder.documents([text])] == [cfg.data.doc_max_len]
            assert re.findall(r"access code of vault (\d+) is", text) == [owner]
