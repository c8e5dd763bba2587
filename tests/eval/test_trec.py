"""TREC run files: format, order, exact round trip, and pytrec_eval's parser."""
from __future__ import annotations

import random

import pytest
import pytrec_eval

from engine.eval.trec import TrecFormatError, read_trec_run, write_trec_run


def sample_run(seed=0):
    rng = random.Random(seed)
    run = {}
    for n in range(20):
        docs = [f"d{rng.randint(0, 60)}" for _ in range(rng.randint(0, 15))]
        # Ties and awkward floats (repr must survive the round trip exactly).
        run[f"q{n}"] = {doc: rng.choice([1.0, 0.1 + 0.2, -3e-12, rng.random()]) for doc in docs}
    return run


def expected_order(scores):
    return [doc for doc, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def test_lines_are_ranked_like_trec_eval_and_parse_back_exactly(tmp_path):
    run = sample_run()
    path = tmp_path / "out" / "run.trec"  # the folder is created
    write_trec_run(run, str(path), tag="mysys")

    lines = path.read_text().splitlines()
    by_query = {}
    for line in lines:
        qid, q0, doc, rank, score, tag = line.split(" ")
        assert (q0, tag) == ("Q0", "mysys")
        by_query.setdefault(qid, []).append((int(rank), doc, float(score)))
    for qid, scores in run.items():
        rows = by_query.get(qid, [])
        assert [r for r, _, _ in rows] == list(range(1, len(scores) + 1))
        assert [doc for _, doc, _ in rows] == expected_order(scores)

    with open(path) as f:
        parsed = pytrec_eval.parse_run(f)
    assert parsed == {qid: scores for qid, scores in run.items() if scores}
    assert read_trec_run(str(path)) == parsed


def test_depth_keeps_the_best_documents(tmp_path):
    run = sample_run(seed=1)
    path = str(tmp_path / "run.trec")
    write_trec_run(run, path, depth=3)
    back = read_trec_run(path)
    for qid, scores in run.items():
        assert list(back.get(qid, {})) == expected_order(scores)[:3]


def test_unwritable_ids_and_malformed_files(tmp_path):
    with pytest.raises(TrecFormatError, match="whitespace"):
        write_trec_run({"q 1": {"d": 1.0}}, str(tmp_path / "a"))
    with pytest.raises(TrecFormatError, match="depth"):
        write_trec_run({"q": {"d": 1.0}}, str(tmp_path / "a"), depth=0)
    bad = tmp_path / "bad.trec"
    bad.write_text("q1 Q0 d1 1 0.5 tag\nq1 Q0 d2 2 tag\n")
    with pytest.raises(TrecFormatError, match=r"bad.trec:2: expected 6 fields"):
        read_trec_run(str(bad))
    bad.write_text("q1 Q0 d1 1 high tag\n")
    with pytest.raises(TrecFormatError, match="not a number"):
        read_trec_run(str(bad))
