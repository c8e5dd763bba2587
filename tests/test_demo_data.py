"""The demo's FAQ splits: determinism, disjointness, FlagEmbedding format, negatives, BM25."""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest

from engine.demo import faq
from engine.demo.faq import BM25, DemoDataError, write_faq_splits

REPO_ROOT = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def normalized(question: str) -> str:
    return " ".join(question.split()).lower()


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> tuple[list[dict], list[dict], Path]:
    out = tmp_path_factory.mktemp("demo")
    train_path, test_path = write_faq_splits(out, test_fraction=0.2, num_negatives=3, seed=0)
    return read_jsonl(train_path), read_jsonl(test_path), out


def test_same_seed_gives_identical_files_and_another_seed_another_split(tmp_path):
    first = write_faq_splits(tmp_path / "a", seed=7)
    again = write_faq_splits(tmp_path / "b", seed=7)
    other = write_faq_splits(tmp_path / "c", seed=8)
    for path_a, path_b in zip(first, again):
        assert path_a.read_bytes() == path_b.read_bytes()
    test_ids = {line["query_id"] for line in read_jsonl(first[1])}
    assert test_ids != {line["query_id"] for line in read_jsonl(other[1])}


def test_second_call_with_same_params_skips_and_new_params_rewrite(tmp_path):
    train_path, test_path = write_faq_splits(tmp_path, num_negatives=2)
    stamps = (train_path.stat().st_mtime_ns, train_path.stat().st_ino, test_path.stat().st_ino)
    write_faq_splits(tmp_path, num_negatives=2)
    assert (train_path.stat().st_mtime_ns, train_path.stat().st_ino, test_path.stat().st_ino) == stamps
    write_faq_splits(tmp_path, num_negatives=4)
    assert train_path.stat().st_ino != stamps[1]  # replaced by rename, never edited in place
    assert all(len(line["neg"]) == 4 for line in read_jsonl(train_path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["params"]["num_negatives"] == 4
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_train_and_test_questions_are_disjoint_and_cover_the_dataset(splits):
    train, test, out = splits
    records = faq.faq_records()
    train_questions = {normalized(line["query"]) for line in train}
    test_questions = {normalized(line["query"]) for line in test}
    assert not train_questions & test_questions
    assert train_questions | test_questions == {normalized(r["q"]) for r in records}
    # Every FAQ answer is the positive of exactly one query, in one split.
    positive_ids = Counter(pid for line in train + test for pid in line["pos_ids"])
    assert positive_ids == Counter(r["id"] for r in records)
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert (counts["train_queries"], counts["test_queries"]) == (len(train), len(test))
    assert len(test) == round(0.2 * (len(train) + len(test)))


def test_split_is_stratified_by_category(splits):
    train, test, _ = splits
    category = {r["id"]: r["category"] for r in faq.faq_records()}
    per_category = Counter(category[line["query_id"]] for line in train + test)
    in_test = Counter(category[line["query_id"]] for line in test)
    share = len(test) / (len(train) + len(test))
    for cat, size in per_category.items():
        assert abs(in_test[cat] - size * share) < 1, cat  # largest-remainder: within one of the fair share


def test_repeated_questions_become_one_query_with_every_answer_as_positive(splits):
    train, test, _ = splits
    records = faq.faq_records()
    answers_by_question = Counter(normalized(r["q"]) for r in records)
    repeated = {q for q, n in answers_by_question.items() if n > 1}
    assert repeated, "the dataset has repeated questions; this test needs one"
    for line in train + test:
        assert len(line["pos"]) == answers_by_question[normalized(line["query"])]


def test_every_line_is_flag_embedding_format(splits):
    train, test, out = splits
    for line in train + test:
        assert set(line) == {"query", "pos", "neg", "query_id", "pos_ids", "neg_ids"}
        assert isinstance(line["query"], str) and line["query"]
        for key in ("pos", "neg", "pos_ids", "neg_ids"):
            assert isinstance(line[key], list) and all(isinstance(x, str) and x for x in line[key])
        assert len(line["pos"]) == len(line["pos_ids"]) >= 1
        assert len(line["neg"]) == len(line["neg_ids"]) == 3
    try:
        formats = importlib.import_module("engine.data.formats")
    except ImportError:
        return  # the loader is another engineer's and may not exist yet; the json checks above stand
    for name, lines in (("train.jsonl", train), ("test.jsonl", test)):
        examples = list(formats.load_examples(str(out / name)))
        assert [(e.query, e.positives, e.negatives, e.query_id) for e in examples] == [
            (l["query"], l["pos"], l["neg"], l["query_id"]) for l in lines
        ]


def test_negatives_never_equal_a_positive_and_stay_inside_their_split(splits):
    train, test, _ = splits
    for lines in (train, test):
        split_answers = {pid for line in lines for pid in line["pos_ids"]}
        for line in lines:
            assert not set(line["neg"]) & set(line["pos"])
            assert not set(line["neg_ids"]) & set(line["pos_ids"])
            assert len(set(line["neg_ids"])) == len(line["neg_ids"])
            assert set(line["neg_ids"]) <= split_answers


def test_negatives_are_the_bm25_closest_other_answers(splits):
    train, test, _ = splits
    for lines in (train, test):
        texts = {pid: text for line in lines for pid, text in zip(line["pos_ids"], line["pos"])}
        ids = sorted(texts)
        index = BM25([texts[i] for i in ids])
        for line in lines[:25]:
            scores = dict(zip(ids, index.scores(line["query"])))
            others = sorted((scores[i] for i in ids if i not in line["pos_ids"]), reverse=True)
            assert [scores[i] for i in line["neg_ids"]] == pytest.approx(others[:3])


def test_bm25_matches_a_hand_computed_value():
    index = BM25(["red apple pie", "green apple", "blue sky"], k1=1.2, b=0.75)
    # N = 3 documents, average length 7/3. "red": df = 1, tf = 1 in doc 0 (3 tokens).
    idf_red = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
    expected_red = idf_red * 1 * 2.2 / (1 + 1.2 * (1 - 0.75 + 0.75 * 3 / (7 / 3)))
    # "apple": df = 2; doc 1 has 2 tokens.
    idf_apple = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))
    expected_apple_doc1 = idf_apple * 2.2 / (1 + 1.2 * (0.25 + 0.75 * 2 / (7 / 3)))
    assert index.scores("red") == pytest.approx([expected_red, 0.0, 0.0], rel=1e-12)
    assert index.scores("Apple!")[1] == pytest.approx(expected_apple_doc1, rel=1e-12)
    assert index.scores("unseen words") == [0.0, 0.0, 0.0]


