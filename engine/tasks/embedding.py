"""Bi-encoder: packed sequences -> pooled (normalised) embeddings -> InfoNCE."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from engine.data.batch import EmbeddingBatch, PackedSequences
from engine.losses import info_nce
from engine.tasks.pooling import pool


class EmbeddingTask(nn.Module):
    def __init__(self, backbone: nn.Module, cfg):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg

    def embed(self, seqs: PackedSequences) -> Tensor:
        hidden = self.backbone(
            seqs.input_ids, position_ids=seqs.position_ids,
            cu_seqlens=seqs.cu_seqlens, max_seqlen=seqs.max_seqlen,
        )  # (total_tokens, H)
        vectors = pool(hidden, seqs.cu_seqlens, self.cfg.pooling).float()  # (num_seqs, H)
        return F.normalize(vectors, dim=-1) if self.cfg.normalize else vectors

    def loss_from_outputs(self, outputs: list[Tensor], batch: EmbeddingBatch) -> Tensor:
        queries, docs = outputs
        c = self.cfg
        return info_nce(
            queries, docs, group_size=batch.group_size, temperature=c.temperature,
            in_batch_negatives=c.in_batch_negatives, false_negative_margin=c.false_negative_margin if c.false_negative_mask else None,
            query_query=c.query_query, doc_doc=c.doc_doc,
        )

    def towers(self, batch: EmbeddingBatch) -> list[PackedSequences]:
        return [batch.queries, batch.docs]

    def encode_tower(self, seqs: PackedSequences) -> Tensor:
        return self.embed(seqs)

    def forward(self, batch: EmbeddingBatch) -> Tensor:
        return self.loss_from_outputs([self.embed(batch.queries), self.embed(batch.docs)], batch)
