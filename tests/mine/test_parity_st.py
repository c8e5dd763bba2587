"""launch/mine.py chooses, query by query, the negatives sentence-transformers' mine_hard_negatives
chooses with SentenceTransformer loaded from the same export and the same options: every filter,
range_min/range_max, top and random sampling (the same seed draws the same), faiss and exact."""
from __future__ import annotations

import json

import pytest

from tests.conftest import InProcess, write_jsonl
from tests.mine.conftest import mining_lines
from tests.mine.reference import ember_negatives, st_mine, st_negatives

pytest.importorskip("datasets", reason="sentence-transformers' mining needs the datasets package")

SEED = 7
SETTINGS = [
    {},
    {"range_min": 2, "range_max": 12, "num_negatives": 4},
    {"relative_margin": 0.01},
    {"absolute_margin": 0.0, "max_score": 0.85, "num_negatives": 5},
    {"min_score": 0.75, "range_max": 20},
    {"sampling_strategy": "random", "range_max": 15, "num_negatives": 4},
    {"sampling_strategy": "random", "relative_margin": 0.02, "range_min": 1, "num_negatives": 2},
]
# Each setting above makes the filter it names skip candidates on this data (checked below), so
# no setting passes by filtering nothing.
FILTERS = ("absolute_margin", "relative_margin", "max_score", "min_score")


@pytest.fixture(scope="module")
def st_model(embedder_export):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(embedder_export, device="cpu")


def mine_args(export, data, out, options: dict, use_faiss: bool) -> list[str]:
    return [f"model.path={export}", f"data.train={data}", f"mine.output={out}", f"mine.seed={SEED}",
            f"mine.use_faiss={str(use_faiss).lower()}", *(f"mine.{k}={v}" for k, v in options.items())]


@pytest.mark.parametrize("options", SETTINGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_same_negatives_as_sentence_transformers(tmp_path, capsys, monkeypatch, embedder_export, mining_file,
                                                  st_model, options):
    lines = mining_lines()
    mine = InProcess(capsys, monkeypatch, "mine.py")
    for use_faiss in (False, True):
        capsys.readouterr()
        expected = st_negatives(st_model, lines, seed=SEED, use_faiss=use_faiss, verbose=True, **options)
        st_report = capsys.readouterr().out
        out = tmp_path / f"faiss_{use_faiss}.jsonl"
        run = mine(*mine_args(embedder_export, mining_file, out, options, use_faiss))
        assert run.returncode == 0, run.stderr
        got = ember_negatives(str(out))
        assert {q: n for q, n in got.items() if n} == expected, f"use_faiss={use_faiss}"
        assert f"{'faiss' if use_faiss else 'exact'} search" in run.stdout
        # The same candidates skipped by each filter, counted and worded as sentence-transformers does.
        skipped = [line for line in run.stdout.splitlines() if line.startswith("Skipped")]
        assert skipped == [line for line in st_report.splitlines() if line.startswith("Skipped")]
        assert len(skipped) == sum(key in options for key in FILTERS)


def test_extra_corpus_and_output_formats_match(tmp_path, capsys, monkeypatch, embedder_export, mining_file, st_model):
    """An extra corpus (mine.corpus, sentence-transformers' corpus=): its texts are candidates too;
    n-tuple keeps the queries that found num_negatives; triplet has one line per triple."""
    lines = mining_lines()
    extra = [line["neg"][0] for line in lines if "neg" in line]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"_id": f"x{i}", "text": t} for i, t in enumerate(extra)])
    options = {"relative_margin": 0.01, "range_max": 30}
    mine = InProcess(capsys, monkeypatch, "mine.py")
    out = tmp_path / "lines.jsonl"
    assert mine(*mine_args(embedder_export, mining_file, out, options, False), f"mine.corpus={corpus}").returncode == 0
    expected = st_negatives(st_model, lines, corpus=extra, verbose=False, **options)
    got = ember_negatives(str(out))
    assert {q: n for q, n in got.items() if n} == expected
    assert any(n in extra for negs in got.values() for n in negs)
    # ids: the corpus file's ids for its texts.
    records = [json.loads(line) for line in open(out)]
    ids = {t: f"x{i}" for i, t in enumerate(extra)}
    for record in records:
        if "neg_ids" in record:
            assert all(ids.get(n, i) == i for n, i in zip(record["neg"], record["neg_ids"]))

    for st_format, ours in (("n-tuple", "n-tuple"), ("triplet", "triplet")):
        st_rows = st_mine(st_model, lines, corpus=extra, output_format=st_format, verbose=False, **options)
        path = tmp_path / f"{ours}.jsonl"
        run = mine(*mine_args(embedder_export, mining_file, path, options, False), f"mine.corpus={corpus}",
                   f"mine.output_format={ours}")
        assert run.returncode == 0, run.stderr
        records = [json.loads(line) for line in open(path)]
        if ours == "n-tuple":
            # sentence-transformers: one row per (query, positive) pair; Ember: the input's lines.
            kept = {row["query"] for row in st_rows}
            assert {r["query"] for r in records} == kept
            assert all(len(r["neg"]) == options.get("num_negatives", 3) for r in records)
        else:
            triples = sorted((r["query"], r["pos"][0], r["neg"][0]) for r in records)
            assert triples == sorted(set((row["query"], row["positive"], row["negative"]) for row in st_rows))
