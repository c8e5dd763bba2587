"""sentence-transformers' mine_hard_negatives on a FlagEmbedding file: the reference mining is held to."""
from __future__ import annotations

import json
import random


def st_mine(model, lines: list[dict], seed: int | None = None, corpus: list[str] | None = None, **options):
    """mine_hard_negatives over the (query, positive) rows of `lines`; `seed` seeds Python's global
    random first, the sampler sentence-transformers draws from."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    rows = [(line["query"], p) for line in lines for p in line["pos"]]
    dataset = Dataset.from_dict({"query": [q for q, _ in rows], "positive": [p for _, p in rows]})
    if seed is not None:
        random.seed(seed)
    return mine_hard_negatives(dataset, model, corpus=corpus, **options)


def st_negatives(model, lines: list[dict], **options) -> dict[str, list[str]]:
    """{query: its negatives, best first} (labeled-list rows are [positive, *negatives]); queries
    left without any are absent, as sentence-transformers leaves them out."""
    out = st_mine(model, lines, output_format="labeled-list", **options)
    found: dict[str, list[str]] = {}
    for row in out:
        found.setdefault(row["query"], row["positive"][1:])
    return found


def ember_negatives(path: str) -> dict[str, list[str]]:
    """{query: its negatives} from a mined file (every line of a query carries the same ones)."""
    found: dict[str, list[str]] = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            found.setdefault(record["query"], record["neg"])
    return found
