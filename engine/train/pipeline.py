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

Order: the schedule's (parallel.pp_schedule: gpipe, 1f1b, interleaved), as the timeline of
engine/train/pipeline_timeline.py gives it tick by tick; each tick's transfers are posted in one
batch (p2p.py) and waited for only when an action needs the tensor, so a rank runs ahead while
its neighbours finish. The GradCache pipeline's first pass runs the schedule's forwards only.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from engine.data.batch import PackedSequences
from engine.parallel.pipeline.p2p import post
from engine.parallel.pipeline.stage import PipelineStage
from engine.train.grad_cache import RandContext
from engine.train.pipeline_timeline import Action, Tick, timeline


GradientSync = Callable[[int, bool, bool], None]  # (chunk, chunk_done, stage_done) -> None


class PipelineSchedule:
    """Runs micro-batches through this rank's chunks in the order of a schedule
    (engine/train/pipeline_timeline.py); ranks of `group` are the pp ranks in order."""

    def __init__(self, stage: PipelineStage, schedule: str, group: dist.ProcessGroup | None, dtype: torch.dtype,
                 device: torch.device, gradient_sync: GradientSync | None = None):
        """gradient_sync(chunk, chunk_done, stage_done), when given, runs before each backward: whether
        this backward is the step's last through the chunk and through this rank (engine/parallel/data.py's
        pipeline_gradient_sync: FSDP then reduces each unit's gradients once per step)."""
        self.stage, self.schedule, self.group, self.dtype, self.device = stage, schedule, group, dtype, device
        self.gradient_sync = gradient_sync

    def forward_only(self, micro_batches: Sequence[PackedSequences]) -> tuple[list[Tensor], dict]:
        """Each micro-batch through every stage without graphs. Returns the last stage's rows ([] on
        the others) and the RNG state before each forward, for forward_backward to replay."""
        run = _Run(self, micro_batches, graph=False)
        with torch.no_grad():
            run.through(timeline(self.schedule, self.stage.size, self.stage.virtual, len(micro_batches),
                                 forward_only=True)[self.stage.rank])
        rows = [run.rows[i] for i in range(len(micro_batches))] if self.stage.is_last else []
        return rows, run.states

    def forward_backward(self, micro_batches: Sequence[PackedSequences], seed: Callable[[int, Tensor], Tensor],
                         replay: dict | None = None, last_of_step: bool = True) -> None:
        """Forward and backward every micro-batch in the schedule's order (replaying the RNG state
        forward_only recorded, when given). On the last stage seed(index, rows) is the scalar whose
        backward starts each micro-batch's pass. last_of_step: no other pass follows before the
        optimizer step (gradients are reduced over dp in this one)."""
        ticks = timeline(self.schedule, self.stage.size, self.stage.virtual, len(micro_batches))[self.stage.rank]
        before_backward = None
        if self.gradient_sync is not None:
            last_of_chunk, last_of_rank = _last_backwards(ticks) if last_of_step else ({}, None)

            def before_backward(a: Action) -> None:
                self.gradient_sync(a.chunk, last_of_chunk.get(a.chunk) == a, last_of_rank == a)

        _Run(self, micro_batches, graph=True, seed=seed, replay=replay, before_backward=before_backward).through(ticks)

    def encode(self, seqs: PackedSequences) -> Tensor:
        """Forward only, the last stage's rows handed to every stage (evaluation: every rank ranks)."""
        rows, _ = self.forward_only([seqs])
        return broadcast_from_last(rows[0] if rows else None, self.stage, self.group, self.device)

    def share_loss(self, loss: float | None) -> float:
        """The last stage's loss, on every stage (for logging and the finite-loss check)."""
        value = torch.tensor([loss if self.stage.is_last else 0.0], dtype=torch.float64, device=self.device)
        dist.broadcast(value, group=self.group, group_src=self.stage.size - 1)
        return float(value)


