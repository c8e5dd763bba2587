"""The training data of a run: one or several JSONL files (data.train), read and validated up front,
with what the sampler needs to draw from them (engine/data/sampler.py BatchSampler): each file's
size, its weight, and which examples conflict (engine/data/conflicts.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from engine.config import train_files
from engine.data.conflicts import conflicting_examples, positives_by_query
from engine.data.example import Example
from engine.data.formats import DataError, drop_positives_from_negatives, load_examples
from engine.data.sampler import BatchSampler


@dataclass
class TrainingData:
    examples: list[Example]  # every file's examples, file after file in data.train's order
    files: list[str]
    sizes: list[int]  # examples per file

    def describe(self) -> str:
        if len(self.files) == 1:
            return f"{self.sizes[0]} training examples from {self.files[0]}"
        parts = ", ".join(f"{path} {size}" for path, size in zip(self.files, self.sizes))
        return f"{sum(self.sizes)} training examples from {len(self.files)} files ({parts})"


def load_training_data(data_cfg, warn: Callable[[str], None] = print) -> TrainingData:
    """Read every file of data.train; a bad line anywhere fails before anything is built."""
    files = train_files(data_cfg)
    examples, sizes, errors = [], [], []
    for path in files:
        try:
            loaded = load_examples(path, on_error=data_cfg.on_error, warn=warn)
        except DataError as err:  # collect every file's problems, then fail once
            errors.append(str(err))
            continue
        examples.extend(loaded)
        sizes.append(len(loaded))
    if errors:
        raise DataError("\n".join(errors))
    query_positives = positives_by_query(examples)
    cleaned = [e.where for e in examples if drop_positives_from_negatives(e, query_positives[e.query])]
    if cleaned:
        warn(f"data: {len(cleaned)} line(s) list as a negative a positive of the same query on another line "
             f"(first: {cleaned[0]}); it is used as a positive only")
    return TrainingData(examples, files, sizes)


def training_sampler(data: TrainingData, data_cfg, batch_size: int, seed: int,
                     warn: Callable[[str], None] = print) -> BatchSampler:
    """The run's sampler: the files' sizes and weights, one file per step when asked, and conflicting
    examples kept apart."""
    conflicts = conflicting_examples(data.examples)
    if conflicts:
        warn(f"data: {len(conflicts)} examples share a positive or a query with another; steps keep them apart "
             "so that no positive is trained as another query's negative")
    return BatchSampler(len(data.examples), batch_size, seed, dataset_sizes=data.sizes,
                        weights=list(data_cfg.train_weights) or None, same_dataset=data_cfg.same_dataset_in_batch,
                        conflicts=conflicts, report=warn)
