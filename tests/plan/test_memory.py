"""The memory model (engine/plan/memory.py) against its own terms, computed by hand here. How close
the model comes to measured peaks is bench/memory.py's job (tests/bench/test_memory_bench.py)."""
from __future__ import annotations

import pytest

from engine.build import model_args
from engine.cli import compose
from engine.config import ModelConfig
from engine.parallel.layout import Layout
from engine.plan.memory import Precision, lora_parameter_count, plan_memory, tokens_per_microbatch

LLAMA3_70B = 70_553_706_496


def test_reranker_70b_plan_matches_hand_computed_terms():
    cfg, _ = compose(["+exp=reranker_70b"])
    args = model_args(cfg.model)
    layout = Layout(tp=8, pp=2, ulysses=4, ring=2, dp=1)
    plan = plan_memory(cfg, args, layout)
    assert plan.total_params == LLAMA3_70B
    lora = lora_parameter_count(args, 64, list(cfg.lora.targets))
    # LoRA r=64 on q,k,v,o,gate,up,down of 80 layers: r * (in + out) per matrix.
    h, kv, ffn = 8192, 8 * 128, 28672
    per_layer_lora = 64 * ((h + h) + (h + kv) * 2 + (h + h) + (h + ffn) * 2 + (ffn + h))
    assert lora == per_layer_lora * 80 == plan.trainable_params
    vocab, q = 128256, 64 * 128
    layer = (h * q + 2 * h * kv + q * h) + 3 * h * ffn + 2 * h
    embedding, head = vocab * h, vocab * h + h  # the yes/no head reads the untied LM head on the last stage
    assert embedding + 80 * layer + head == LLAMA3_70B
    stage0, stage1 = plan.stages
    assert stage0.description == "stage 0: embedding + layers 0-39" and stage1.description == "stage 1: layers 40-79 + head"
    # bf16 weights split over tp 8, and FSDP-sharded over dp x ring x ulysses = 8.
    assert stage0.weights == (embedding + 40 * layer) * 2 / 8 / 8
    # Under pp, FSDP holds whole fp32 gradients until the stage's last backward of the step.
    assert stage0.grads == 40 * per_layer_lora * 4 / 8
    assert stage0.optimizer == 2 * 40 * per_layer_lora * 2 / 8 / 8  # two bf16 moments
    assert plan.tokens_per_microbatch == 2 * 32768  # a grad-cache chunk: 2 pairs of 32K tokens
    tokens = 2 * 32768 / 8  # over ulysses x ring
    # recompute=full: each layer keeps its input (bf16, the residual stream split over tp by sequence
    # parallelism) for every micro-batch 1F1B keeps in flight (2 on the first stage, 1 on the last),
    # and one layer is recomputed whole. Per token of that layer:
    norm = 2 * h / 8 + 2 * h  # its input (recomputed to fp32 and normed in its backward), gathered output
    attention = 2 * (q / 8 + 2 * kv / 8) + 2 * q / 8  # q, k, v after RoPE; the kernel's output
    mlp = 4 * 2 * ffn / 8
    # flash keeps its LSE (a float per head); under Ulysses its output is the head-split one (another
    # q) and it reads K, V repeated from 1 head per tp rank to 4 (ulysses): 3 more heads each.
    kernel = 2 * (64 / 8 + q / 8 + 2 * 3 * 128)
    recomputed = tokens * (2 * norm + attention + mlp + kernel)
    assert stage0.activations == pytest.approx(2 * 40 * 2 * tokens * h / 8 + recomputed)
    final_norm = tokens * (2 * h / 8 + 2 * h)
    assert stage1.activations == pytest.approx(1 * 40 * 2 * tokens * h / 8 + recomputed + final_norm)
    # The summary is the heaviest stage: the first, whose two micro-batches in flight outweigh the head.
    assert plan.heaviest is stage0 and plan.total == stage0.total


def test_sequence_parallelism_splits_only_the_residual_stream():
    overrides = ["+exp=reranker_qwen3_8b", "train.recompute=selective", "train.grad_cache=false"]
    with_sp, without_sp = (plan_memory(cfg, model_args(cfg.model), Layout(tp=4, dp=2))
                           for cfg in (compose(overrides)[0],
                                       compose(overrides + ["parallel.sequence_parallel=false"])[0]))
    cfg = compose(overrides)[0]
    h, tokens = 4096, tokens_per_microbatch(cfg, Layout(tp=4, dp=2))
    # Two norms per layer (and the final one) keep their bf16 input at h/tp instead of h.
    per_layer = 2 * 2 * (h - h / 4) * tokens
    assert without_sp.heaviest.activations - with_sp.heaviest.activations == pytest.approx(36 * per_layer + 2 * (h - h / 4) * tokens)


def test_tokens_per_microbatch_splits_the_batch_over_dp_but_not_a_grad_cache_chunk():
    cfg, _ = compose(["task=reranker", "task.num_negatives=3", "data.max_len=512", "train.batch_size=8",
                      "train.grad_accum=2"])
    assert tokens_per_microbatch(cfg, Layout(dp=1)) == 4 * 4 * 512
    assert tokens_per_microbatch(cfg, Layout(dp=2)) == 2 * 4 * 512
    cfg, _ = compose(["task=reranker", "data.max_len=512", "train.grad_cache=true", "train.grad_cache_chunk=3"])
    assert tokens_per_microbatch(cfg, Layout(dp=1)) == tokens_per_microbatch(cfg, Layout(dp=4)) == 3 * 512


def test_precision_follows_dtype_and_device():
    assert Precision.of(ModelConfig(dtype="bfloat16"), "cuda") == Precision(2, 2, 2)
    assert Precision.of(ModelConfig(dtype="auto"), "cuda") == Precision(4, 4, 2)  # fp32 weights, bf16 autocast
    assert Precision.of(ModelConfig(dtype="auto"), "cpu") == Precision(4, 4, 4)


@pytest.mark.parametrize("fused", ["flash_attn", "triton"])
def test_fused_attention_kernels_keep_only_their_lse(fused):
    """flash-attn and Triton keep the LSE (a float per head) where the reference keeps padded q, k, v
    copies and its output: the plans differ by exactly that, per layer and token."""
    def activations(kernel: str) -> float:
        cfg, _ = compose(["+exp=reranker_qwen3_8b", "train.recompute=none", f"kernels.attention={kernel}"])
        return plan_memory(cfg, model_args(cfg.model), Layout(tp=4, dp=2)).heaviest.activations

    cfg, _ = compose(["+exp=reranker_qwen3_8b"])
    tokens = tokens_per_microbatch(cfg, Layout(tp=4, dp=2))
    q, kv = 32 * 128 / 4, 8 * 128 / 4  # Qwen3-8B per tp rank
    per_layer_token = 2 * ((2 * q + 2 * kv) - 32 / 4)  # bf16
    assert activations("torch") - activations(fused) == pytest.approx(36 * tokens * per_layer_token)
