"""Bi-encoder: packed sequences -> pooled (normalised) embeddings -> InfoNCE, or KL to a teacher's
scores over each query's own candidates (task.loss=distill); with task.matryoshka_dims, the loss
again on each truncated, renormalised prefix of the vectors (summed with its weight).

With data parallelism (`dp_group` set by engine.parallel.parallelize) every rank's queries
are scored against the candidates of the whole global batch: documents (and, for the
query-query term, queries) are all-gathered with gradient, and this rank's queries own the
groups starting at rank * local batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from engine.data.batch import EmbeddingBatch, PackedSequences
from engine.config import matryoshka_terms, task_loss
from engine.losses import distill_kl, info_nce
from engine.model.pooling import vector_prefix
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
        all_queries, all_docs, query_offset = None, docs, 0
        if self.dp_group is not None and task_loss(c) == "infonce":
            all_docs = all_gather_with_grad(docs, self.dp_group)
            all_queries = all_gather_with_grad(queries, self.dp_group) if c.query_query else None
            query_offset = dist.get_rank(self.dp_group) * queries.shape[0]
        # Matryoshka: the same loss on the first d dimensions of every vector, for each d; the full size first.
        loss = None
        for dim, weight in [(None, 1.0), *matryoshka_terms(c)]:
            own_queries, own_docs = self._prefix(queries, dim), self._prefix(docs, dim)
            # Without a gather (one rank, or distillation) the candidates are this rank's own documents.
            candidates = own_docs if all_docs is docs else self._prefix(all_docs, dim)
            part = self._loss(own_queries, own_docs, candidates, self._prefix(all_queries, dim), batch, query_offset)
            loss = weight * part if loss is None else loss + weight * part
        return loss

    def _prefix(self, vectors: Tensor | None, dim: int | None) -> Tensor | None:
        """The first `dim` dimensions, renormalised when the task normalises (all of them for None)."""
        if vectors is None or dim is None:
            return vectors
        return vector_prefix(vectors, dim, self.cfg.normalize)

    def _loss(self, queries: Tensor, docs: Tensor, all_docs: Tensor, all_queries: Tensor | None,
              batch: EmbeddingBatch, query_offset: int) -> Tensor:
        c = self.cfg
        if task_loss(c) == "distill":
            # Each query against its own candidates only (the teacher scored those): (B, G) logits.
            groups = docs.view(queries.shape[0], batch.group_size, -1)
            logits = torch.einsum("bh,bgh->bg", queries, groups) / c.temperature
            if batch.teacher_scores is None:
                raise ValueError("task.loss=distill needs teacher scores (pos_scores/neg_scores) on every training line")
            return distill_kl(logits, batch.teacher_scores, temperature=c.distill_temperature)
        return info_nce(
            queries, all_docs, group_size=batch.group_size, temperature=c.temperature,
            in_batch_negatives=c.in_batch_negatives,
            false_negative_margin=c.false_negative_margin if c.false_negative_mask else None,
            query_query=c.query_query, doc_doc=c.doc_doc, query_offset=query_offset, all_queries=all_queries,
        )

    def towers(self, batch: EmbeddingBatch) -> list[PackedSequences]:
        return [batch.queries, batch.docs]
