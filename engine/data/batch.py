"""The tensors that flow from the collator into a task: packed sequences and task batches.

Every sequence of a batch sits in one flat token stream; `cu_seqlens` marks where each
one starts (flash-attn's varlen convention), and positions restart at 0 per sequence.
There is no padding anywhere: attention is varlen and pooling reads the boundaries.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass
class PackedSequences:
    input_ids: Tensor  # (total_tokens,) int64
    position_ids: Tensor  # (total_tokens,) int64, restarting at 0 for each sequence
    cu_seqlens: Tensor  # (num_seqs + 1,) int32, cu_seqlens[i]:cu_seqlens[i+1] is sequence i
    max_seqlen: int

    @staticmethod
    def from_token_lists(sequences: list[list[int]]) -> "PackedSequences":
        if not sequences or any(len(s) == 0 for s in sequences):
            raise ValueError("cannot pack an empty sequence (every sequence needs at least one token)")
        lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int32)
        cu_seqlens = torch.zeros(len(sequences) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
        input_ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
        position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths.tolist()])
        return PackedSequences(input_ids, position_ids, cu_seqlens, int(lengths.max()))

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def seqlens(self) -> Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def select(self, start: int, end: int) -> "PackedSequences":
        """Sequences start..end-1 as their own packed batch (grad-cache chunks use this)."""
        t0, t1 = int(self.cu_seqlens[start]), int(self.cu_seqlens[end])
        cu = self.cu_seqlens[start : end + 1] - self.cu_seqlens[start]
        lengths = cu[1:] - cu[:-1]
        return PackedSequences(
            self.input_ids[t0:t1], self.position_ids[t0:t1], cu, int(lengths.max())
        )

    @staticmethod
    def concat(parts: list["PackedSequences"]) -> "PackedSequences":
        """One stream holding every part's sequences in order (the towers of a step, encoded together)."""
        offsets = torch.cumsum(torch.tensor([0] + [p.num_tokens for p in parts[:-1]]), 0).tolist()
        cu_seqlens = torch.cat([parts[0].cu_seqlens[:1]] + [p.cu_seqlens[1:] + o for p, o in zip(parts, offsets)])
        return PackedSequences(
            torch.cat([p.input_ids for p in parts]), torch.cat([p.position_ids for p in parts]),
            cu_seqlens, max(p.max_seqlen for p in parts),
        )

    def chunks(self, seqs_per_chunk: int) -> list["PackedSequences"]:
        return [
            self.select(i, min(i + seqs_per_chunk, self.num_seqs))
            for i in range(0, self.num_seqs, seqs_per_chunk)
        ]

    def to(self, device: torch.device | str) -> "PackedSequences":
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            position_ids=self.position_ids.to(device),
            cu_seqlens=self.cu_seqlens.to(device),
        )


@dataclass
class EmbeddingBatch:
    """B queries and, for each, a group of 1 positive followed by n hard negatives.

    docs holds B * group_size sequences: query i's group is docs[i*G:(i+1)*G], positive first.
    """

    queries: PackedSequences
    docs: PackedSequences
    group_size: int  # G = 1 + number of hard negatives per query
    teacher_scores: Tensor | None = None  # (B, G) float, when the data carries scores (task.loss=distill)

    @property
    def num_queries(self) -> int:
        return self.queries.num_seqs

    @property
    def num_tokens(self) -> int:
        return self.queries.num_tokens + self.docs.num_tokens

    def to(self, device) -> "EmbeddingBatch":
        return replace(self, queries=self.queries.to(device), docs=self.docs.to(device),
                       teacher_scores=None if self.teacher_scores is None else self.teacher_scores.to(device))


@dataclass
class RerankerBatch:
    """B groups of (query + document) pairs, G per group, positive first in each group."""

    pairs: PackedSequences  # B * G sequences
    group_size: int
    teacher_scores: Tensor | None = None  # (B, G) float, when the data carries scores
    labels: Tensor | None = field(default=None)  # (B, G) float 1/0, positive first by default

    @property
    def num_queries(self) -> int:
        return self.pairs.num_seqs // self.group_size

    @property
    def num_tokens(self) -> int:
        return self.pairs.num_tokens

    def to(self, device) -> "RerankerBatch":
        return replace(
            self,
            pairs=self.pairs.to(device),
            teacher_scores=None if self.teacher_scores is None else self.teacher_scores.to(device),
            labels=None if self.labels is None else self.labels.to(device),
        )
