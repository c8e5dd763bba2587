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
from collections import deque
from typing import Callable

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
    """indices(step) -> the example indices of optimizer step `step` (0-based, global batch).

    The examples may come from several datasets (`dataset_sizes`, consecutive index ranges in that
    order). `weights` sets each dataset's share of an epoch (an epoch stays as long as all the
    data; a dataset with twice the weight per example is drawn twice as often, cycling through its
    own shuffled order); `same_dataset` makes every step come from one dataset (the steps of the
    datasets interleaved at random). `conflicts[i]` lists the examples that must not share a step
    with example i (engine/data/conflicts.py: one's candidate is the other's positive); each epoch's
    order is rearranged so that they never do while the data allows it.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, *, dataset_sizes: list[int] | None = None,
                 weights: list[float] | None = None, same_dataset: bool = False,
                 conflicts: dict[int, set[int]] | None = None, report: Callable[[str], None] | None = None):
        if num_examples < 1:
            raise DataError("the sampler needs at least one example")
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be >= 1")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.dataset_sizes = list(dataset_sizes) if dataset_sizes else [num_examples]
        if sum(self.dataset_sizes) != num_examples or min(self.dataset_sizes) < 1:
            raise DataError(f"dataset sizes {self.dataset_sizes} do not add up to {num_examples} examples")
        self.draws = epoch_draws(self.dataset_sizes, weights)
        self.weights = list(weights) if weights else []
        self.same_dataset = same_dataset
        self.conflicts = conflicts or {}
        self.conflicting_steps = 0  # steps of the epoch planned last that had to keep a conflicting pair
        self.report = report  # told when an epoch keeps such steps
        streams = self.draws if same_dataset else [sum(self.draws)]
        self.steps_per_epoch = sum(-(-n // batch_size) for n in streams)  # ceil per stream
        self._cached_epoch: int | None = None
        self._cached_plan = torch.empty(0, batch_size, dtype=torch.long)  # (steps_per_epoch, B)

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int) -> list[int]:
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        return self._plan(self.epoch(step))[step % self.steps_per_epoch].tolist()

    def _plan(self, epoch: int) -> torch.Tensor:
        if epoch != self._cached_epoch:
            self.conflicting_steps = 0
            self._cached_plan = self._plan_epoch(epoch)
            self._cached_epoch = epoch
            if self.conflicting_steps and self.report is not None:
                self.report(f"data: epoch {epoch}: {self.conflicting_steps} of {self.steps_per_epoch} steps keep two "
                            "examples that conflict (no arrangement of this data keeps them apart); in those steps "
                            "a positive of one query is another's negative")
        return self._cached_plan

    def _plan_epoch(self, epoch: int) -> torch.Tensor:
        """(steps_per_epoch, B) example indices: a pure function of (seed, epoch)."""
        draws = self._dataset_draws(epoch)
        if not self.same_dataset:
            mixed = torch.cat(draws)
            # One dataset: its own order as it is (the order single-file runs always had).
            order = mixed if len(draws) == 1 else mixed[seeded_permutation(mixed.numel(), "mix", self.seed, epoch)]
            return self._batches(order)
        batches = torch.cat([self._batches(order) for order in draws])
        return batches[seeded_permutation(batches.shape[0], "steps", self.seed, epoch)]

    def _dataset_draws(self, epoch: int) -> list[torch.Tensor]:
        """Each dataset's examples of this epoch: `draws[k]` of them, cycling through its own order."""
        draws, start = [], 0
        for k, (size, count) in enumerate(zip(self.dataset_sizes, self.draws)):
            key = ("epoch", self.seed, epoch) if len(self.dataset_sizes) == 1 else ("dataset", self.seed, epoch, k)
            order = seeded_permutation(size, *key)
            draws.append(start + order[torch.arange(count) % size])
            start += size
        return draws

    def _batches(self, order: torch.Tensor) -> torch.Tensor:
        """Cut one stream into steps of B; the last is filled up from the stream's own start (and wraps
        more than once when the batch is larger than the stream)."""
        steps = -(-order.numel() // self.batch_size)
        if self.conflicts:
            batches, kept = separate_conflicts(order.tolist(), self.batch_size, self.conflicts)
            self.conflicting_steps += kept
            return torch.tensor(batches, dtype=torch.long).view(steps, self.batch_size)
        positions = torch.arange(steps * self.batch_size) % order.numel()
        return order[positions].view(steps, self.batch_size)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "num_examples": self.num_examples,
                "dataset_sizes": self.dataset_sizes, "weights": self.weights, "same_dataset": self.same_dataset}

    def load_state_dict(self, state: dict) -> None:
        """Check that the checkpoint was made with the same seed, batch size and data; the step
        counter, saved by the trainer, is all the position there is."""
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
        # Checkpoints from before several datasets existed hold one dataset, unweighted.
        mixture = (state.get("dataset_sizes", [self.num_examples]), state.get("weights", []),
                   state.get("same_dataset", False))
        if mixture != (self.dataset_sizes, self.weights, self.same_dataset):
            raise DataError(
                f"the checkpoint's data mixture (sizes {mixture[0]}, weights {mixture[1]}, same dataset per step "
                f"{mixture[2]}) differs from this run's (sizes {self.dataset_sizes}, weights {self.weights}, "
                f"{self.same_dataset}): resume with the same data.train, data.train_weights and "
                "data.same_dataset_in_batch, or start a fresh run"
            )


