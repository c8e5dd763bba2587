"""The dry-run memory plan against the formulas it claims (hand-computed here)."""
from __future__ import annotations

from engine.cli import compose
from engine.parallel.layout import Layout
from engine.build import model_args
from engine.train.memory import lora_parameter_count, plan_memory


def test_reranker_70b_plan_matches_hand_computed_terms():
    cfg, _ = compose(["+exp=reranker_70b"])
    args = model_args(cfg.model)
    layout = Layout(tp=8, pp=2, ulysses=4, ring=2, dp=2)
    total = 70_553_706_496  # Llama-3-70B
    plan = plan_memory(cfg, args, total, layout)
    trainable = lora_parameter_count(args, 64, list(cfg.lora.targets))
    # LoRA r=64 on q,k,v,o,gate,up,down of 80 layers: r * (in + out) per matrix.
    h, kv, ffn = 8192, 8 * 128, 28672
    per_layer = 64 * ((h + h) + (h + kv) * 2 + (h + h) + (h + ffn) * 2 + (ffn + h))
    assert trainable == per_layer * 80 == plan.trainable_params
    # The stage rule's parameter counts add up to the model's: embedding, 80 layers, untied head + norm.
    vocab, q = 128256, 64 * 128
    layer = (h * q + 2 * h * kv + q * h) + 3 * h * ffn + 2 * h
    embedding, head = vocab * h, vocab * h + h  # the yes/no head reads the untied LM head on the last stage
    assert embedding + 80 * layer + head == total
    stage0, stage1 = plan.stages
    assert stage0.description == "stage 0: embedding + layers 0-39" and stage1.description == "stage 1: layers 40-79 + head"
    assert stage0.weights == (embedding + 40 * layer) * 2 / 8  # bf16, split over tp
    assert stage1.weights == (40 * layer + head) * 2 / 8
    assert stage0.optimizer == 40 * per_layer * 8 / 8 / (2 * 4 * 2)  # two fp32 moments, ZeRO over dp*ulysses*ring
    tokens = 2 * 32768 // 2  # grad-cache chunk of 2 pairs of 32K tokens, over dp=2
    assert plan.tokens_per_microbatch == tokens
    tokens_per_rank = tokens / 8  # ulysses * ring
    # Gradient checkpointing: each layer's input (2 bytes) for every micro-batch 1F1B keeps in flight
    # (2 on the first stage, 1 on the last; 64 grad-cache chunks per step) + one layer recomputed (34sbh/tp).
    assert stage0.activations == 2 * 40 * 2 * tokens_per_rank * h + 34 / 8 * tokens_per_rank * h
    assert stage1.activations == 1 * 40 * 2 * tokens_per_rank * h + 34 / 8 * tokens_per_rank * h
    # The summary is the heaviest stage: the first, whose activations outweigh the head.
    assert (plan.weights, plan.activations) == (stage0.weights, stage0.activations)


def test_without_sequence_parallelism_norm_activations_are_not_split():
    cfg, _ = compose(["+exp=reranker_qwen3_8b", "train.recompute=none",
                      "parallel.sequence_parallel=false"])
    args = model_args(cfg.model)
    layout = Layout(tp=4, dp=2)
    plan = plan_memory(cfg, args, 8_000_000_000, layout)
    tokens = 4 * 8192 // 2
    assert plan.activations == 36 * (10 + 24 / 4) * tokens * 4096
