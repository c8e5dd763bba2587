"""Retrieval evaluation on held-out examples: build ids and qrels, rank, score with trec_eval's metrics.

Ids: a query is `qN` (the N-th example of the eval file, 0-based) and a document `dN` (the
N-th distinct text of the corpus, in order of first appearance, each line's positives before
its negatives), unless the data carries ids (Example.query_id, pos_ids, neg_ids), which are
then used as they are. Positives have relevance 1, the line's negatives 0 (judged, not relevant).

- Embedding models rank the whole deduplicated corpus for every query (dense retrieval).
- Rerankers rescore each query's own candidates, its positives and negatives.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine.data.example import Example
from engine.eval.metrics import compute_metrics
from engine.eval.trec import write_trec_run
from engine.model.pooling import vector_prefix

MIN_RUN_DEPTH = 100  # documents kept per query in the run, unless a larger k needs more


class EvalDataError(ValueError):
    """The eval examples cannot be turned into a consistent corpus and qrels."""


@dataclass
class EvalSet:
    queries: list[Example]  # one per query id, in order of first appearance
    qids: list[str]
    corpus_texts: list[str]  # deduplicated documents
    doc_ids: list[str]  # parallel to corpus_texts
    qrels: dict[str, dict[str, int]]  # qid -> {doc id: 1 positive | 0 negative}
    candidates: list[list[int]] = field(default_factory=list)  # per query: corpus indices, positives first


class _CorpusBuilder:
    """Deduplicates documents: by id when the data gives one, else by text."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.ids: list[str] = []
        self.index_of_id: dict[str, int] = {}
        self.index_of_text: dict[str, int] = {}
        self.line_of_id: dict[str, int] = {}

    def add(self, text: str, doc_id: str | None, line: int) -> int:
        if doc_id is None:
            if text in self.index_of_text:
                return self.index_of_text[text]
            doc_id = f"d{len(self.texts)}"
            if doc_id in self.index_of_id:
                raise EvalDataError(
                    f"eval data line {line}: the generated document id {doc_id} is already an id in the data "
                    "(give ids for every document or for none)"
                )
        elif doc_id in self.index_of_id:
            index = self.index_of_id[doc_id]
            if self.texts[index] != text:
                raise EvalDataError(
                    f"eval data line {line}: document id {doc_id!r} names a different text than on line "
                    f"{self.line_of_id[doc_id]}"
                )
            return index
        index = len(self.texts)
        self.texts.append(text)
        self.ids.append(doc_id)
        self.index_of_id[doc_id] = index
        self.index_of_text.setdefault(text, index)
        self.line_of_id[doc_id] = line
        return index


def build_eval_set(examples: Sequence[Example]) -> EvalSet:
    """Queries, deduplicated corpus and qrels of the eval examples (ids as in the module docstring)."""
    if not examples:
        raise EvalDataError("the eval set is empty: no examples to evaluate")
    corpus = _CorpusBuilder()
    queries: list[Example] = []
    qids: list[str] = []
    candidates: list[list[int]] = []
    qrels: dict[str, dict[str, int]] = {}
    first_of_qid: dict[str, int] = {}
    for n, ex in enumerate(examples):
        # qN is line N of the file (0-based), so ids stay put when blank or skipped lines are present.
        qid = ex.query_id if ex.query_id is not None else f"q{ex.line - 1 if ex.line > 0 else n}"
        if qid in first_of_qid:
            # Several lines of one query (one line per positive, say) add to the same judgments.
            first = queries[first_of_qid[qid]]
            if first.query != ex.query:
                raise EvalDataError(
                    f"eval data line {ex.line}: query id {qid!r} names a different query than on line {first.line}"
                )
            position = first_of_qid[qid]
        else:
            position = first_of_qid[qid] = len(queries)
            queries.append(ex)
            qids.append(qid)
            candidates.append([])
            qrels[qid] = {}
        judged = qrels[qid]
        for text, doc_id, relevance in _judged_documents(ex):
            index = corpus.add(text, doc_id, ex.line)
            if corpus.ids[index] not in judged:
                candidates[position].append(index)
            judged[corpus.ids[index]] = max(judged.get(corpus.ids[index], 0), relevance)
    return EvalSet(queries, qids, corpus.texts, corpus.ids, qrels, candidates)


def _judged_documents(ex: Example) -> list[tuple[str, str | None, int]]:
    out = []
    groups = ((ex.positives, ex.pos_ids, 1, "pos_ids"), (ex.negatives, ex.neg_ids, 0, "neg_ids"))
    for texts, ids, relevance, name in groups:
        if ids is not None and len(ids) != len(texts):
            raise EvalDataError(
                f"eval data line {ex.line}: {name} has {len(ids)} ids for {len(texts)} documents"
            )
        out += [(text, None if ids is None else str(ids[i]), relevance) for i, text in enumerate(texts)]
    return out


