"""The mined file: the engine's FlagEmbedding JSONL, {"query", "pos", "neg", ids, "prompt"} per line.

Lines follow the input's order, whatever its format (ms-swift lines come out as FlagEmbedding
lines). Lines asking the same query carry the same negatives. Ids: query_id and pos_ids as the
input gave them; neg_ids where the data gives every chosen negative an id. Teacher scores of the
input are dropped (they scored other negatives) unless mine.output_scores writes the embedder's.
"""
from __future__ import annotations

import json
import os

from engine.data.example import Example
from engine.mine.corpus import MiningSet


def mined_records(examples: list[Example], mset: MiningSet, found: list[list[tuple[int, float]]],
                  positive_score: list[dict[int, float]], output_format: str, num_negatives: int,
                  output_scores: bool):
    """found: per unique query, (corpus index, score) of its negatives, best first.
    positive_score: per unique query, {corpus index of a positive: its score}."""
    corpus_index = {text: i for i, text in enumerate(mset.corpus)}
    for example, q in zip(examples, mset.query_of_line):
        negatives = found[q]
        if output_format == "n-tuple" and len(negatives) < num_negatives:
            continue
        if output_format == "triplet":
            for k, positive in enumerate(example.positives):
                for negative in negatives:
                    pos_id = [example.pos_ids[k]] if example.pos_ids else None
                    yield _record(example, [positive], pos_id, [negative], mset,
                                  [positive_score[q][corpus_index[positive]]], output_scores)
            continue
        scores = [positive_score[q][corpus_index[p]] for p in example.positives]
        yield _record(example, example.positives, example.pos_ids, negatives, mset, scores, output_scores)


def _record(example: Example, positives: list[str], pos_ids, negatives, mset: MiningSet,
            pos_scores: list[float], output_scores: bool) -> dict:
    record: dict = {"query": example.query, "pos": positives, "neg": [mset.corpus[i] for i, _ in negatives]}
    if output_scores:
        record["pos_scores"] = pos_scores
        record["neg_scores"] = [score for _, score in negatives]
    if example.prompt is not None:
        record["prompt"] = example.prompt
    if example.query_id is not None:
        record["query_id"] = example.query_id
    if pos_ids is not None:
        record["pos_ids"] = pos_ids
    neg_ids = [mset.doc_ids[i] for i, _ in negatives]
    if negatives and all(doc_id is not None for doc_id in neg_ids):
        record["neg_ids"] = neg_ids
    return record


def write_jsonl(path: str, records) -> int:
    """Write under a temporary name, then rename: a half-written file never appears. Lines written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    count = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp, path)
    return count
