"""Eval sets (ids, dedup, qrels) and the embedding / reranker evaluations, checked with pytrec_eval."""
from __future__ import annotations

import math
import random

import pytest
import pytrec_eval
import torch

from engine.data.example import Example
from engine.eval.retrieval import EvalDataError, build_eval_set, evaluate_embedding, evaluate_reranker
from engine.eval.trec import read_trec_run

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def bag_of_characters(text: str) -> list[float]:
    counts = [float(text.count(ch)) for ch in LETTERS]
    norm = math.sqrt(sum(c * c for c in counts)) or 1.0
    return [c / norm for c in counts]


def dot(a: str, b: str) -> float:
    return sum(x * y for x, y in zip(bag_of_characters(a), bag_of_characters(b)))


class FakeEncoder:
    """Deterministic bag-of-characters embeddings; remembers the size of every call."""

    def __init__(self):
        self.calls = []

    def queries(self, examples):
        self.calls.append(len(examples))
        return torch.tensor([bag_of_characters(e.query) for e in examples])

    def documents(self, texts):
        self.calls.append(len(texts))
        return torch.tensor([bag_of_characters(t) for t in texts])

    def pairs(self, examples, texts):
        self.calls.append(len(texts))
        assert len(examples) == len(texts)
        return torch.tensor([dot(e.query, t) for e, t in zip(examples, texts)])


def fruit_examples():
    return [
        Example("apple pie", ["apple pie recipe"], ["banana bread", "cherry tart"], line=1),
        Example("banana", ["banana bread"], ["apple pie recipe", "date cake"], line=2),
        Example("cherry", ["cherry tart", "cherry jam"], [], line=3),
    ]


def test_ids_follow_line_order_and_first_appearance():
    s = build_eval_set(fruit_examples())
    assert s.qids == ["q0", "q1", "q2"]
    assert [e.query for e in s.queries] == ["apple pie", "banana", "cherry"]
    assert s.corpus_texts == ["apple pie recipe", "banana bread", "cherry tart", "date cake", "cherry jam"]
    assert s.doc_ids == ["d0", "d1", "d2", "d3", "d4"]
    assert s.qrels == {
        "q0": {"d0": 1, "d1": 0, "d2": 0},
        "q1": {"d1": 1, "d0": 0, "d3": 0},
        "q2": {"d2": 1, "d4": 1},
    }
    assert s.candidates == [[0, 1, 2], [1, 0, 3], [2, 4]]


def test_ids_carried_by_the_data_are_used_and_lines_of_one_query_merge():
    examples = [
        Example("how tall", ["10 m"], ["3 m"], query_id="Q7", pos_ids=["P1"], neg_ids=["N1"], line=1),
        Example("how tall", ["12 m"], [], query_id="Q7", pos_ids=["P2"], line=2),
        Example("how wide", ["3 m"], ["10 m"], query_id="Q8", pos_ids=["N1"], neg_ids=["X9"], line=3),
    ]
    s = build_eval_set(examples)
    assert s.qids == ["Q7", "Q8"] and len(s.queries) == 2
    # Same text, different ids: the data says they are different documents.
    assert s.doc_ids == ["P1", "N1", "P2", "X9"]
    assert s.corpus_texts == ["10 m", "3 m", "12 m", "10 m"]
    assert s.qrels == {"Q7": {"P1": 1, "N1": 0, "P2": 1}, "Q8": {"N1": 1, "X9": 0}}


@pytest.mark.parametrize(
    "examples, message",
    [
        ([Example("a", ["x"], pos_ids=["D"], line=1), Example("b", ["y"], pos_ids=["D"], line=2)],
         "line 2: document id 'D' names a different text than on line 1"),
        ([Example("a", ["x"], query_id="Q", line=1), Example("b", ["y"], query_id="Q", line=4)],
         "line 4: query id 'Q' names a different query than on line 1"),
        ([Example("a", ["x", "y"], pos_ids=["d1"], line=5)], "line 5: pos_ids has 1 ids for 2 documents"),
        # "y", the second distinct text, would be d1: an id the data already gave to "x".
        ([Example("a", ["x"], pos_ids=["d1"], line=1), Example("b", ["y"], line=2)], "generated document id d1"),
        ([], "empty"),
    ],
)
def test_inconsistent_eval_data_is_rejected(examples, message):
    with pytest.raises(EvalDataError, match=message):
        build_eval_set(examples)


def random_examples(num_queries: int, corpus_size: int, seed: int, docs_per_query: int = 4):
    rng = random.Random(seed)
    words = ["".join(rng.choice(LETTERS[:10]) for _ in range(rng.randint(2, 6))) for _ in range(corpus_size)]
    examples = []
    for n in range(num_queries):
        docs = rng.sample(words, docs_per_query)
        query = docs[0][: max(1, len(docs[0]) - 1)] + rng.choice(LETTERS[:10])
        examples.append(Example(query, docs[:1], docs[1:], line=n + 1))
    return examples


def pytrec_mean(run, qrels, measure, cut=None):
    if cut is not None:  # trec_eval's recip_rank is not cut: cut the run first
        run = {q: dict(sorted(s.items(), key=lambda i: (i[1], i[0]), reverse=True)[:cut]) for q, s in run.items()}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {measure}).evaluate(run)
    key = measure.replace(".", "_")
    return sum(per_query.get(q, {}).get(key, 0.0) for q in qrels) / len(qrels)


