"""mine.reranker: candidates the reranker scores above the query's (lowest) positive, less
mine.reranker_margin, are dropped; the rest are chosen in the embedder's order as before."""
from __future__ import annotations

import re

import numpy as np
import pytest

from engine import Embedder, Reranker
from tests.conftest import InProcess, write_jsonl
from tests.mine.conftest import mining_lines
from tests.mine.reference import ember_negatives

NUM_NEGATIVES = 3
CLOSE = 1e-6  # reranker scores of one pair agree to ~1e-7 however pairs are batched; closer calls are skipped


def expected_choice(embedder_export, reranker_export, lines, margin: float):
    """Worked out from the public APIs: rank the whole corpus by cosine, veto by the reranker.
    ({query: negatives} for the queries with no call within CLOSE of the bar, candidates dropped,
    live candidates, close calls)."""
    queries = list(dict.fromkeys(line["query"] for line in lines))
    corpus = list(dict.fromkeys(p for line in lines for p in line["pos"]))
    positives = {q: {p for line in lines if line["query"] == q for p in line["pos"]} for q in queries}
    embedder, reranker = Embedder.from_pretrained(embedder_export), Reranker.from_pretrained(reranker_export)
    q_vecs, d_vecs = embedder.encode(queries, is_query=True), embedder.encode(corpus)
    cosine = (q_vecs / np.linalg.norm(q_vecs, axis=1, keepdims=True)) @ \
        (d_vecs / np.linalg.norm(d_vecs, axis=1, keepdims=True)).T
    chosen, dropped, live, close = {}, 0, 0, 0
    for row, query in enumerate(queries):
        scores = dict(zip(corpus, reranker.score(query, corpus)))
        bar = min(scores[p] for p in positives[query]) - margin
        candidates = [corpus[i] for i in np.argsort(-cosine[row], kind="stable")
                      if corpus[i] not in positives[query] and corpus[i] != query]
        vetoed = [doc for doc in candidates if scores[doc] > bar]
        dropped, live = dropped + len(vetoed), live + len(candidates)
        near = sum(abs(scores[d] - bar) <= CLOSE for d in candidates)
        close += near
        if not near:
            chosen[query] = [doc for doc in candidates if doc not in vetoed][:NUM_NEGATIVES]
    return chosen, dropped, live, close


@pytest.mark.parametrize("margin", [0.0, 0.002])
def test_reranker_drops_what_it_scores_above_the_positive(tmp_path, capsys, monkeypatch, embedder_export,
                                                         reranker_export, margin):
    lines = mining_lines(16)
    data = write_jsonl(tmp_path / "train.jsonl", lines)
    out = tmp_path / "mined.jsonl"
    # range_max past the corpus size: every text is a candidate, so the choice is the best survivors.
    run = InProcess(capsys, monkeypatch, "mine.py")(
        f"model.path={embedder_export}", f"data.train={data}", f"mine.output={out}", "mine.range_max=30",
        f"mine.num_negatives={NUM_NEGATIVES}", f"--reranker={reranker_export}", f"--reranker-margin={margin}")
    assert run.returncode == 0, run.stderr
    chosen, dropped, live, close = expected_choice(embedder_export, reranker_export, lines, margin)
    assert len(chosen) >= 0.8 * len(set(line["query"] for line in lines))
    got = ember_negatives(str(out))
    assert {q: got[q] for q in chosen} == chosen
    assert 0 < dropped < live  # the veto bites, and leaves some
    report = re.search(r"Reranker: dropped ([\d,]+) of ([\d,]+) candidates", run.stdout)
    assert report and int(report[2].replace(",", "")) == live
    assert abs(int(report[1].replace(",", "")) - dropped) <= close
