"""Several positives, several files with weights, one file per step: which examples each step
trains on (engine/data/conflicts.py, sampler.py, mixture.py)."""
from __future__ import annotations

from collections import Counter

import pytest

from engine.cli import compose
from engine.config import ConfigError, validate
from engine.data.conflicts import conflicting_examples
from engine.data.example import Example
from engine.data.formats import DataError, load_examples
from engine.data.sampler import BatchSampler, epoch_draws, separate_conflicts
from tests.conftest import synthetic_examples, write_jsonl


def test_conflicts_are_shared_positives_positives_used_as_negatives_and_repeated_queries():
    examples = [
        Example("q0", ["a", "b"], ["x"]),      # two positives
        Example("q1", ["b"], ["y"]),           # b answers q0 too
        Example("q2", ["c"], ["a"]),           # its negative is q0's positive
        Example("q3", ["d"], ["z"]),           # free
        Example("q3", ["e"], []),              # the same question with another answer
    ]
    assert conflicting_examples(examples) == {0: {1, 2}, 1: {0}, 2: {0}, 3: {4}, 4: {3}}
    assert conflicting_examples([Example("q", ["a"], ["b"]), Example("r", ["c"], ["d"])]) == {}


def test_an_epoch_that_must_keep_a_conflict_says_so_once():
    # Every example conflicts with every other: any step of 2 keeps a conflicting pair.
    conflicts = {i: set(range(4)) - {i} for i in range(4)}
    reports = []
    sampler = BatchSampler(4, 2, seed=0, conflicts=conflicts, report=reports.append)
    for step in range(4):  # two epochs of two steps
        sampler.indices(step)
    assert sampler.conflicting_steps == 2
    assert reports == [f"data: epoch {e}: 2 of 2 steps keep two examples that conflict (no arrangement of this "
                       "data keeps them apart); in those steps a positive of one query is another's negative"
                       for e in (0, 1)]


def test_no_step_holds_two_conflicting_examples_and_each_epoch_still_covers_the_data():
    # Pairs (2k, 2k+1) share a positive: with 40 examples in steps of 8, a plain shuffle puts
    # some pair together almost surely.
    conflicts = {i: {i ^ 1} for i in range(40)}
    sampler = BatchSampler(40, 8, seed=3, conflicts=conflicts)
    plain = BatchSampler(40, 8, seed=3)
    assert any(i ^ 1 in plain.indices(s) for s in range(5) for i in plain.indices(s))  # the test can fail
    for epoch in range(3):
        steps = [sampler.indices(s) for s in range(epoch * 5, epoch * 5 + 5)]
        assert sorted(i for step in steps for i in step) == list(range(40))
        assert all(i ^ 1 not in step for step in steps for i in step)
    assert sampler.conflicting_steps == 0
    assert [sampler.indices(s) for s in range(10)] == [BatchSampler(40, 8, 3, conflicts=conflicts).indices(s)
                                                       for s in range(10)]


def test_conflicts_that_cannot_be_separated_are_kept_and_counted():
    everyone = {i: set(range(4)) - {i} for i in range(4)}  # four lines of one query
    batches, kept = separate_conflicts([0, 1, 2, 3], 4, everyone)
    assert sorted(batches[0]) == [0, 1, 2, 3] and kept == 1
    batches, kept = separate_conflicts([0, 1, 2, 3], 2, {0: {1}, 1: {0}, 2: {3}, 3: {2}})
    assert kept == 0 and all({0, 1} != set(b) and {2, 3} != set(b) for b in batches)


def test_several_positives_never_meet_their_query_as_negatives(tmp_path):
    """A whole run's steps, as the trainer collates them: no document of a step (any group's
    positive or negative) is a positive of another query of that step."""
    from engine.data.collate import Collator
    from engine.data.mixture import load_training_data, training_sampler
    from engine.data.tokenize import TextEncoder
    from engine.data.byte_tokenizer import byte_tokenizer

    lines = [{"query": f"question {k}", "pos": [f"answer {k}", f"answer {(k + 1) % 24}"],
              "neg": [f"answer {(k + 12) % 24}", f"noise {k}"]} for k in range(24)]
    lines.append({"query": "question 0", "pos": ["answer 7"]})  # the same query on a second line
    path = write_jsonl(tmp_path / "multi.jsonl", lines)
    cfg, _ = compose(["train.batch_size=4", "task.num_negatives=2", f"data.train={path}", "data.eval=",
                      "task.query_instruction=find", "data.doc_max_len=64"])
    data = load_training_data(cfg.data, warn=lambda message: None)
    sampler = training_sampler(data, cfg.data, 4, seed=0, warn=lambda message: None)
    tokenizer = byte_tokenizer()
    collator = Collator(TextEncoder(tokenizer, cfg.task, cfg.data), cfg.task, seed=0)
    positives_of_query: dict[str, set[str]] = {}
    for e in data.examples:
        positives_of_query.setdefault(e.query, set()).update(e.positives)
    assert len(conflicting_examples(data.examples)) == 25
    for step in range(3 * sampler.steps_per_epoch):
        examples = [data.examples[i] for i in sampler.indices(step)]
        batch = collator(examples, step)
        docs = [tokenizer.decode(batch.docs.input_ids[a:b].tolist(), skip_special_tokens=True)
                for a, b in zip(batch.docs.cu_seqlens[:-1].tolist(), batch.docs.cu_seqlens[1:].tolist())]
        for i, example in enumerate(examples):
            own = positives_of_query[example.query]
            group = docs[i * 3:(i + 1) * 3]
            assert group[0] in own, (step, i)
            others = group[1:] + docs[:i * 3] + docs[(i + 1) * 3:]
            assert not own & set(others), (step, example.query, own & set(others), sampler.conflicting_steps)
    assert sampler.conflicting_steps == 0


