"""Teacher scores: a reranker scores each line's positives and negatives, and the lines are written
back as they were with `pos_scores` / `neg_scores` set, the keys every input format reads for
distillation (engine/data/formats.py; task.loss=distill trains on them).

All (query, document) pairs of the file go through the reranker in one pass (shared out over the
job's ranks, longest first), with the line's own instruction ("prompt") where it has one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from engine.data.example import Example
from engine.mine.encode import run_blocks


@dataclass
class ScoreOptions:
    output: Optional[str] = None  # the scored JSONL file (required)
    batch_size: int = 16  # (query, document) pairs per forward pass


def teacher_scores(reranker, examples: list[Example], batch_size: int,
                   progress: bool = False) -> list[tuple[list[float], list[float]]]:
    """Per example, (scores of its positives, scores of its negatives)."""
    queries, docs, prompts = [], [], []
    for e in examples:
        for doc in e.positives + e.negatives:
            queries.append(e.query)
            docs.append(doc)
            prompts.append(e.prompt)
    tokens = reranker.text_encoder.pairs(queries, docs, prompts)
    flat = run_blocks(reranker, tokens, batch_size, "Scoring with the reranker", progress).tolist()
    out, at = [], 0
    for e in examples:
        n_pos, n_neg = len(e.positives), len(e.negatives)
        out.append((flat[at : at + n_pos], flat[at + n_pos : at + n_pos + n_neg]))
        at += n_pos + n_neg
    return out


def scored_records(path: str, examples: list[Example], scores):
    """Each example's source line (by line number) as a JSON object with the scores set; every
    other key as it was. Lines load_examples skipped (data.on_error=skip) are left out."""
    wanted = {e.line: s for e, s in zip(examples, scores)}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number not in wanted:
                continue
            record = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
            record["pos_scores"], record["neg_scores"] = wanted[number]
            yield record
