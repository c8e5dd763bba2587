"""TREC run files: one line per retrieved document, `qid Q0 docid rank score tag`.

Lines are written in the order the metrics rank (engine.eval.metrics.rank_documents), with
1-based ranks and scores printed with repr() so that reading the file back gives the same
floats, and so the same ranking, ties included. trec_eval and pytrec_eval read these files.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

from engine.eval.metrics import rank_documents


class TrecFormatError(ValueError):
    """A run cannot be written as, or read from, a TREC run file."""


def write_trec_run(
    run: Mapping[str, Mapping[str, float]], path: str, tag: str = "ember", depth: int | None = None
) -> None:
    """Write `run` (qid -> {docid: score}); keep the best `depth` documents per query when given."""
    if depth is not None and depth < 1:
        raise TrecFormatError(f"TREC run depth must be >= 1 or None, got {depth}")
    _check_token("run tag", tag)
    lines = []
    for qid, scores in run.items():
        _check_token("query id", qid)
        for rank, doc_id in enumerate(rank_documents(scores)[:depth], start=1):
            _check_token("document id", doc_id)
            lines.append(f"{qid} Q0 {doc_id} {rank} {float(scores[doc_id])!r} {tag}\n")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


def read_trec_run(path: str) -> dict[str, dict[str, float]]:
    """Read a TREC run file into qid -> {docid: score} (ranks and tags are not kept)."""
    run: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 6:
                raise TrecFormatError(
                    f"{path}:{line_no}: expected 6 fields 'qid Q0 docid rank score tag', got {len(fields)}"
                )
            qid, _, doc_id, _, score, _ = fields
            try:
                run.setdefault(qid, {})[doc_id] = float(score)
            except ValueError:
                raise TrecFormatError(f"{path}:{line_no}: score {score!r} is not a number") from None
    return run


def _check_token(what: str, value: str) -> None:
    # The format is whitespace-separated: an id with a space would shift every later field.
    if not value or any(ch.isspace() for ch in value):
        raise TrecFormatError(f"{what} {value!r} cannot be written to a TREC run file (empty or contains whitespace)")