class _Run:
    """One pass of a schedule over one rank's ticks: inputs that arrived, graphs kept for backward."""

    def __init__(self, schedule: PipelineSchedule, micro_batches: Sequence[PackedSequences], graph: bool,
                 seed: Callable[[int, Tensor], Tensor] | None = None, replay: dict | None = None,
                 before_backward: Callable[[Action], None] | None = None):
        self.schedule, self.micro_batches, self.graph, self.seed, self.replay = (
            schedule, micro_batches, graph, seed, replay)
        self.before_backward = before_backward
        self.inbox: dict[tuple[str, int, int], tuple[Tensor, list]] = {}  # (kind, chunk, micro) -> (buffer, works)
        self.sending: list[tuple[Tensor, list]] = []  # tensors being sent, with the works to wait for
        self.shapes: dict[int, tuple[int, ...]] = {}  # micro -> the hidden states' shape between stages
        self.saved: dict[tuple[int, int], tuple[Tensor | None, Tensor]] = {}  # (chunk, micro) -> (input, output)
        self.rows: dict[int, Tensor] = {}  # micro -> the last chunk's rows (forward only)
        self.states: dict[tuple[int, int], RandContext] = {}  # (chunk, micro) -> RNG state before its forward

    def through(self, ticks: Sequence[Tick]) -> None:
        s = self.schedule
        for tick in ticks:
            out = None
            if tick.action is not None:
                out = self._forward(tick.action) if tick.action.kind == "F" else self._backward(tick.action)
            if tick.sends or tick.recvs:
                self._post(tick, out)
        for _, waits in self.sending:
            for work in waits:
                work.wait()
        self.sending.clear()
        assert not self.inbox and not self.saved, "a pipeline pass ended with tensors no action consumed"

    def _post(self, tick: Tick, out: Tensor | None) -> None:
        """Start the tick's transfers: buffers sized from the micro-batch (every stage lays out the same
        stream), waited for only when an action needs them."""
        s = self.schedule
        for transfer in tick.sends:
            expected = self._shape(transfer.micro)
            if tuple(out.shape) != expected:
                raise RuntimeError(f"pipeline stage {s.stage.rank} would send shape {tuple(out.shape)} where the "
                                   f"next stage expects {expected} (PipelineStage.hidden_shape)")
        buffers = [torch.empty(self._shape(t.micro), dtype=s.dtype, device=s.device) for t in tick.recvs]
        waits = post([(out, t.dst) for t in tick.sends], [(b, t.src) for b, t in zip(buffers, tick.recvs)], s.group)
        self.sending += [(out, w) for w in waits[:len(tick.sends)]]  # the tensor stays alive until sent
        for transfer, buffer, w in zip(tick.recvs, buffers, waits[len(tick.sends):]):
            self.inbox[(transfer.kind, transfer.chunk, transfer.micro)] = (buffer, w)
        self.sending = [(t, w) for t, w in self.sending if not all(work.is_completed() for work in w)]

    def _shape(self, micro: int) -> tuple[int, ...]:
        if micro not in self.shapes:
            self.shapes[micro] = tuple(self.schedule.stage.hidden_shape(self.micro_batches[micro]))
        return self.shapes[micro]

    def _take(self, key: tuple[str, int, int]) -> Tensor:
        buffer, waits = self.inbox.pop(key)
        for work in waits:
            work.wait()
        return buffer

    def _forward(self, action: Action) -> Tensor | None:
        chunk = self.schedule.stage.chunk(action.chunk)
        received = None if chunk.embedding else self._take(("F", action.chunk, action.micro))
        if received is not None and self.graph:
            received.requires_grad_(True)
        key = (action.chunk, action.micro)
        if not self.graph:
            self.states[key] = RandContext()
        with self.replay[key] if self.replay is not None else contextlib.nullcontext():
            out = self.schedule.stage.forward(action.chunk, self.micro_batches[action.micro], received)
        if self.graph:
            self.saved[key] = (received, out)
        elif chunk.head:
            self.rows[action.micro] = out
        return None if chunk.head else out.detach()

    def _backward(self, action: Action) -> Tensor | None:
        chunk = self.schedule.stage.chunk(action.chunk)
        received, out = self.saved.pop((action.chunk, action.micro))  # its activations go after this
        if self.before_backward is not None:
            self.before_backward(action)
        if chunk.head:
            self.seed(action.micro, out).backward()
        else:
            out.backward(self._take(("B", action.chunk, action.micro)))
        return None if received is None else received.grad


def _last_backwards(ticks: Sequence[Tick]) -> tuple[dict[int, Action], Action | None]:
    """The last backward of each chunk in a pass, and of the whole pass on this rank."""
    backwards = [t.action for t in ticks if t.action is not None and t.action.kind == "B"]
    return {a.chunk: a for a in backwards}, (backwards[-1] if backwards else None)


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


def grad_cache_pipeline_step(schedule: PipelineSchedule, towers: Sequence[Sequence[PackedSequences]],
                             loss_fn: Callable[[list[Tensor]], Tensor], last_of_step: bool = True) -> float:
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
    schedule.forward_backward(chunks, lambda index, out: (out * grads[index]).sum(), replay=states,
                              last_of_step=last_of_step)
    return schedule.share_loss(loss)


def plain_pipeline_step(schedule: PipelineSchedule, micro_batches: Sequence[PackedSequences],
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
