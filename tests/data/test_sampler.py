"""Sampler: a pure function of (seed, step); epochs cover the data; resume needs no state."""
from collections import Counter

import pytest

from engine.data.example import Example
from engine.data.formats import DataError
from engine.data.sampler import BatchSampler, choose_negatives, choose_positive


def test_same_seed_same_batches_other_seed_other_batches():
    a, b, c = BatchSampler(50, 8, seed=1), BatchSampler(50, 8, seed=1), BatchSampler(50, 8, seed=2)
    assert [a.indices(s) for s in range(20)] == [b.indices(s) for s in range(20)]
    assert [a.indices(s) for s in range(20)] != [c.indices(s) for s in range(20)]


def test_each_epoch_covers_every_example_and_never_repeats_within_a_batch():
    n, batch = 23, 5  # 5 steps per epoch, the last one filled up from the epoch's start
    sampler = BatchSampler(n, batch, seed=0)
    assert sampler.steps_per_epoch == 5
    for epoch in range(3):
        steps = range(epoch * 5, epoch * 5 + 5)
        assert all(sampler.epoch(s) == epoch for s in steps)
        seen = [i for s in steps for i in sampler.indices(s)]
        assert set(seen) == set(range(n))
        counts = Counter(seen)
        assert sorted(counts.values()) == [1] * (n - 2) + [2, 2]  # 25 slots for 23 examples
        assert all(len(set(sampler.indices(s))) == batch for s in steps)
        # The two repeats are the epoch's first two examples, reused by its last step.
        assert sampler.indices(steps[-1])[-2:] == sampler.indices(steps[0])[:2]
    assert sampler.epoch(5) == 1
    epoch_orders = [tuple(sampler.indices(e * 5)) for e in range(3)]
    assert len(set(epoch_orders)) == 3  # each epoch shuffles anew


def test_exact_division_has_no_repeats():
    sampler = BatchSampler(12, 4, seed=3)
    seen = [i for s in range(3) for i in sampler.indices(s)]
    assert sorted(seen) == list(range(12))


def test_batch_larger_than_the_data_wraps():
    sampler = BatchSampler(3, 7, seed=0)
    batch = sampler.indices(0)
    assert len(batch) == 7 and set(batch) == {0, 1, 2}
    assert sampler.epoch(1) == 1


def test_resume_at_any_step_matches_an_uninterrupted_run():
    run = BatchSampler(37, 6, seed=9)
    uninterrupted = [run.indices(s) for s in range(30)]
    resumed = BatchSampler(37, 6, seed=9)
    resumed.load_state_dict(run.state_dict())
    assert [resumed.indices(s) for s in range(17, 30)] == uninterrupted[17:]
    # And out of order (any rank, any step) gives the same answers.
    assert [run.indices(s) for s in reversed(range(30))] == uninterrupted[::-1]


@pytest.mark.parametrize(
    "changed, message",
    [
        ({"num_examples": 36}, "trained on 36 examples but the data now has 37"),
        ({"batch_size": 8}, "train.batch_size=8 but the config now says 6"),
        ({"seed": 1}, "train.seed=1 but the config now says 9"),
    ],
)
def test_load_state_dict_refuses_changed_data_or_config(changed, message):
    sampler = BatchSampler(37, 6, seed=9)
    state = {**sampler.state_dict(), **changed}
    with pytest.raises(DataError, match=message):
        sampler.load_state_dict(state)


def test_choose_negatives_without_replacement_and_deterministic():
    example = Example("q", ["p"], [f"n{i}" for i in range(10)])
    chosen = choose_negatives(example, 4, seed=0, step=3, position=1)
    assert len(chosen) == len(set(chosen)) == 4 and all(0 <= k < 10 for k in chosen)
    assert chosen == choose_negatives(example, 4, seed=0, step=3, position=1)
    draws = {tuple(choose_negatives(example, 4, seed=0, step=s, position=0)) for s in range(20)}
    assert len(draws) > 15  # a fresh draw per step


def test_choose_negatives_cycles_when_too_few():
    example = Example("q", ["p"], ["a", "b", "c"])
    chosen = choose_negatives(example, 7, seed=1, step=0, position=0)
    assert Counter(chosen) == Counter({k: c for k, c in zip(chosen[:3], [3, 2, 2])})
    assert sorted(chosen[:3]) == [0, 1, 2] and chosen[3:6] == chosen[:3]
    assert choose_negatives(Example("q", ["p"]), 3, seed=1, step=0, position=0) == []


def test_choose_positive_uses_every_positive_over_steps():
    example = Example("q", ["p0", "p1", "p2"])
    picks = {choose_positive(example, seed=0, step=s, position=0) for s in range(30)}
    assert picks == {0, 1, 2}
    assert choose_positive(Example("q", ["only"]), seed=0, step=5, position=2) == 0