def test_bm25_ranks_the_document_sharing_a_rare_word_first():
    docs = [
        "The building permit is handled by the municipality.",
        "The roof of the building needs a permit from the municipality.",
        "Radon levels in the basement are measured over two months.",
        "The municipality decides on the permit for the building.",
    ]
    scores = BM25(docs).scores("How is radon measured in a building?")
    assert max(range(len(docs)), key=scores.__getitem__) == 2


def test_bad_parameters_raise_clear_errors(tmp_path):
    with pytest.raises(DemoDataError, match="test_fraction"):
        write_faq_splits(tmp_path, test_fraction=1.0)
    with pytest.raises(DemoDataError, match="num_negatives"):
        write_faq_splits(tmp_path, num_negatives=-1)


def test_missing_package_tells_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "zaragoza_construction_faq", None)  # makes the import fail
    with pytest.raises(DemoDataError, match="pip install --no-deps zaragoza-construction-faq"):
        faq.faq_records()


def test_cli_writes_the_splits_and_then_converts_the_model(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("prepare_demo", REPO_ROOT / "launch" / "prepare_demo.py")
    prepare_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_demo)
    converted = []
    import engine.model.gguf as gguf

    fake = lambda cache_dir: converted.append(cache_dir) or Path(cache_dir) / "smollm2"  # noqa: E731
    monkeypatch.setattr(gguf, "ensure_smollm2", fake)
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))

    assert prepare_demo.main(["--skip-model"]) == 0
    assert converted == []
    assert prepare_demo.main([]) == 0
    assert converted == [tmp_path / "cache"]
    printed = capsys.readouterr().out
    assert str(tmp_path / "cache" / "demo" / "train.jsonl") in printed
    assert "queries" in printed and "smollm2" in printed