def evaluate_embedding(
    encode_queries: Callable[[list[Example]], Tensor],
    encode_documents: Callable[[list[str]], Tensor],
    examples: Sequence[Example],
    ks: Sequence[int] = (1, 10),
    save_run: str | None = None,
    batch_size: int = 64,
    prefix_dims: Sequence[int] = (),
    normalize: bool = True,
) -> dict[str, float]:
    """Embed every query and the whole corpus, rank the corpus by dot product, score the ranking.

    The encoders get at most `batch_size` items per call and return (n, H) embeddings
    (normalised when the model is configured to normalise; scores are plain dot products).
    prefix_dims (Matryoshka): the same metrics again for the first d dimensions of every vector
    (renormalised when `normalize`), named `dim{d}/{metric}`; the run file holds the full size's ranking.
    """
    eval_set = build_eval_set(examples)
    depth = max(MIN_RUN_DEPTH, *ks)
    with torch.no_grad():
        query_vectors = _encode_in_batches(encode_queries, eval_set.queries, batch_size)  # (Q, H)
        doc_vectors = _encode_in_batches(encode_documents, eval_set.corpus_texts, batch_size)  # (D, H)
        run = rank_corpus(query_vectors, doc_vectors, eval_set.qids, eval_set.doc_ids, depth)
    if save_run:
        write_trec_run(run, save_run)
    metrics = compute_metrics(run, eval_set.qrels, ks)
    for dim in prefix_dims:
        prefix_run = rank_corpus(vector_prefix(query_vectors, dim, normalize), vector_prefix(doc_vectors, dim, normalize),
                                 eval_set.qids, eval_set.doc_ids, depth)
        metrics.update({f"dim{dim}/{name}": value for name, value in compute_metrics(prefix_run, eval_set.qrels, ks).items()})
    return metrics


def evaluate_reranker(
    score_pairs: Callable[[list[Example], list[str]], Tensor],
    examples: Sequence[Example],
    ks: Sequence[int] = (1, 10),
    save_run: str | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """Score each query against its own positives and negatives, rank by score, score the ranking.

    score_pairs(queries, documents) gets at most `batch_size` pairs (the query's Example
    repeated once per document) and returns one score per pair, shape (n,).
    """
    eval_set = build_eval_set(examples)
    pairs = [(i, doc) for i, docs in enumerate(eval_set.candidates) for doc in docs]
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            out = score_pairs([eval_set.queries[i] for i, _ in chunk], [eval_set.corpus_texts[d] for _, d in chunk])
            out = out.detach().float().reshape(-1).cpu()
            if out.numel() != len(chunk):
                raise EvalDataError(f"score_pairs returned {out.numel()} scores for {len(chunk)} pairs")
            scores += out.tolist()
    run: dict[str, dict[str, float]] = {qid: {} for qid in eval_set.qids}
    for (i, doc), score in zip(pairs, scores):
        run[eval_set.qids[i]][eval_set.doc_ids[doc]] = score
    if save_run:
        write_trec_run(run, save_run)
    return compute_metrics(run, eval_set.qrels, ks)


def _encode_in_batches(encode: Callable[[list], Tensor], items: list, batch_size: int) -> Tensor:
    if batch_size < 1:
        raise EvalDataError(f"eval batch size must be >= 1, got {batch_size}")
    parts = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        vectors = encode(chunk)
        if vectors.dim() != 2 or vectors.shape[0] != len(chunk):
            raise EvalDataError(f"an encoder returned shape {tuple(vectors.shape)} for {len(chunk)} inputs")
        parts.append(vectors.detach().float())
    return torch.cat(parts)  # (len(items), H)


def rank_corpus(
    query_vectors: Tensor, doc_vectors: Tensor, qids: list[str], doc_ids: list[str], depth: int,
    queries_per_block: int = 256,
) -> dict[str, dict[str, float]]:
    """Top-`depth` documents of each query by dot product, as a run (qid -> {doc id: score}).

    Documents tied with the depth-th score are all kept, so the run ranks its top `depth`
    exactly as trec_eval would rank the full corpus (ties broken by doc id).
    """
    doc_vectors = doc_vectors.to(query_vectors.device)
    keep = min(depth, doc_vectors.shape[0])
    if keep < 1:
        return {qid: {} for qid in qids}
    run: dict[str, dict[str, float]] = {}
    for start in range(0, query_vectors.shape[0], queries_per_block):
        scores = (query_vectors[start : start + queries_per_block] @ doc_vectors.T).cpu()  # (block, D)
        cutoffs = scores.topk(keep, dim=1).values[:, -1]  # (block,): each query's depth-th best score
        for row, cutoff, qid in zip(scores, cutoffs, qids[start : start + queries_per_block]):
            kept = (row >= cutoff).nonzero().flatten().tolist()
            run[qid] = {doc_ids[d]: float(row[d]) for d in kept}
    return run
