"""The queries and the candidate corpus of a mining run, deduplicated as sentence-transformers does.

sentence-transformers mines over (anchor, positive) rows; a JSONL line with k positives is k such
rows. Its rules, kept here:
- the corpus is the extra corpus followed by every positive, deduplicated by text, in order of
  first appearance;
- queries are deduplicated by text: lines that ask the same query share its positives (each is
  a positive of all of them) and get the same negatives;
- a query whose own text is in the corpus never gets itself as a negative;
- `max_positives`, which sizes the candidate window, counts a query's rows, duplicates included.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from engine.data.example import Example
from engine.data.formats import DataError


@dataclass
class MiningSet:
    queries: list[str]  # unique query texts, in order of first appearance
    prompts: list[str | None]  # each unique query's instruction (that of its first line)
    corpus: list[str]  # deduplicated candidate texts
    doc_ids: list[str | None]  # parallel to corpus: the id the data gives the text, if any
    positives: list[list[int]]  # per unique query: corpus indices of its positives, deduplicated
    query_of_line: list[int]  # per example: the index of its unique query
    query_in_corpus: list[int]  # per unique query: the corpus index of its own text, -1 if absent
    max_positives: int  # the most (query, positive) rows of one query, duplicates counted


def build_mining_set(examples: list[Example], extra: list[tuple[str, str | None]] = ()) -> MiningSet:
    """extra: (text, id or None) candidates besides the positives (a corpus file, the lines' negatives)."""
    query_index: dict[str, int] = {}
    prompts: list[str | None] = []
    rows: list[int] = []
    query_of_line = []
    for example in examples:
        if example.query not in query_index:
            query_index[example.query] = len(query_index)
            prompts.append(example.prompt)
            rows.append(0)
        query_of_line.append(query_index[example.query])
        rows[query_of_line[-1]] += len(example.positives)

    texts = [text for text, _ in extra] + [p for e in examples for p in e.positives]
    corpus = list(dict.fromkeys(texts))
    corpus_index = {text: i for i, text in enumerate(corpus)}
    positives: list[list[int]] = [[] for _ in query_index]
    for example, q in zip(examples, query_of_line):
        for text in example.positives:
            if corpus_index[text] not in positives[q]:
                positives[q].append(corpus_index[text])
    return MiningSet(
        queries=list(query_index), prompts=prompts, corpus=corpus,
        doc_ids=_doc_ids(corpus, examples, extra), positives=positives, query_of_line=query_of_line,
        query_in_corpus=[corpus_index.get(q, -1) for q in query_index], max_positives=max(rows),
    )


def _doc_ids(corpus: list[str], examples: list[Example], extra) -> list[str | None]:
    """The first id the data gives each text (corpus file, pos_ids, neg_ids), None where it gives none."""
    found: dict[str, str] = {}
    for text, doc_id in extra:
        if doc_id is not None:
            found.setdefault(text, doc_id)
    for e in examples:
        for texts, ids in ((e.positives, e.pos_ids), (e.negatives, e.neg_ids)):
            for text, doc_id in zip(texts, ids or ()):
                found.setdefault(text, doc_id)
    return [found.get(text) for text in corpus]


def line_negatives(examples: list[Example]) -> list[tuple[str, str | None]]:
    """The negatives the input lines already carry, with their ids: candidates for corpus_from_negatives."""
    return [(text, (e.neg_ids or [None] * len(e.negatives))[k]) for e in examples for k, text in enumerate(e.negatives)]


def read_corpus_file(path: str) -> list[tuple[str, str | None]]:
    """A JSONL corpus: {"text": ..., "_id" or "id": ...} per line (BEIR's corpus.jsonl reads as it is).
    Every bad line is reported, as one DataError of `PATH:LINE: reason` lines."""
    try:
        handle = open(path, encoding="utf-8")
    except OSError as err:
        raise DataError(f"mine.corpus={path}: {err.strerror}") from None
    entries, errors = [], []
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entries.append(_corpus_entry(line))
            except ValueError as reason:
                errors.append(f"{path}:{number}: {reason}")
    if errors:
        raise DataError("\n".join(errors))
    if not entries:
        raise DataError(f"{path}: no corpus entries (the file is empty)")
    return entries


def _corpus_entry(line: str) -> tuple[str, str | None]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError('missing or empty "text" (a corpus line is {"text": ..., "_id": ...})')
    doc_id = record.get("_id", record.get("id"))
    if doc_id is not None and (isinstance(doc_id, bool) or not isinstance(doc_id, (str, int))):
        raise ValueError('"_id" must be a string or an integer')
    return text, None if doc_id is None else str(doc_id)
