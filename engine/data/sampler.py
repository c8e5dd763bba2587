"""Which examples, and which of their negatives, each optimizer step trains on.

Everything is a pure function of (seed, step): resuming at step k needs no iterator state,
only the seed, and any rank can compute any step's batch. A step never mixes epochs:
epoch e has ceil(N / B) steps over its own permutation, and its last step is filled up from
the start of that same permutation. So every example is seen once per epoch (a few twice),
and no example appears twice in one batch as long as N >= B (two copies of one example
in a contrastive batch would make each the other's false negative).
"""
from __future__ import annotations

import hashlib

import torch

from engine.data.example import Example
from engine.data.formats import DataError


def derived_seed(*parts: int | str) -> int:
    """A 63-bit seed from several parts; nearby inputs give unrelated seeds (unlike seed + step)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_permutation(n: int, *seed_parts: int | str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(derived_seed(*seed_parts))
    return torch.randperm(n, generator=generator)  # (n,) int64


class BatchSampler:
    """indices(step) -> the example indices of optimizer step `step` (0-based, global batch)."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if num_examples < 1:
            raise DataError("the sampler needs at least one example")
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be >= 1")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = -(-num_examples // batch_size)  # ceil
        self._cached_epoch: int | None = None
        self._cached_order = torch.empty(0, dtype=torch.long)  # a tensor: 10M Python ints would be ~400 MB

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int) -> list[int]:
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        order = self._order(self.epoch(step))
        start = (step % self.steps_per_epoch) * self.batch_size
        # Modulo fills the last step of an epoch from the epoch's own start (and wraps
        # more than once when the batch is larger than the data).
        return order[(start + torch.arange(self.batch_size)) % self.num_examples].tolist()

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._cached_epoch:
            self._cached_order = seeded_permutation(self.num_examples, "epoch", self.seed, epoch)
            self._cached_epoch = epoch
        return self._cached_order

    def state_dict(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "num_examples": self.num_examples}

    def load_state_dict(self, state: dict) -> None:
        """Check that the checkpoint was made with the same seed, batch size and data size;
        the step counter, saved by the trainer, is all the position there is."""
        saved = (state["num_examples"], state["batch_size"], state["seed"])
        if saved[0] != self.num_examples:
            raise DataError(
                f"the checkpoint was trained on {saved[0]} examples but the data now has {self.num_examples}: "
                "resume with the same data file, or start a fresh run"
            )
        if saved[1] != self.batch_size:
            raise DataError(
                f"the checkpoint used train.batch_size={saved[1]} but the config now says {self.batch_size}: "
                "resume with the same batch size, or start a fresh run"
            )
        if saved[2] != self.seed:
            raise DataError(
                f"the checkpoint used train.seed={saved[2]} but the config now says {self.seed}: "
                "resume with the same seed, or start a fresh run"
            )


def choose_negatives(example: Example, n: int, seed: int, step: int, position: int) -> list[int]:
    """Indices of n of the example's negatives: without replacement when it has n or more,
    else cycling through a shuffled list (each negative used as evenly as possible).
    `position` is the example's place in the global batch, so that the same example twice
    in one batch draws different negatives."""
    available = len(example.negatives)
    if n <= 0 or available == 0:
        return []
    order = seeded_permutation(available, "negatives", seed, step, position).tolist()
    if available >= n:
        return order[:n]
    return [order[i % available] for i in range(n)]


def choose_positive(example: Example, seed: int, step: int, position: int) -> int:
    """Index of the positive to train on: the only one, or a seeded choice among several."""
    if len(example.positives) == 1:
        return 0
    return int(seeded_permutation(len(example.positives), "positive", seed, step, position)[0])
