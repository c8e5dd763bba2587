"""Examples -> a packed task batch: pick each query's group, tokenize, pack into one stream.

A group is [one positive] + task.num_negatives negatives, positive first; query i's group is
docs[i*G:(i+1)*G] (embedding) or pairs[i*G:(i+1)*G] (reranker). Nothing is reordered:
the task reads groups by position. Every sequence of the micro-batch goes into one flat
PackedSequences (cu_seqlens, positions restarting per sequence), so there is no padding.

Which positive and negatives a query gets is a pure function of (seed, step, position in
the batch), so a resumed run collates the very same batches.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from engine.data.batch import EmbeddingBatch, PackedSequences, RerankerBatch
from engine.data.example import Example
from engine.data.formats import DataError
from engine.data.sampler import choose_negatives, choose_positive
from engine.data.tokenize import TextEncoder


class Collator:
    def __init__(self, encoder: TextEncoder, task_cfg, seed: int, warn: Callable[[str], None] = print):
        self.encoder = encoder
        self.task = task_cfg
        self.seed = seed
        self.warn = warn
        self._warned_borrowing = False

    @property
    def group_size(self) -> int:
        return 1 + self.task.num_negatives

    def __call__(self, examples: list[Example], step: int, first_position: int = 0,
                 rows: range | None = None) -> EmbeddingBatch | RerankerBatch:
        """`first_position`: where `examples` start in the step's global batch (an accumulation
        chunk's offset), so the choices do not depend on the layout. `rows`: collate only these
        examples (a data-parallel rank's share) while negatives borrowed from other queries
        still come from the whole list, as they would in one process."""
        if not examples:
            raise DataError("cannot collate an empty batch")
        rows = range(len(examples)) if rows is None else rows
        groups = [self._group(examples, i, step, first_position + i) for i in rows]
        chosen = [examples[i] for i in rows]
        if self.task.type == "reranker":
            return self._reranker_batch(chosen, groups)
        return self._embedding_batch(chosen, groups)

    # ---- groups ------------------------------------------------------------------------

    def _group(self, examples: list[Example], i: int, step: int, position: int) -> "_Group":
        example = examples[i]
        p = choose_positive(example, self.seed, step, position)
        texts = [example.positives[p]]
        scores = [example.pos_scores[p]] if example.pos_scores is not None else None
        n = self.task.num_negatives
        if n == 0:
            return _Group(texts, scores)
        if example.negatives:
            chosen = choose_negatives(example, n, self.seed, step, position)
            texts += [example.negatives[k] for k in chosen]
            if scores is not None and example.neg_scores is not None:
                scores += [example.neg_scores[k] for k in chosen]
            else:
                scores = None  # a group with any unscored member has no teacher distribution
            return _Group(texts, scores)
        return _Group(texts + self._borrowed_negatives(examples, i, n), None)

    def _borrowed_negatives(self, examples: list[Example], i: int, n: int) -> list[str]:
        """Negatives for an example that has none, from the next examples of the batch (wrapping):
        their negatives, never a text that is a positive of any query of the batch (it would be
        trained as a negative of its own query); failing that, their first positives that are not
        this query's. Deterministic, and other queries' documents are plausible negatives."""
        others = [examples[(i + k) % len(examples)] for k in range(1, len(examples))]
        batch_positives = {text for e in examples for text in e.positives}
        pool = [text for other in others for text in other.negatives if text not in batch_positives]
        if not pool:
            own = set(examples[i].positives)
            pool = [other.positives[0] for other in others if other.positives[0] not in own]
        if not pool:
            raise DataError(
                f"{examples[i].where}: the example has no negatives and the batch has no other example to "
                "borrow them from; add negatives to the data, raise train.batch_size, or set task.num_negatives=0"
            )
        if not self._warned_borrowing:
            self._warned_borrowing = True
            self.warn(
                f"{examples[i].where} (and maybe others) has no negatives: using other documents of the same "
                "batch as its negatives"
            )
        return [pool[k % len(pool)] for k in range(n)]

    # ---- batches -----------------------------------------------------------------------

    def _embedding_batch(self, examples: list[Example], groups: list["_Group"]) -> EmbeddingBatch:
        query_ids = self.encoder.queries([e.query for e in examples], [e.prompt for e in examples])
        doc_ids = self.encoder.documents([text for g in groups for text in g.texts])  # B * G, group-major
        return EmbeddingBatch(
            queries=PackedSequences.from_token_lists(query_ids),
            docs=PackedSequences.from_token_lists(doc_ids),
            group_size=self.group_size,
            teacher_scores=_teacher_scores(groups),
        )

    def _reranker_batch(self, examples: list[Example], groups: list["_Group"]) -> RerankerBatch:
        G = self.group_size
        queries = [e.query for e in examples for _ in range(G)]
        prompts = [e.prompt for e in examples for _ in range(G)]
        pair_ids = self.encoder.pairs(queries, [text for g in groups for text in g.texts], prompts)
        labels = torch.zeros(len(examples), G)  # (B, G)
        labels[:, 0] = 1.0  # the positive leads every group
        return RerankerBatch(
            pairs=PackedSequences.from_token_lists(pair_ids), group_size=G, teacher_scores=_teacher_scores(groups),
            labels=labels,
        )


def _teacher_scores(groups: list["_Group"]) -> torch.Tensor | None:
    """(B, G) float32 teacher scores when every group is scored, else None."""
    if not all(g.scores is not None for g in groups):
        return None
    return torch.tensor([g.scores for g in groups], dtype=torch.float32)


class _Group:
    """One query's candidate texts (positive first) and their teacher scores, if all known."""

    __slots__ = ("texts", "scores")

    def __init__(self, texts: list[str], scores: list[float] | None):
        self.texts = texts
        self.scores = scores


# ---- evaluation helpers -----------------------------------------------------------------


def embed_texts_batches(
    encoder: TextEncoder,
    texts: list[str],
    is_query: bool,
    batch_size: int,
    prompts: list[str | None] | None = None,
) -> Iterator[PackedSequences]:
    """Queries (templated with their instruction) or documents, batch_size per packed batch, in order."""
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        if is_query:
            chunk_prompts = None if prompts is None else prompts[start : start + batch_size]
            ids = encoder.queries(chunk, chunk_prompts)
        else:
            ids = encoder.documents(chunk)
        yield PackedSequences.from_token_lists(ids)


def pair_batches(
    encoder: TextEncoder,
    queries: list[str],
    documents: list[str],
    batch_size: int,
    prompts: list[str | None] | None = None,
) -> Iterator[PackedSequences]:
    """(query, document) reranker inputs, batch_size pairs per packed batch, in order."""
    if len(queries) != len(documents):
        raise ValueError(f"pair_batches: {len(queries)} queries but {len(documents)} documents")
    for start in range(0, len(queries), batch_size):
        end = start + batch_size
        chunk_prompts = None if prompts is None else prompts[start:end]
        yield PackedSequences.from_token_lists(encoder.pairs(queries[start:end], documents[start:end], chunk_prompts))
