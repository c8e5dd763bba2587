"""Mistakes in what launch/mine.py and launch/score.py are handed: one line naming the key, file or
line, and exit code 2, before any model is encoded."""
from __future__ import annotations

import pytest

from tests.conftest import InProcess, write_jsonl


@pytest.fixture
def mine(capsys, monkeypatch):
    return InProcess(capsys, monkeypatch, "mine.py")


def assert_one_line(run, *fragments: str) -> None:
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("args, fragments", [
    ([], ["mine.output is required"]),
    (["mine.nonsense=1"], ["mine.nonsense", "not in the mine.* options"]),
    (["--num-negatives", "many"], ["mine.num_negatives", "'many'"]),
    (["mine.sampling_strategy=best"], ["mine.sampling_strategy='best'", "top, random"]),
    (["mine.output_format=triplets"], ["mine.output_format='triplets'"]),
    (["mine.num_negatives=0"], ["mine.num_negatives=0"]),
    (["mine.range_min=5", "mine.range_max=5"], ["mine.range_min=5 must be smaller than mine.range_max=5"]),
    (["mine.range_max=4", "mine.num_negatives=5"], ["mine.num_negatives=5 does not fit", "mine.range_max=4"]),
])
def test_bad_options(mine, tmp_path, mining_file, embedder_export, args, fragments):
    out = [] if not args else [f"mine.output={tmp_path / 'out.jsonl'}"]
    run = mine(f"model.path={embedder_export}", f"data.train={mining_file}", *out, *args)
    assert_one_line(run, *fragments)


def test_bad_files(mine, tmp_path, mining_file, embedder_export, reranker_export):
    out = f"mine.output={tmp_path / 'out.jsonl'}"
    assert_one_line(mine(f"model.path={embedder_export}", out), "data.train is required")
    assert_one_line(mine(f"model.path={embedder_export}", out, f"data.train=[{mining_file},{mining_file}]"),
                    "give one file here")
    assert_one_line(mine(f"data.train={mining_file}", out, "model.path=null"), "model.path is required")
    assert_one_line(mine(f"model.path={embedder_export}", f"data.train={tmp_path / 'none.jsonl'}", out),
                    "none.jsonl: no such file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "pos": ["b"]}\n{"query": "c"}\n')
    assert_one_line(mine(f"model.path={embedder_export}", f"data.train={bad}", out), f"{bad}:2:", "pos")
    assert_one_line(mine(f"model.path={tmp_path}", f"data.train={mining_file}", out),
                    f"model.path={tmp_path}: no config.json")
    assert_one_line(mine(f"model.path={reranker_export}", f"data.train={mining_file}", out),
                    f"model.path={reranker_export} is a reranker model here; an embedding model is needed")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "fine"}, {"title": "no text"}])
    assert_one_line(mine(f"model.path={embedder_export}", f"data.train={mining_file}", out, f"mine.corpus={corpus}"),
                    f"{corpus}:2:", '"text"')


def test_score_errors(capsys, monkeypatch, tmp_path, mining_file, embedder_export):
    score = InProcess(capsys, monkeypatch, "score.py")
    out = f"score.output={tmp_path / 'out.jsonl'}"
    assert_one_line(score(f"model.path={embedder_export}", f"data.train={mining_file}"), "score.output is required")
    assert_one_line(score(f"model.path={embedder_export}", f"data.train={mining_file}", out),
                    "is an embedding model here; a reranker model is needed")
    assert_one_line(score(f"model.path={embedder_export}", out, "score.batch_size=0"), "score.batch_size=0")


def test_help_lists_the_options(mine):
    run = mine("--help")
    assert run.returncode == 0
    for key in ("range_min", "relative_margin", "sampling_strategy", "reranker", "use_faiss", "output_format"):
        assert key in run.stdout
