"""The demo's retrieval data: English Swedish-construction FAQ pairs as FlagEmbedding JSONL.

Source: the PyPI wheel `zaragoza-construction-faq` (Swedish Construction FAQ by Zaragoza AB,
CC BY 4.0, DOI 10.5281/zenodo.19630803): 503 question/answer records in 39 categories.

What `write_faq_splits` makes of it:
- Records that ask the very same question (a handful do, with differently worded answers) become
  one query with every such answer as a positive, so no query is scored against its own twin.
- A seeded, category-stratified shuffle sends `test_fraction` of the questions to a held-out test
  split; the rest train.
- Hard negatives are the answers (within the same split) that a small Okapi BM25 over lowercase
  word tokens ranks closest to the question, the question's own answers excluded; exact score ties
  prefer the same category, because those are the harder negatives. Test lines carry negatives from
  the held-out answers only, so the evaluation corpus (every candidate of every test line) is
  exactly the held-out answers and no training text leaks into it.
- Files are written atomically with a manifest of the parameters and counts; a second call with
  the same parameters and dataset version leaves them untouched.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

# Bump when the output of this module changes for the same parameters, so stale caches rebuild.
FORMAT_VERSION = 1
TRAIN_FILE = "train.jsonl"
TEST_FILE = "test.jsonl"
MANIFEST_FILE = "manifest.json"

_INSTALL_HINT = "pip install --no-deps zaragoza-construction-faq"


class DemoDataError(ValueError):
    """A user-facing problem preparing the demo data; launchers print it as one line."""


@dataclass(frozen=True)
class FaqQuestion:
    """One distinct question and every answer the dataset gives for it."""

    query_id: str  # id of the first record asking it
    category: str
    question: str
    answers: tuple[str, ...]
    answer_ids: tuple[str, ...]


def _faq_package():
    try:
        import zaragoza_construction_faq
    except ImportError as err:
        raise DemoDataError(
            f"the demo data needs the package zaragoza-construction-faq: {_INSTALL_HINT}"
        ) from err
    return zaragoza_construction_faq


def faq_dataset_version() -> str:
    return str(getattr(_faq_package(), "__version__", "unknown"))


def faq_records() -> list[dict]:
    """The English records (id, category, q, a, sources, related_service), in package order."""
    records = _faq_package().load(lang="en")
    if not records:
        raise DemoDataError("zaragoza-construction-faq returned no English records: reinstall it with " + _INSTALL_HINT)
    return records


def group_by_question(records: list[dict]) -> list[FaqQuestion]:
    """One FaqQuestion per distinct question text, ordered by query id."""
    by_text: dict[str, list[dict]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r["id"]):
        by_text[" ".join(record["q"].split()).lower()].append(record)
    questions = [
        FaqQuestion(
            query_id=group[0]["id"],
            category=group[0]["category"],
            question=group[0]["q"].strip(),
            answers=tuple(r["a"].strip() for r in group),
            answer_ids=tuple(r["id"] for r in group),
        )
        for group in by_text.values()
    ]
    return sorted(questions, key=lambda q: q.query_id)


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens; \\w is Unicode-aware, so Swedish terms like 'takläggning' stay whole."""
    return re.findall(r"\w+", text.lower())


class BM25:
    """Okapi BM25 over a fixed list of documents (Lucene's non-negative idf).

    score(q, d) = sum over query tokens t of
        idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl)),
    idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5)).
    A query token that repeats counts each time, as in rank_bm25.
    """

    def __init__(self, documents: list[str], k1: float = 1.2, b: float = 0.75):
        if not documents:
            raise DemoDataError("BM25 needs at least one document")
        self.k1, self.b = k1, b
        token_lists = [tokenize(doc) for doc in documents]
        self.num_docs = len(token_lists)
        self.doc_lens = [len(tokens) for tokens in token_lists]
        self.avg_doc_len = max(sum(self.doc_lens) / self.num_docs, 1e-9)
        # Postings (term -> [(doc, tf)]) so a query touches only the documents sharing its terms.
        self.postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for doc, tokens in enumerate(token_lists):
            for term, tf in Counter(tokens).items():
                self.postings[term].append((doc, tf))

    def idf(self, term: str) -> float:
        df = len(self.postings.get(term, ()))
        return math.log(1.0 + (self.num_docs - df + 0.5) / (df + 0.5))

    def scores(self, query: str) -> list[float]:
        """BM25 score of `query` against every document, in document order."""
        totals = [0.0] * self.num_docs
        for term in tokenize(query):
            idf = self.idf(term)
            for doc, tf in self.postings.get(term, ()):
                length_norm = 1.0 - self.b + self.b * self.doc_lens[doc] / self.avg_doc_len
                totals[doc] += idf * tf * (self.k1 + 1.0) / (tf + self.k1 * length_norm)
        return totals


def _test_counts_per_category(sizes: dict[str, int], test_fraction: float, rng: random.Random) -> dict[str, int]:
    """Largest-remainder apportionment: the total hits round(N * fraction) even when every
    category alone would round to zero, and each category gets its fair share."""
    total = sum(sizes.values())
    target = min(max(round(total * test_fraction), 1), total - 1)
    quotas = {cat: n * target / total for cat, n in sizes.items()}
    counts = {cat: math.floor(q) for cat, q in quotas.items()}
    # Seeded shuffle first so equal remainders are broken by the seed, not by category name.
    order = sorted(sizes)
    rng.shuffle(order)
    order.sort(key=lambda cat: quotas[cat] - counts[cat], reverse=True)
    for cat in order[: target - sum(counts.values())]:
        counts[cat] += 1
    return counts


