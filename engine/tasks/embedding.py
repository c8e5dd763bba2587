"""Bi-encoder: packed sequences -> pooled (normalised) embeddings -> InfoNCE.

With data parallelism (`dp_group` set by engine.parallel.parallelize) every rank's queries
are scored against the candidates of the whole global batch: documents (and, for the
query-query term, queries) are all-gathered with gradient, and this rank's queries own the
groups starting at rank * local batch.
"""
from __future__ import annotations

import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from engine.data.batch import EmbeddingBatch, PackedSequences
from engine.losses import info_nce
from engine.tasks.base import TaskModule
from engine.parallel.collectives import all_gather_with_grad


class EmbeddingTask(TaskModule):
    reads_lm_head = False  # pipeline stages: the last needs no LM head

    def __init__(self, backbone: nn.Module, cfg):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.dp_group = None  # the data-parallel process group, when there is one

    @property
    def pooling(self) -> str:
        return self.cfg.pooling

    def rows_from_pooled(self, pooled: Tensor) -> Tensor:
        # Under context parallelism each rank pools its own tokens; the sum over ranks is the whole.
        vectors = self.backbone.reduce_shards(pooled.float())
        return F.normalize(vectors, dim=-1) if self.cfg.normalize else vectors

    def loss_from_outputs(self, outputs: list[Tensor], batch: EmbeddingBatch) -> Tensor:
        queries, docs = outputs
        c = self.cfg
        all_queries, query_offset = None, 0
        if self.dp_group is not None:
            docs = all_gather_with_grad(docs, self.dp_group)
            all_queries = all_gather_with_grad(queries, self.dp_group) if c.query_query else None
            query_offset = dist.get_rank(self.dp_group) * queries.shape[0]
        return info_nce(
            queries, docs, group_size=batch.group_size, temperature=c.temperature,
            in_batch_negatives=c.in_batch_negatives,
            false_negative_margin=c.false_negative_margin if c.false_negative_mask else None,
            query_query=c.query_query, doc_doc=c.doc_doc, query_offset=query_offset, all_queries=all_queries,
        )

    def towers(self, batch: EmbeddingBatch) -> list[PackedSequences]:
        return [batch.queries, batch.docs]