def test_embedding_evaluation_ranks_the_whole_corpus(tmp_path):
    examples = random_examples(num_queries=25, corpus_size=40, seed=0)
    encoder, path = FakeEncoder(), str(tmp_path / "emb.trec")
    metrics = evaluate_embedding(encoder.queries, encoder.documents, examples, ks=(1, 10), save_run=path, batch_size=7)

    s = build_eval_set(examples)
    assert max(encoder.calls) <= 7 and sum(encoder.calls) == len(s.queries) + len(s.corpus_texts)
    run = read_trec_run(path)
    # Corpus smaller than the run depth: every query ranks every document, scored by dot product.
    for qid, example in zip(s.qids, s.queries):
        assert len(run[qid]) == len(s.corpus_texts)
        for doc_id, text in zip(s.doc_ids, s.corpus_texts):
            assert run[qid][doc_id] == pytest.approx(dot(example.query, text), abs=1e-6)

    assert metrics["map"] == pytest.approx(pytrec_mean(run, s.qrels, "map"), abs=1e-6)
    for k in (1, 10):
        assert metrics[f"ndcg@{k}"] == pytest.approx(pytrec_mean(run, s.qrels, f"ndcg_cut.{k}"), abs=1e-6)
        assert metrics[f"recall@{k}"] == pytest.approx(pytrec_mean(run, s.qrels, f"recall.{k}"), abs=1e-6)
        assert metrics[f"mrr@{k}"] == pytest.approx(pytrec_mean(run, s.qrels, "recip_rank", cut=k), abs=1e-6)
    assert 0 < metrics["mrr@10"] < 1  # a real ranking, neither trivial nor empty


def test_embedding_run_keeps_the_top_100_and_its_ties(tmp_path):
    examples = random_examples(num_queries=6, corpus_size=400, seed=1, docs_per_query=40)
    encoder, path = FakeEncoder(), str(tmp_path / "deep.trec")
    evaluate_embedding(encoder.queries, encoder.documents, examples, ks=(1, 10), save_run=path)
    s, run = build_eval_set(examples), read_trec_run(path)
    assert len(s.corpus_texts) > 100
    ties_at_the_cut = 0
    for qid, example in zip(s.qids, s.queries):
        scores = [dot(example.query, text) for text in s.corpus_texts]
        hundredth = sorted(scores, reverse=True)[99]
        kept = set(run[qid])
        # Exact in float64; the engine's float32 may only disagree within rounding of the cut.
        assert {d for d, x in zip(s.doc_ids, scores) if x > hundredth + 1e-6} <= kept
        assert not kept & {d for d, x in zip(s.doc_ids, scores) if x < hundredth - 1e-6}
        assert len(kept) >= 100
        ties_at_the_cut += len(kept) > 100
    assert ties_at_the_cut  # the tie rule was exercised


def test_reranker_evaluation_scores_each_querys_own_candidates(tmp_path):
    examples = random_examples(num_queries=15, corpus_size=30, seed=2)
    encoder, path = FakeEncoder(), str(tmp_path / "rerank.trec")
    metrics = evaluate_reranker(encoder.pairs, examples, ks=(1, 3), save_run=path, batch_size=4)

    s, run = build_eval_set(examples), read_trec_run(path)
    assert max(encoder.calls) <= 4
    for qid, example, candidates in zip(s.qids, s.queries, s.candidates):
        assert set(run[qid]) == {s.doc_ids[c] for c in candidates} == set(s.qrels[qid])
        for c in candidates:
            assert run[qid][s.doc_ids[c]] == pytest.approx(dot(example.query, s.corpus_texts[c]), abs=1e-6)
    for k in (1, 3):
        assert metrics[f"ndcg@{k}"] == pytest.approx(pytrec_mean(run, s.qrels, f"ndcg_cut.{k}"), abs=1e-6)
        assert metrics[f"recall@{k}"] == pytest.approx(pytrec_mean(run, s.qrels, f"recall.{k}"), abs=1e-6)
        assert metrics[f"mrr@{k}"] == pytest.approx(pytrec_mean(run, s.qrels, "recip_rank", cut=k), abs=1e-6)
    assert metrics["map"] == pytest.approx(pytrec_mean(run, s.qrels, "map"), abs=1e-6)


def test_encoder_returning_the_wrong_number_of_rows_is_reported():
    with pytest.raises(EvalDataError, match="returned shape"):
        evaluate_embedding(lambda qs: torch.zeros(1, 3), lambda ds: torch.zeros(len(ds), 3), fruit_examples())
    with pytest.raises(EvalDataError, match="scores for"):
        evaluate_reranker(lambda qs, ds: torch.zeros(1), fruit_examples())


def test_query_ids_are_zero_based_file_lines_even_with_blank_and_skipped_lines(tmp_path):
    from engine.data.formats import load_examples

    path = tmp_path / "eval.jsonl"
    path.write_text('{not json\n{"query": "a", "pos": ["x"]}\n\n{"query": "b", "pos": ["y"]}\n')
    examples = load_examples(str(path), on_error="skip", warn=lambda message: None)
    assert build_eval_set(examples).qids == ["q1", "q3"]