def split_questions(
    questions: list[FaqQuestion], test_fraction: float, seed: int
) -> tuple[list[FaqQuestion], list[FaqQuestion]]:
    """(train, test): a seeded shuffle within each category, the first share of each going to test."""
    if not 0.0 < test_fraction < 1.0:
        raise DemoDataError(f"test_fraction={test_fraction} must lie strictly between 0 and 1")
    if len(questions) < 2:
        raise DemoDataError(f"cannot split {len(questions)} question(s) into train and test")
    rng = random.Random(seed)
    by_category: dict[str, list[FaqQuestion]] = defaultdict(list)
    for question in sorted(questions, key=lambda q: q.query_id):
        by_category[question.category].append(question)
    test_counts = _test_counts_per_category({c: len(qs) for c, qs in by_category.items()}, test_fraction, rng)
    train, test = [], []
    for category in sorted(by_category):
        members = by_category[category]
        rng.shuffle(members)
        test.extend(members[: test_counts[category]])
        train.extend(members[test_counts[category] :])
    return sorted(train, key=lambda q: q.query_id), sorted(test, key=lambda q: q.query_id)


def hard_negative_lines(questions: list[FaqQuestion], num_negatives: int) -> list[dict]:
    """FlagEmbedding lines whose negatives are the BM25-closest answers of the other questions in
    `questions` (one split: train lines mine train answers, test lines held-out answers)."""
    if num_negatives < 0:
        raise DemoDataError(f"num_negatives={num_negatives} must be >= 0")
    # The corpus: every answer of the split, remembering which question owns it.
    owners, texts, ids = [], [], []
    for owner, question in enumerate(questions):
        for text, answer_id in zip(question.answers, question.answer_ids):
            owners.append(owner)
            texts.append(text)
            ids.append(answer_id)
    index = BM25(texts)
    lines = []
    for owner, question in enumerate(questions):
        scores = index.scores(question.question)
        own_texts = set(question.answers)
        candidates = [d for d in range(len(texts)) if owners[d] != owner and texts[d] not in own_texts]
        # Highest score first; on exact ties the same category, then the id, so output is stable.
        candidates.sort(key=lambda d: (-scores[d], questions[owners[d]].category != question.category, ids[d]))
        chosen = candidates[:num_negatives]
        lines.append(
            {
                "query": question.question,
                "pos": list(question.answers),
                "neg": [texts[d] for d in chosen],
                "query_id": question.query_id,
                "pos_ids": list(question.answer_ids),
                "neg_ids": [ids[d] for d in chosen],
            }
        )
    return lines


def _write_atomically(path: Path, text: str) -> None:
    # A temporary file in the same folder, then a rename: readers never see half a file.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; these are plain shared data files
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            tmp.write(text)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def _jsonl(lines: list[dict]) -> str:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_faq_splits(
    out_dir: str | os.PathLike, test_fraction: float = 0.2, num_negatives: int = 3, seed: int = 0
) -> tuple[Path, Path]:
    """Write train.jsonl and test.jsonl (FlagEmbedding format) plus manifest.json into `out_dir`.

    Returns (train_path, test_path). Skips the work when both files exist and the manifest
    records the same parameters and dataset version.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_path, test_path, manifest_path = out / TRAIN_FILE, out / TEST_FILE, out / MANIFEST_FILE
    params = {
        "test_fraction": test_fraction,
        "num_negatives": num_negatives,
        "seed": seed,
        "dataset_version": faq_dataset_version(),
        "format_version": FORMAT_VERSION,
    }
    manifest = _read_manifest(manifest_path)
    if manifest is not None and manifest.get("params") == params and train_path.is_file() and test_path.is_file():
        return train_path, test_path

    questions = group_by_question(faq_records())
    train, test = split_questions(questions, test_fraction, seed)
    train_lines = hard_negative_lines(train, num_negatives)
    test_lines = hard_negative_lines(test, num_negatives)
    _write_atomically(train_path, _jsonl(train_lines))
    _write_atomically(test_path, _jsonl(test_lines))
    counts = {
        "train_queries": len(train_lines),
        "test_queries": len(test_lines),
        "train_answers": sum(len(q.answers) for q in train),
        "test_corpus": sum(len(q.answers) for q in test),
        "categories": len({q.category for q in questions}),
    }
    # The manifest goes last: an interrupted run leaves no matching manifest and redoes the work.
    manifest = {
        "source": "zaragoza-construction-faq (Zaragoza AB, CC BY 4.0, DOI 10.5281/zenodo.19630803)",
        "params": params,
        "counts": counts,
        "files": {"train": TRAIN_FILE, "test": TEST_FILE},
    }
    _write_atomically(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return train_path, test_path


def read_manifest(out_dir: str | os.PathLike) -> dict:
    """The manifest written by write_faq_splits (params and counts)."""
    manifest = _read_manifest(Path(out_dir) / MANIFEST_FILE)
    if manifest is None:
        raise DemoDataError(f"{Path(out_dir) / MANIFEST_FILE}: missing or unreadable; run launch/prepare_demo.py")
    return manifest
