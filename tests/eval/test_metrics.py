"""compute_metrics against pytrec_eval (trec_eval itself) on randomized runs with ties."""
from __future__ import annotations

import random
import string

import pytest
import pytrec_eval

from engine.eval.metrics import MetricsInputError, compute_metrics, rank_documents

MEASURES = {"recip_rank", "ndcg_cut.1,3,10", "recall.1,3,10", "map"}
KS = (1, 3, 10)


def random_doc_id(rng: random.Random) -> str:
    # Mixed case, digits and punctuation of varying length: tie-breaking by id must follow strcmp.
    alphabet = string.ascii_letters + string.digits + "_-."
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))


def random_case(seed: int, num_queries: int = 80):
    rng = random.Random(seed)
    qrels, run = {}, {}
    for n in range(num_queries):
        qid = f"q{n}"
        pool = list({random_doc_id(rng) for _ in range(rng.randint(1, 30))})
        kind = rng.random()
        if kind < 0.85:  # judged query: graded relevance, sometimes nothing relevant
            judged = rng.sample(pool, rng.randint(1, min(6, len(pool))))
            qrels[qid] = {doc: rng.choice([-1, 0, 0, 1, 1, 2, 3]) for doc in judged}
        if kind > 0.1:  # answered query (some runs hold queries the qrels do not know)
            # Few distinct scores, so ties are everywhere; sometimes an empty answer.
            retrieved = rng.sample(pool, rng.randint(0, len(pool)))
            run[qid] = {doc: float(rng.choice([0.5, 1.0, 1.0, 2.0, rng.random()])) for doc in retrieved}
    return run, qrels


def truncate_top_k(run, k):
    """Top k per query in trec_eval's order, written independently of rank_documents."""
    return {
        qid: dict(sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)[:k])
        for qid, scores in run.items()
    }


def pytrec_means(run, qrels):
    """pytrec_eval per query, averaged over the judged queries with 0 for unanswered ones."""
    judged = {qid: docs for qid, docs in qrels.items() if docs}
    per_query = pytrec_eval.RelevanceEvaluator(judged, MEASURES).evaluate(run)
    means = {}
    for k in KS:
        means[f"ndcg@{k}"] = sum(per_query.get(q, {}).get(f"ndcg_cut_{k}", 0.0) for q in judged) / len(judged)
        means[f"recall@{k}"] = sum(per_query.get(q, {}).get(f"recall_{k}", 0.0) for q in judged) / len(judged)
        # trec_eval's recip_rank has no cut-off: cut the run at k first.
        cut = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(truncate_top_k(run, k))
        means[f"mrr@{k}"] = sum(cut.get(q, {}).get("recip_rank", 0.0) for q in judged) / len(judged)
    means["map"] = sum(per_query.get(q, {}).get("map", 0.0) for q in judged) / len(judged)
    return means


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_pytrec_eval(seed):
    run, qrels = random_case(seed)
    ours = compute_metrics(run, qrels, ks=KS)
    theirs = pytrec_means(run, qrels)
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name


def test_untruncated_mrr_equals_trec_eval_recip_rank():
    run, qrels = random_case(seed=11)
    ours = compute_metrics(run, qrels, ks=(10_000,))
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)
    judged = [q for q in qrels if qrels[q]]
    expected = sum(per_query.get(q, {}).get("recip_rank", 0.0) for q in judged) / len(judged)
    assert ours["mrr@10000"] == pytest.approx(expected, abs=1e-9)


def test_tie_order_is_trec_evals():
    # All scores equal: trec_eval's rank of the one relevant doc reveals its order.
    rng = random.Random(3)
    for _ in range(50):
        ids = list({random_doc_id(rng) for _ in range(12)})
        ranking = rank_documents({doc: 1.0 for doc in ids})
        relevant = rng.choice(ids)
        result = pytrec_eval.RelevanceEvaluator({"q": {relevant: 1}}, {"recip_rank"}).evaluate(
            {"q": {doc: 1.0 for doc in ids}}
        )
        assert 1 / result["q"]["recip_rank"] == pytest.approx(ranking.index(relevant) + 1)


def test_unanswered_and_unjudged_queries():
    qrels = {"a": {"d1": 1}, "b": {"d2": 1}, "empty": {}}
    run = {"a": {"d1": 3.0, "d9": 1.0}, "zzz": {"d1": 1.0}}  # b unanswered, zzz unjudged
    metrics = compute_metrics(run, qrels, ks=(1,))
    # a is perfect, b scores 0; a query without judgments is not a query (trec_eval).
    assert metrics == {"mrr@1": 0.5, "ndcg@1": 0.5, "recall@1": 0.5, "map": 0.5}


def test_bad_cutoff():
    with pytest.raises(MetricsInputError, match="cut-offs"):
        compute_metrics({}, {"q": {"d": 1}}, ks=(0, 10))
