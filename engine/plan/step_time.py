"""Step time from FLOPs at a stated MFU, plus the pipeline bubble and communication.

FLOPs executed per optimizer step (the whole cluster), per sequence of s tokens:
- matmuls: 2 x the blocks' weights per token in a forward (the heads read a few rows: left out); a backward
  is 2 forwards when the weights train and 1 (input gradients only) when they are frozen (LoRA;
  its adapters' own FLOPs are counted as trained weights);
- attention: 4 s^2 x (heads x head_dim) per layer in a forward, half of it when causal; 2 forwards
  in backward;
- forwards per micro-batch: 1, +1 under recompute=full (+ the attention core under selective),
  +1 under grad_cache.
compute time = FLOPs / (GPUs x peak_tflops x mfu), stretched by the schedule's bubble
(1 / (1 - bubble)); communication adds each group's bytes over its bandwidth (within a node or
across), counted as not overlapped: an upper bound, which ranks layouts that talk less first.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.plan.communication import GroupTraffic, forward_passes
from engine.plan.memory import lora_parameter_count


@dataclass(frozen=True)
class StepTime:
    flops: float  # the cluster's per step
    compute_s: float  # at the stated MFU, over every GPU, bubble included
    communication_s: float
    bubble: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.communication_s


def sequences_per_step(cfg) -> list[tuple[int, int]]:
    """(count, length) of the sequences one step encodes, at their maximum lengths."""
    t, d, b = cfg.task, cfg.data, cfg.train.batch_size
    if t.type == "reranker":
        return [(b * (1 + t.num_negatives), d.max_len)]
    return [(b, d.query_max_len), (b * (1 + t.num_negatives), d.doc_max_len)]


def flops_per_step(cfg, args) -> float:
    lora = lora_parameter_count(args, cfg.lora.rank, list(cfg.lora.targets)) if cfg.lora.rank > 0 else 0
    return sum(sequence_flops(args, lora, count, length, forwards=forward_passes(cfg),
                              recompute_attention=cfg.train.recompute == "selective")
               for count, length in sequences_per_step(cfg))


def model_flops(args, lora_params: int, lengths) -> float:
    """The model FLOPs of one step over sequences of these lengths, as MFU counts them: one forward
    and its backward (no recompute), the adapters' FLOPs as trained weights', the attention's."""
    return sum(sequence_flops(args, lora_params, 1, length) for length in lengths)


def sequence_flops(args, lora_params: int, count: int, length: int, forwards: int = 1,
                   recompute_attention: bool = False) -> float:
    """FLOPs of `count` sequences of `length` tokens (the module docstring's terms)."""
    h, layers = args.hidden_size, args.num_layers
    block = layers * (h * (2 * args.q_size + 2 * args.kv_size) + 3 * h * args.intermediate_size)
    tokens = count * length
    matmul = 2 * (block + lora_params) * tokens
    backward = 2 * block * tokens * (1 if lora_params else 2) + 4 * lora_params * tokens
    attention = 4 * count * length**2 * args.q_size * layers * (0.5 if args.causal else 1.0)
    return forwards * (matmul + attention) + (attention if recompute_attention else 0.0) + backward + 2 * attention


def step_time(cfg, args, layout, traffic: list[GroupTraffic], bubble: float) -> StepTime:
    c = cfg.cluster
    flops = flops_per_step(cfg, args)
    compute = flops / (layout.world_size * c.peak_tflops * 1e12 * c.mfu) / (1 - bubble)
    communication = sum(
        g.bytes_per_step / ((c.intra_node_bandwidth if g.span <= c.gpus_per_node else c.inter_node_bandwidth) * 1e9)
        for g in traffic
    )
    return StepTime(flops, compute, communication, bubble)