def epoch_draws(sizes: list[int], weights: list[float] | None) -> list[int]:
    """How many examples of each dataset one epoch holds: all of each without weights; with weights,
    the epoch (as long as all the data) split in proportion to them, at least one from each weighted dataset."""
    if not weights:
        return list(sizes)
    if len(weights) != len(sizes) or min(weights) < 0 or sum(weights) <= 0:
        raise DataError(f"weights {list(weights)} must be one number >= 0 per dataset ({len(sizes)}), not all 0")
    total, weight_sum = sum(sizes), sum(weights)
    return [max(1, round(total * w / weight_sum)) if w > 0 else 0 for w in weights]


def separate_conflicts(order: list[int], batch_size: int, conflicts: dict[int, set[int]]) -> tuple[list[list[int]], int]:
    """`order` cut into ceil(len / B) batches in which no two examples conflict, keeping the order as
    far as possible: an example that conflicts with one already in the batch waits for the next
    batch. As without conflicts, every example is placed once and the last batch is filled up from
    the start of the order. Where nothing conflict-free is left to complete a batch, a conflicting
    example goes in after all: returns the batches and how many kept a conflict."""
    steps = -(-len(order) // batch_size)
    pending, batches = deque(order), []
    for step in range(steps):
        batch, members, waiting = [], set(), []
        while pending and len(batch) < batch_size and len(waiting) < SCAN_WINDOW * batch_size:
            candidate = pending.popleft()
            target = waiting if conflicts.get(candidate, _NONE) & members else batch
            target.append(candidate)
            if target is batch:
                members.add(candidate)
        pending.extendleft(reversed(waiting))
        room_after = (steps - step - 1) * batch_size
        if len(batch) < batch_size and len(pending) <= room_after:  # later steps can take the rest
            for candidate in order:  # fill up from the start, as the last batch does
                if len(batch) == batch_size:
                    break
                if candidate not in members and not conflicts.get(candidate, _NONE) & members:
                    batch.append(candidate)
                    members.add(candidate)
        while len(batch) < batch_size:  # nothing conflict-free is left: the repair below tries swaps
            batch.append(pending.popleft() if pending else order[len(batch) % len(order)])
        batches.append(batch)
    kept = sum(not _swap_out_conflicts(batches, b, conflicts) for b in range(len(batches)))
    return batches, kept


def _conflicting_member(batch: list[int], conflicts: dict[int, set[int]]) -> int | None:
    """The position of a member that conflicts with another member of the batch, if any."""
    members = set(batch)
    return next((i for i, x in enumerate(batch) if conflicts.get(x, _NONE) & (members - {x})), None)


def _swap_out_conflicts(batches: list[list[int]], b: int, conflicts: dict[int, set[int]]) -> bool:
    """Swap conflicting members of batch b with members of nearby batches that fit both places (the
    greedy pass leaves its conflicts in the epoch's last batches). True when batch b ends conflict-free."""
    batch = batches[b]
    while (i := _conflicting_member(batch, conflicts)) is not None:
        x, rest = batch[i], set(batch) - {batch[i]}
        for c in sorted(range(len(batches)), key=lambda c: abs(c - b))[1:SWAP_REACH + 1]:
            other = batches[c]
            j = next((j for j, y in enumerate(other)
                      if y not in rest and x not in other and not conflicts.get(y, _NONE) & rest
                      and not conflicts.get(x, _NONE) & (set(other) - {y})), None)
            if j is not None:
                batch[i], other[j] = other[j], x
                break
        else:
            return False
    return True


SWAP_REACH = 64  # batches searched for a swap partner
SCAN_WINDOW = 16  # batches' worth of conflicting examples skipped before a batch stops looking further
_NONE: frozenset[int] = frozenset()


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
