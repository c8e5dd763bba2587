"""What both tasks share: a tower through the backbone and the task's head, whole (encode_tower)
or one pipeline stage's part of it (encode_stage), and the loss of a batch (forward).

Both are methods of the task (not of a stage object) because FSDP gathers the root's parameters
(embedding, final norm, heads) around registered methods of the root module (engine/parallel/data.py).
A task says only how it pools (`pooling`), what its head makes of the pooled rows
(`rows_from_pooled`), its towers and its loss (engine/tasks/protocol.py).
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from engine.data.batch import PackedSequences


class TaskModule(nn.Module):
    backbone: nn.Module
    pooling: str

    def rows_from_pooled(self, pooled: Tensor) -> Tensor:
        raise TypeError(f"{type(self).__name__} must define rows_from_pooled")

    def encode_tower(self, seqs: PackedSequences) -> Tensor:
        """(num_seqs, ...) float32: the head's row for each sequence of the stream."""
        return self._rows(seqs)

    def forward(self, batch) -> Tensor:
        # Through _rows, not encode_tower: under FSDP both are registered forwards of the root, and
        # one must not run inside the other.
        return self.loss_from_outputs(encode_together(self._rows, self.towers(batch)), batch)

    def _rows(self, seqs: PackedSequences) -> Tensor:
        pooled = self.backbone(
            seqs.input_ids, position_ids=seqs.position_ids,
            cu_seqlens=seqs.cu_seqlens, max_seqlen=seqs.max_seqlen, pooling=self.pooling,
        )  # (num_seqs, H)
        return self.rows_from_pooled(pooled)

    def hidden_shape(self, seqs: PackedSequences) -> tuple[int, int]:
        """The residual stream's shape on this rank for these sequences (between pipeline stages)."""
        backbone = self.backbone
        return backbone.hidden_shape(backbone.lay_out(seqs.input_ids, seqs.position_ids, seqs.cu_seqlens,
                                                      seqs.max_seqlen))

    def encode_stage(self, seqs: PackedSequences, received: Tensor | None, layers: list[nn.Module],
                     first: bool, last: bool) -> Tensor:
        """One pipeline stage of encode_tower: the first stage embeds, each runs `layers`, the last
        finishes (final norm, pooling) and applies the head. Every stage lays out the same stream."""
        backbone = self.backbone
        stream = backbone.lay_out(seqs.input_ids, seqs.position_ids, seqs.cu_seqlens, seqs.max_seqlen)
        x = backbone.embed(stream) if first else received
        x = backbone.run_layers(x, stream, layers)
        return self.rows_from_pooled(backbone.finish(x, stream, self.pooling)) if last else x


def encode_together(encode: Callable[[PackedSequences], Tensor], towers: list[PackedSequences]) -> list[Tensor]:
    """Each tower's rows, from one pass of all towers packed as one stream: the rows a pass per
    tower gives, with half the layer calls for two towers and taller matmuls (on the demo step,
    CPU: docs/performance.md, "Profile of the training step")."""
    if len(towers) == 1:
        return [encode(towers[0])]
    rows = encode(PackedSequences.concat(towers))
    return list(rows.split([seqs.num_seqs for seqs in towers]))
