"""The planner (engine/plan/, launch/plan.py): communication and FLOPs against hand-computed
formulas, refusal of layouts that do not fit, ranking, and the command as a user runs it."""
from __future__ import annotations

import re

import pytest

from engine.build import model_args
from engine.cli import compose
from engine.config import parse_bytes
from engine.parallel.layout import Layout
from engine.plan.communication import traffic_per_step
from engine.plan.layouts import plan_cluster
from engine.plan.memory import Precision
from engine.plan.step_time import flops_per_step, model_flops

# A small Llama: h 256, 4 query heads x 64, 2 KV heads, SwiGLU 512, 8 layers, untied head.
SMALL = ["model=tiny", "model.hidden_size=256", "model.intermediate_size=512", "model.num_layers=8",
         "model.num_heads=4", "model.num_kv_heads=2", "model.tie_word_embeddings=false", "task=reranker",
         "task.head=linear", "task.num_negatives=3", "data.max_len=1024", "train.batch_size=8"]


def _small(*extra: str):
    cfg, _ = compose(SMALL + list(extra))
    return cfg, model_args(cfg.model)


def test_traffic_per_group_matches_the_collectives_counted_by_hand():
    cfg, args = _small("train.grad_accum=2")
    layout = Layout(tp=2, pp=2, ring=2, dp=2)
    traffic = {g.group: g for g in traffic_per_step(cfg, args, layout, Precision(4, 4, 4))}
    h, kv = 256, 2 * 64
    tokens = (8 // 2) * 4 * 1024 / 2  # a dp rank's 4 queries x 4 sequences x 1024 per step, over ring 2
    layers = 4  # per stage
    # tp: 2 all-gathers + 2 reduce-scatters forward, as many backward, each (tp-1)/tp of T x h fp32.
    assert traffic["tp"].bytes_per_step == pytest.approx(8 * 0.5 * tokens * h * 4 * layers)
    # ring: forward, one hop of K and V (per tp rank: kv/2 each); backward, that hop again, and the
    # fp32 dK, dV carried over both ring steps.
    per_token = 1 * 2 * (kv / 2) * 4 + 1 * 2 * (kv / 2) * 4 + 2 * 2 * (kv / 2) * 4
    assert traffic["ring"].bytes_per_step == pytest.approx(per_token * tokens * layers)
    # pp: the stream (h/tp under sequence parallelism) forward, its gradient back.
    assert traffic["pp"].bytes_per_step == pytest.approx(2 * tokens * (h / 2) * 4)
    # FSDP over dp x ring = 4: each layer gathered for the forward and the backward of each of the 2
    # micro-batches, the root once; gradients reduced once (pp defers them), fp32; all split over tp.
    layer = 256 * (2 * 256 + 2 * 128) + 3 * 256 * 512 + 2 * 256  # q, k, v, o; gate, up, down; 2 norms
    root = 512 * 256  # stage 0 (the heaviest): the embedding and 4 layers
    gathered = (2 * 2 * layers * layer + root) * 4
    reduced = (root + layers * layer) * 4
    assert traffic["dp_sp"].bytes_per_step == pytest.approx(3 / 4 * (gathered + reduced) / 2)
    assert (traffic["tp"].span, traffic["ring"].span, traffic["pp"].span) == (2, 4, 9)
    assert traffic["dp_sp"].size == 4 and "ulysses" not in traffic


def test_ulysses_traffic_counts_the_repeated_kv_heads_and_pipelines_span_nodes():
    cfg, args = _small()
    # 2 KV heads, ulysses 4: each repeated to 4 heads before the all-to-all.
    traffic = {g.group: g for g in traffic_per_step(cfg, args, Layout(ulysses=4, pp=4), Precision(4, 4, 4))}
    tokens = 8 * 4 * 1024 / 4
    width = 256 + 2 * 4 * 64 + 256  # q, repeated k and v in; the output back
    layers = 2  # 8 over pp 4
    # Forward and backward, 3/4 of each all-to-all's input leaves the rank.
    assert traffic["ulysses"].bytes_per_step == pytest.approx(2 * 3 / 4 * width * 4 * tokens * layers)
    # pp 4 on 16 ranks: stages 4 ranks apart, the pipeline over 13 consecutive ranks (two nodes of 8).
    assert traffic["pp"].span == 13


def test_flops_are_six_per_parameter_per_token_plus_attention():
    cfg, args = _small()
    block = 8 * (256 * (2 * 256 + 2 * 128) + 3 * 256 * 512)
    sequences, length = 8 * 4, 1024
    attention = 4 * sequences * length**2 * 256 * 8 * 0.5  # causal
    assert flops_per_step(cfg, args) == pytest.approx(6 * block * sequences * length + 3 * attention)
    full, _ = _small("train.recompute=full")
    assert flops_per_step(full, args) == pytest.approx(8 * block * sequences * length + 4 * attention)


def test_model_flops_count_frozen_blocks_once_backward_trained_adapters_twice_and_attention_per_sequence():
    """What the CPU benches report as model FLOPs (bench/train_step.py step_flops): packed sequences of
    unequal lengths, frozen blocks under LoRA, no recompute."""
    _, args = _small()
    block = 8 * (256 * (2 * 256 + 2 * 128) + 3 * 256 * 512)
    lora = 1000
    lengths = [10, 300]
    tokens = sum(lengths)
    attention = sum(4 * n**2 * 256 * 8 * 0.5 for n in lengths)  # causal, per sequence: not 4 x 310^2
    expected = 4 * block * tokens + 6 * lora * tokens + 3 * attention
    assert model_flops(args, lora, lengths) == pytest.approx(expected)
    # Full fine-tuning (no adapters): 6 per weight and token, as flops_per_step counts a step.
    assert model_flops(args, 0, lengths) == pytest.approx(6 * block * tokens + 3 * attention)


def test_layouts_that_do_not_fit_are_refused_and_the_rest_ranked_by_step_time():
    cfg, _ = compose(["+exp=reranker_70b", "cluster.gpus=128", "cluster.gpu_memory=24GB", "cluster.reserved_memory=0"])
    args = model_args(cfg.model)
    plan = plan_cluster(cfg, args)
    assert plan.usable_bytes == 24 * 10**9
    assert plan.ranked and plan.too_big  # 24 GB leaves some layouts out and some in
    assert all(p.memory.total <= plan.usable_bytes for p in plan.ranked)
    assert all(p.memory.total > plan.usable_bytes for p in plan.too_big)
    times = [p.time.total_s for p in plan.ranked]
    assert times == sorted(times)
    assert plan.experiment is not None and plan.experiment.layout == Layout(tp=8, pp=2, ulysses=4, ring=2, dp=1)


def test_parse_bytes_reads_decimal_and_binary_units():
    assert parse_bytes("k", "80GB") == 80 * 10**9 and parse_bytes("k", "4GiB") == 4 * 2**30
    assert parse_bytes("k", "141 GB") == 141 * 10**9 and parse_bytes("k", "512") == 512


def test_plan_command_prints_the_experiment_and_the_ranking(train_here):
    result = train_here("+exp=reranker_70b", "cluster.gpus=128", "cluster.gpu_memory=80GB", "cluster.top=3",
                        script="plan.py")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("* tp8 pp2 u4 r2 dp1") for line in lines)
    assert sum(line.startswith("  tp") for line in lines) == 3  # cluster.top
    assert any("fits and ranks" in line for line in lines) and any(line.startswith("refused:") for line in lines)