def test_a_positive_listed_among_the_negatives_is_dropped_with_a_warning(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"query": "q", "pos": ["a", "b"], "neg": ["b", "c"],
                                               "pos_scores": [1, 1], "neg_scores": [0.9, 0.1]}])
    warnings = []
    (example,) = load_examples(path, warn=warnings.append)
    assert example.negatives == ["c"] and example.neg_scores == [0.1]
    assert "1 line(s) list a positive among their negatives (first: line 1)" in warnings[0]


def test_weights_set_each_files_share_of_an_epoch():
    assert epoch_draws([10, 30], None) == [10, 30]
    assert epoch_draws([10, 30], [3, 1]) == [30, 10]  # the epoch stays 40 examples long
    assert epoch_draws([10, 30], [1, 0]) == [40, 0]
    sampler = BatchSampler(40, 8, seed=1, dataset_sizes=[10, 30], weights=[3, 1])
    seen = Counter(i for s in range(sampler.steps_per_epoch) for i in sampler.indices(s))
    from_first = sum(n for i, n in seen.items() if i < 10)
    assert from_first == 30 and sum(seen.values()) == 40
    assert all(seen[i] == 3 for i in range(10))  # cycled three times through its own order
    assert len({i for i in seen if i >= 10}) == 10


def test_same_dataset_steps_come_from_one_file_each():
    sizes = [12, 20, 8]
    sampler = BatchSampler(40, 4, seed=5, dataset_sizes=sizes, same_dataset=True)
    bounds = [(0, 12), (12, 32), (32, 40)]
    assert sampler.steps_per_epoch == 3 + 5 + 2
    origin = []
    for s in range(sampler.steps_per_epoch):
        step = sampler.indices(s)
        owners = {k for k, (lo, hi) in enumerate(bounds) for i in step if lo <= i < hi}
        assert len(owners) == 1, step
        origin.append(owners.pop())
    assert Counter(origin) == {0: 3, 1: 5, 2: 2}
    assert origin != sorted(origin)  # the files' steps are interleaved, not one file after the other
    mixed = BatchSampler(40, 4, seed=5, dataset_sizes=sizes)
    assert any(len({k for k, (lo, hi) in enumerate(bounds) for i in mixed.indices(s) if lo <= i < hi}) > 1
               for s in range(10))


def test_one_file_keeps_the_order_single_file_runs_always_had():
    assert [BatchSampler(23, 5, 0, dataset_sizes=[23]).indices(s) for s in range(10)] == \
           [BatchSampler(23, 5, 0).indices(s) for s in range(10)]


def test_resume_refuses_another_mixture():
    run = BatchSampler(40, 8, seed=1, dataset_sizes=[10, 30], weights=[3, 1])
    other = BatchSampler(40, 8, seed=1, dataset_sizes=[10, 30], weights=[1, 1])
    with pytest.raises(DataError, match="data mixture"):
        other.load_state_dict(run.state_dict())
    legacy = {"seed": 1, "batch_size": 8, "num_examples": 40}  # a checkpoint from before mixtures
    BatchSampler(40, 8, seed=1).load_state_dict(legacy)


def test_two_weighted_files_train_one_per_step(tmp_path):
    from engine.train.trainer import Trainer

    a = write_jsonl(tmp_path / "a.jsonl", synthetic_examples(8, seed=0))
    b = write_jsonl(tmp_path / "b.jsonl", synthetic_examples(12, seed=1))
    cfg, yaml = compose(["train.batch_size=4", "task.num_negatives=1", "train.tensorboard=false", "train.max_steps=2",
                         "task.query_instruction=find", "data.doc_max_len=24", "data.query_max_len=32",
                         f"data.train=[{a},{b}]", "data.train_weights=[1,2]", "data.same_dataset_in_batch=true",
                         "data.eval=", f"train.output_dir={tmp_path / 'run'}"])
    validate(cfg)
    messages = []
    trainer = Trainer(cfg, yaml)
    assert trainer.train_data.sizes == [8, 12] and trainer.sampler.draws == [7, 13]
    assert "20 training examples from 2 files" in trainer.train_data.describe()
    trainer.train()
    del messages


@pytest.mark.parametrize("overrides, message", [
    (["data.train=[{a},{a}]"], "names a file twice"),
    (["data.train=[{a},{missing}]"], "missing.jsonl: no such file"),
    (["data.train=[{a}]", "data.train_weights=[1,2]"], "one weight >= 0 per file"),
    (["data.train={a}", "data.train_weights=[0]"], "not all 0"),
])
def test_bad_mixtures_fail_with_one_line_naming_the_key(tmp_path, overrides, message):
    a = write_jsonl(tmp_path / "a.jsonl", synthetic_examples(4))
    missing = tmp_path / "missing.jsonl"
    cfg, _ = compose([o.format(a=a, missing=missing) for o in overrides])
    with pytest.raises(ConfigError, match=message) as err:
        validate(cfg)
    assert "\n" not in str(err.value)
