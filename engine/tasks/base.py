"""What both tasks share: running one pipeline stage's part of a tower.

encode_stage is a method of the task (not of the stage object) because FSDP gathers the root's
parameters (embedding, final norm, heads) around a registered method of the root module: it is
registered beside encode_tower (engine/parallel/data.py).
"""
from __future__ import annotations

from torch import Tensor, nn

from engine.data.batch import PackedSequences


class TaskModule(nn.Module):
    backbone: nn.Module
    pooling: str

    def rows_from_pooled(self, pooled: Tensor) -> Tensor:
        raise TypeError(f"{type(self).__name__} must define rows_from_pooled")

    def encode_stage(self, seqs: PackedSequences, received: Tensor | None, layers: list[nn.Module],
                     first: bool, last: bool) -> Tensor:
        """One pipeline stage of encode_tower: the first stage embeds, each runs `layers`, the last
        finishes (final norm, pooling) and applies the head. Every stage lays out the same stream."""
        backbone = self.backbone
        stream = backbone.lay_out(seqs.input_ids, seqs.position_ids, seqs.cu_seqlens, seqs.max_seqlen)
        x = backbone.embed(stream) if first else received
        x = backbone.run_layers(x, stream, layers)
        return self.rows_from_pooled(backbone.finish(x, stream, self.pooling)) if last else x
