"""Pipeline schedules: micro-batches through the stages of engine/parallel/pipeline, and the GradCache
pipeline that keeps the whole global batch as negatives.

A standard pipeline computes the loss per micro-batch on the last stage, so an InfoNCE query would
only see its own micro-batch's candidates. The GradCache pipeline runs the stages twice:
1. forward only, every micro-batch (a chunk of a tower) through all stages, no activations kept;
   the last stage then holds every output row of the batch, computes the global loss (gathering
   over dp inside the task's loss) and its gradient per row;
2. forward again with graphs, each chunk replaying the RNG state it had in pass 1 (dropout draws
   the same masks), and backward from `<rows, cached gradient>` on the last stage.
The parameter gradients equal those of one graph over the whole global batch. A reranker's loss
stays inside a query group, so it runs the plain schedule: micro-batches of whole groups, each
with its own loss on the last stage.

Order: GPipe (every micro-batch forward, then every backward, last first), on blocking
point-to-point transfers (p2p.py) in the same order on every stage, so every send meets its
receive. 1F1B and interleaving, which bound the activations kept to pp micro-batches, are the next
schedules to add (issue 10).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from engine.data.batch import PackedSequences
from engine.parallel.pipeline.p2p import recv_from, send_to
from engine.parallel.pipeline.stage import PipelineStage
from engine.train.grad_cache import RandContext


class GPipeSchedule:
    """Runs micro-batches through this rank's stage; ranks of `group` are the stages in order."""

    def __init__(self, stage: PipelineStage, group: dist.ProcessGroup | None, dtype: torch.dtype,
                 device: torch.device):
        self.stage, self.group, self.dtype, self.device = stage, group, dtype, device

    def _forward(self, seqs: PackedSequences, keep_graph: bool) -> tuple[Tensor | None, Tensor]:
        stage = self.stage
        received = None
        if not stage.is_first:
            received = recv_from(stage.rank - 1, self.group, self.dtype, self.device)
            received.requires_grad_(keep_graph)
        out = stage.forward(seqs, received)
        if not stage.is_last:
            send_to(out.detach(), stage.rank + 1, self.group)
        return received, out

    def forward_only(self, micro_batches: Sequence[PackedSequences]) -> tuple[list[Tensor], list[RandContext]]:
        """Each micro-batch through every stage without graphs. Returns the last stage's rows ([] on
        the others) and each micro-batch's RNG state before its forward, for forward_backward to replay."""
        rows, states = [], []
        with torch.no_grad():
            for seqs in micro_batches:
                states.append(RandContext())
                rows.append(self._forward(seqs, keep_graph=False)[1])
        return (rows if self.stage.is_last else []), states

    def forward_backward(self, micro_batches: Sequence[PackedSequences], seed: Callable[[int, Tensor], Tensor],
                         replay: Sequence[RandContext] | None = None) -> None:
        """Forward every micro-batch with its graph (replaying its RNG state when given), then backward,
        last micro-batch first. On the last stage seed(index, rows) is the scalar whose backward starts
        each micro-batch's pass."""
        saved = []
        for index, seqs in enumerate(micro_batches):
            with replay[index] if replay is not None else contextlib.nullcontext():
                saved.append(self._forward(seqs, keep_graph=True))
        stage = self.stage
        for index in reversed(range(len(saved))):
            received, out = saved[index]
            if stage.is_last:
                seed(index, out).backward()
            else:
                out.backward(recv_from(stage.rank + 1, self.group, self.dtype, self.device))
            if not stage.is_first:
                send_to(received.grad, stage.rank - 1, self.group)
            saved[index] = None  # this micro-batch's activations go now, not at the end of the step

    def encode(self, seqs: PackedSequences) -> Tensor:
        """Forward only, the last stage's rows handed to every stage (evaluation: every rank ranks)."""
        rows, _ = self.forward_only([seqs])
        return broadcast_from_last(rows[0] if rows else None, self.stage, self.group, self.device)

    def share_loss(self, loss: float | None) -> float:
        """The last stage's loss, on every stage (for logging and the finite-loss check)."""
        value = torch.tensor([loss if self.stage.is_last else 0.0], dtype=torch.float64, device=self.device)
        dist.broadcast(value, group=self.group, group_src=self.stage.size - 1)
        return float(value)


def broadcast_from_last(rows: Tensor | None, stage: PipelineStage, group, device: torch.device) -> Tensor:
    """The last stage's float32 rows on every stage of the group (shape first: it changes per batch)."""
    last = stage.size - 1
    shape = torch.zeros(2, dtype=torch.int64, device=device)
    if stage.is_last:
        rows = rows.float().reshape(len(rows), -1)
        shape[0], shape[1] = rows.shape
    dist.broadcast(shape, group=group, group_src=last)
    if not stage.is_last:
        rows = torch.empty(int(shape[0]), int(shape[1]), dtype=torch.float32, device=device)
    dist.broadcast(rows, group=group, group_src=last)
    return rows.squeeze(-1) if int(shape[1]) == 1 else rows


def grad_cache_pipeline_step(schedule: GPipeSchedule, towers: Sequence[Sequence[PackedSequences]],
                             loss_fn: Callable[[list[Tensor]], Tensor]) -> float:
    """One step's gradients for a loss over every tower's whole output (InfoNCE over the global batch).

    towers: each tower's chunks (the micro-batches); loss_fn([tower outputs]) runs on the last stage.
    Accumulates into .grad like loss.backward() would; returns the loss on every stage."""
    chunks = [seqs for tower in towers for seqs in tower]
    # 1. Forward only, remembering each chunk's RNG state.
    rows, states = schedule.forward_only(chunks)
    loss, grads = None, []
    if schedule.stage.is_last:
        # 2. The loss over the whole batch, and its gradient per output row, cut back into chunks.
        counts = [len(r) for r in rows]
        leaves, start = [], 0
        for tower in towers:
            leaves.append(torch.cat(rows[start:start + len(tower)]).requires_grad_(True))
            start += len(tower)
        loss_value = loss_fn(leaves)
        loss_value.backward()
        loss = float(loss_value.detach())
        start = 0
        for tower, leaf in zip(towers, leaves):
            grads.extend(leaf.grad.split(counts[start:start + len(tower)]))
            start += len(tower)
    # 3. Forward again with graphs (the same RNG draws), backward from <rows, cached gradient>.
    schedule.forward_backward(chunks, lambda index, out: (out * grads[index]).sum(), replay=states)
    return schedule.share_loss(loss)


def plain_pipeline_step(schedule: GPipeSchedule, micro_batches: Sequence[PackedSequences],
                        loss_fns: Sequence[Callable[[Tensor], Tensor]]) -> float:
    """Micro-batches each with its own loss on the last stage (a reranker's whole query groups):
    the step's loss is their mean. Returns it on every stage."""
    losses = []

    def seed(index: int, rows: Tensor) -> Tensor:
        loss = loss_fns[index](rows)
        losses.append(float(loss.detach()))
        return loss / len(micro_batches)

    schedule.forward_backward(micro_batches, seed)
    return schedule.share_loss(sum(losses) / len(losses) if losses else None)
