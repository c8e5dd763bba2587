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
    assert plan.weights == total * 2 / 16  # bf16 weights split over tp*pp
    assert plan.optimizer == trainable * 8 / 16 / (2 * 4 * 2)  # two fp32 moments, ZeRO over dp*ulysses*ring
    tokens = 2 * 32768 // 2  # grad-cache chunk of 2 pairs of 32K tokens, over dp=2
    assert plan.tokens_per_microbatch == tokens
    tokens_per_rank = tokens / 8  # ulysses * ring
    # gradient checkpointing: each stage's 40 layer inputs (2 bytes) + one layer recomputed (34sbh/tp).
    assert plan.activations == 40 * 2 * tokens_per_rank * h + 34 / 8 * tokens_per_rank * h


def test_without_sequence_parallelism_norm_activations_are_not_split():
    cfg, _ = compose(["+exp=reranker_qwen3_8b", "train.recompute=none",
                      "parallel.sequence_parallel=false"])
    args = model_args(cfg.model)
    layout = Layout(tp=4, dp=2)
    plan = plan_memory(cfg, args, 8_000_000_000, layout)
    tokens = 4 * 8192 // 2
    assert plan.activations == 36 * (10 + 24 / 4) * tokens * 4096