@pytest.mark.parametrize("override, message", [
    ("cluster.gpu_memory=80XB", "cluster.gpu_memory='80XB' is not a size"),
    ("cluster.mfu=1.5", "cluster.mfu=1.5 is a fraction"),
    ("cluster.reserved_memory=100GB", "leaves nothing of cluster.gpu_memory"),
])
def test_plan_command_bad_cluster_keys_are_one_line_errors(train_here, override, message):
    result = train_here("+exp=reranker_70b", "cluster.gpus=128", override, script="plan.py")
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_plan_names_why_the_experiment_cannot_run_on_too_few_gpus(train_here):
    result = train_here("+exp=embedding_70b", "cluster.gpus=8", "cluster.top=1", script="plan.py")
    assert result.returncode == 0, result.stderr
    assert "the experiment's layout cannot run on 8 GPUs: parallel: tp*pp*ulysses*ring = 8*2*4*1 = 64" in result.stdout


def test_plan_without_a_gpu_count_is_a_one_line_error(train_here):
    result = train_here("+exp=tiny", script="plan.py")  # parallel.world_size=0 and no cluster.gpus
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "cluster.gpus=0 and parallel.world_size=0: give the GPUs to plan for" in result.stderr


def test_plan_says_when_no_layout_fits(train_here):
    result = train_here("+exp=reranker_70b", "cluster.gpus=8", "cluster.gpu_memory=1GB", "cluster.reserved_memory=0",
                        script="plan.py")
    assert result.returncode == 0, result.stderr
    assert "no layout fits: lower data.max_len or the batch" in result.stdout
    assert re.search(r"^refused: \d+ layouts that do not fit \(smallest: ", result.stdout, re.M)
