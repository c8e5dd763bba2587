"""Which examples must not share a training step: where one's candidate is the other's positive.

With in-batch negatives every document of a step is a negative of every other query. Two examples
conflict when a positive or negative of one is a positive of the other (a query with several
positives, the same document answering two questions) or when they share the query (one query
split over several lines, each with another positive): in one step, a positive would be trained
as a negative. The sampler keeps conflicting examples in different steps
(engine/data/sampler.py separate_conflicts). Texts are compared exactly, after the file's own
whitespace.
"""
from __future__ import annotations

from collections import defaultdict

from engine.data.example import Example


def positives_by_query(examples: list[Example]) -> dict[str, set[str]]:
    """Every positive of each query text, over all its lines (a query split over lines has them all)."""
    positives: dict[str, set[str]] = defaultdict(set)
    for example in examples:
        positives[example.query].update(example.positives)
    return positives


def conflicting_examples(examples: list[Example]) -> dict[int, set[int]]:
    """{i: indices of the examples that must not share a step with example i}; examples without
    any conflict are absent (so typical data gives an empty dict and the sampler's plain order)."""
    query_positives = positives_by_query(examples)
    holders: dict[str, list[int]] = defaultdict(list)  # a text -> the examples whose query it answers
    askers: dict[str, list[int]] = defaultdict(list)  # a query's text -> the examples asking it
    for index, example in enumerate(examples):
        for text in query_positives[example.query]:
            holders[text].append(index)
        askers[example.query].append(index)
    conflicts: dict[int, set[int]] = defaultdict(set)
    for index, example in enumerate(examples):
        others = set(askers[example.query]) if len(askers[example.query]) > 1 else set()
        for text in set(example.positives) | set(example.negatives):
            others.update(holders.get(text, ()))
        others.discard(index)
        for other in others:
            conflicts[index].add(other)
            conflicts[other].add(index)
    return dict(conflicts)
