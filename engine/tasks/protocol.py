"""What every task is to the trainer, the schedules, evaluation and FSDP: a contract, not duck typing.

A batch is made of towers (an embedding task has a query and a document tower, a reranker one
tower of pairs), encoded together as one packed stream or one by one (engine/tasks/base.py
encode_together); each tower's output is one row per sequence (a pooled vector, a score); the
loss is computed from all towers' outputs at once. Schedules rely on exactly that split: GradCache
caches the outputs' gradient and replays encode_tower chunk by chunk, a pipeline runs encode_tower's
backbone across stages, and FSDP gathers the root's parameters around encode_tower.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor
from torch.distributed import ProcessGroup

from engine.data.batch import PackedSequences


@runtime_checkable
class Task(Protocol):
    backbone: Any  # engine.model.transformer.Transformer (or its parallel form)
    # The data-parallel group when there is one, else None (engine.parallel.parallelize sets it):
    # losses gather candidates over it, evaluation splits its queries over it.
    dp_group: ProcessGroup | None
    # How the backbone pools each sequence for this task ("last", "mean", "cls").
    pooling: str
    # Whether the head reads the LM head's rows (then a pipeline's last stage holds the LM head).
    reads_lm_head: bool

    def towers(self, batch: Any) -> list[PackedSequences]:
        """The batch's sequences, one packed stream per tower."""

    def encode_tower(self, seqs: PackedSequences) -> Tensor:
        """(num_seqs, ...) float32: one output row per sequence of the stream; the same as
        rows_from_pooled(backbone(seqs..., pooling=self.pooling))."""

    def rows_from_pooled(self, pooled: Tensor) -> Tensor:
        """The task's head on the backbone's pooled rows: what a pipeline's last stage applies."""

    def hidden_shape(self, seqs: PackedSequences) -> tuple[int, int]:
        """The residual stream's shape on this rank between pipeline stages (engine/tasks/base.py)."""

    def encode_stage(self, seqs: PackedSequences, received: Tensor | None, layers: list, first: bool,
                     last: bool) -> Tensor:
        """One pipeline stage's part of encode_tower (engine/tasks/base.py)."""

    def loss_from_outputs(self, outputs: list[Tensor], batch: Any) -> Tensor:
        """The mean loss of this rank's share of the batch, from every tower's output."""
