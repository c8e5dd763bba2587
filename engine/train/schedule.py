"""How one optimizer step's micro-batches become gradients: one function per run, chosen once.

    forward_backward = select_forward_backward(cfg.train, autocast, set_gradient_sync)
    loss = forward_backward(task, micro_batches)  # .grad accumulated over them; returns their mean loss

plain        each micro-batch: every tower, the loss, backward. With train.grad_accum > 1 the
             negative pool is the micro-batch's (the trainer warns).
grad_cache   each micro-batch through GradCache (engine/train/grad_cache.py): embedded without a
             graph, the loss's gradient per output row cached, then each chunk of
             train.grad_cache_chunk sequences replayed with its graph; the pool stays the micro-batch's
             while activation memory is one chunk's.
pipelined    parallel.pp > 1: the stages of engine/parallel/pipeline run by engine/train/pipeline.py,
             the GradCache pipeline (whole-batch negatives) or per-micro-batch losses (_pipelined).

The trainer calls the function it was handed and never branches on the schedule; tasks are met
only through their contract (engine/tasks/protocol.py).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from engine.config import TrainConfig
from engine.tasks.base import encode_together
from engine.tasks.protocol import Task
from engine.train.grad_cache import grad_cache_step
from engine.train.pipeline import PipelineSchedule, grad_cache_pipeline_step, plain_pipeline_step

ForwardBackward = Callable[[Task, Sequence[Any]], float]


def select_forward_backward(
    cfg: TrainConfig,
    autocast: Callable[[], AbstractContextManager],
    set_gradient_sync: Callable[[bool], None],
    pipeline: PipelineSchedule | None = None,
) -> ForwardBackward:
    """autocast() opens the run's mixed-precision context; set_gradient_sync(enabled) tells the
    data-parallel wrapper whether this backward must reduce gradients (only the last micro-batch's).
    pipeline: this rank's stage schedule when parallel.pp > 1."""
    if pipeline is not None:
        return _pipelined(cfg, autocast, pipeline)
    one = _grad_cached(cfg.grad_cache_chunk, autocast) if cfg.grad_cache else _plain(autocast)

    def forward_backward(task: Task, micro_batches: Sequence[Any]) -> float:
        total = 0.0
        for index, batch in enumerate(micro_batches):
            set_gradient_sync(index == len(micro_batches) - 1)
            total += one(task, batch, 1.0 / len(micro_batches))
        return total / len(micro_batches)

    return forward_backward


def _plain(autocast):
    def one(task: Task, batch: Any, loss_scale: float) -> float:
        with autocast():
            # Every tower in one pass of encode_tower (the FSDP-registered forward), then the loss.
            outputs = encode_together(task.encode_tower, task.towers(batch))
            loss = task.loss_from_outputs(outputs, batch)
        (loss * loss_scale).backward()
        return float(loss.detach())

    return one


def _grad_cached(chunk: int, autocast):
    def one(task: Task, batch: Any, loss_scale: float) -> float:
        towers = [(task.encode_tower, seqs.chunks(chunk)) for seqs in task.towers(batch)]
        with autocast():
            loss = grad_cache_step(towers, lambda outputs: task.loss_from_outputs(outputs, batch) * loss_scale)
        return float(loss) / loss_scale

    return one


def _pipelined(cfg: TrainConfig, autocast, pipeline: PipelineSchedule) -> ForwardBackward:
    """Through pipeline stages (engine/train/pipeline.py). With train.grad_cache, or with several towers
    (an embedding's loss needs both at once), the GradCache pipeline: chunks of grad_cache_chunk
    sequences (or whole towers) as pipeline micro-batches, the loss over the whole micro-batch on the
    last stage. A one-tower task without grad cache (the reranker, whose loss stays inside a query
    group) pipelines the step's micro-batches, each with its own loss. Gradients are reduced over dp
    once per step: in the last pass, at each chunk's last backward (PipelineSchedule's gradient_sync)."""

    def forward_backward(task: Task, micro_batches: Sequence[Any]) -> float:
        with autocast():
            towers = [task.towers(batch) for batch in micro_batches]
            if cfg.grad_cache or len(towers[0]) > 1:
                total = 0.0
                scale = 1.0 / len(micro_batches)
                for index, (batch, seqs) in enumerate(zip(micro_batches, towers)):
                    chunks = [s.chunks(cfg.grad_cache_chunk) if cfg.grad_cache else [s] for s in seqs]
                    total += grad_cache_pipeline_step(
                        pipeline, chunks, lambda outputs, b=batch: task.loss_from_outputs(outputs, b) * scale,
                        last_of_step=index == len(micro_batches) - 1,
                    ) / scale
                return total / len(micro_batches)
            loss_fns = [lambda rows, b=batch: task.loss_from_outputs([rows], b) for batch in micro_batches]
            return plain_pipeline_step(pipeline, [seqs[0] for seqs in towers], loss_fns)

    return forward_backward
