"""The training loop end to end on a tiny random model: metrics, resume, checkpoints, guards."""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

from engine.cli import compose
from engine.config import ConfigError, validate
from engine.train import checkpoint as ckpt
from engine.train.trainer import Trainer, TrainingAborted
from tests.conftest import read_metrics

# A short instruction: with the byte tokenizer the default one alone would fill query_max_len.
TINY = ["train.batch_size=4", "task.num_negatives=2", "train.lr=1e-3", "train.tensorboard=false",
        "task.query_instruction=find the item", "task.instruction=find the item",
        "data.query_max_len=64", "data.doc_max_len=24", "data.max_len=256", "eval.batch_size=8"]


def make_trainer(run_dir, data, *overrides):
    train, evaluation = data
    cfg, yaml = compose(TINY + [f"train.output_dir={run_dir}", f"data.train={train}", f"data.eval={evaluation}",
                                *overrides])
    validate(cfg)
    return Trainer(cfg, yaml)


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.mark.parametrize("task", [
    ["task=embedding"],
    ["task=embedding", "lora.rank=4", "lora.dropout=0.1", "task.pooling=mean"],
    ["task=reranker"],
    ["task=reranker", "task.head=linear", "task.loss=bce", "lora.rank=4"],
    ["task=reranker", "task.loss=distill"],
])
def test_metrics_file_has_training_and_eval_lines(tmp_path, tiny_data, task):
    trainer = make_trainer(tmp_path / "run", tiny_data, "train.max_steps=3", *task)
    trainer.train()
    records = read_metrics(tmp_path / "run")
    train_lines = [r for r in records if "loss" in r]
    eval_lines = [r for r in records if "eval/mrr@10" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3]
    for r in train_lines:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(r)
        assert math.isfinite(r["loss"]) and r["tokens"] > 0
    assert [r["step"] for r in eval_lines] == [0, 3]  # zero-shot before any update, then final
    assert {"eval/ndcg@10", "eval/recall@1", "eval/recall@10", "eval/map"} <= set(eval_lines[0])
    assert os.path.isfile(tmp_path / "run" / "config.yaml")
    assert ckpt.latest_checkpoint(str(tmp_path / "run")).endswith("step_00000003")


def test_training_lowers_the_loss(tmp_path, tiny_data):
    trainer = make_trainer(tmp_path / "run", tiny_data, "train.max_steps=12", "train.schedule=constant")
    trainer.train()
    curve = losses(tmp_path / "run")
    assert sum(list(curve.values())[-3:]) < sum(list(curve.values())[:3])


@pytest.mark.parametrize("task", [["task=embedding", "lora.rank=4", "lora.dropout=0.1"], ["task=reranker"]])
def test_resume_reproduces_the_uninterrupted_losses_exactly(tmp_path, tiny_data, task):
    full = make_trainer(tmp_path / "full", tiny_data, "train.max_steps=6", "train.warmup_steps=2", *task)
    full.train()
    expected = losses(tmp_path / "full")

    first = make_trainer(tmp_path / "part", tiny_data, "train.max_steps=6", "train.warmup_steps=2",
                         "train.save_every=3", *task)
    # Stop after step 4 as a crash would: the checkpoint of step 3 is the newest complete one.
    for _ in range(4):
        record = first.train_step()
        first.logger.log(record)
        if first.step == 3:
            first.save()
    resumed = make_trainer(tmp_path / "part", tiny_data, "train.max_steps=6", "train.warmup_steps=2",
                           "train.save_every=3", "train.resume=auto", *task)
    assert resumed.step == 3
    resumed.train()
    got = losses(tmp_path / "part")
    assert got == expected  # exact: same floats, fp32 on CPU


def test_half_written_checkpoint_is_never_picked_up(tmp_path, tiny_data):
    trainer = make_trainer(tmp_path / "run", tiny_data, "train.max_steps=2", "train.save_every=1")
    trainer.train()
    root = tmp_path / "run" / "checkpoints"
    # A crash during the rename-less write leaves a temporary folder; one during the write of a
    # newer step could leave a step folder without its state file.
    shutil.copytree(root / "step_00000002", root / "step_00000009.tmp-123")
    shutil.copytree(root / "step_00000002", root / "step_00000005")
    os.remove(root / "step_00000005" / ckpt.STATE_FILE)
    assert ckpt.latest_checkpoint(str(tmp_path / "run")).endswith("step_00000002")
    resumed = make_trainer(tmp_path / "run", tiny_data, "train.max_steps=3", "train.resume=auto")
    assert resumed.step == 2


# No dropout here: grad-cache draws its masks chunk by chunk, the plain step in one go, so with
# dropout the two are equal in distribution only (tests/train/test_grad_cache.py checks the
# chunk replay itself with dropout on).
@pytest.mark.parametrize("task", [["task=embedding", "lora.rank=4"], ["task=reranker"]])
def test_grad_cache_step_equals_plain_step(tmp_path, tiny_data, task):
    plain = make_trainer(tmp_path / "a", tiny_data, "train.max_steps=2", *task)
    cached = make_trainer(tmp_path / "b", tiny_data, "train.max_steps=2", *task,
                          "train.grad_cache=true", "train.grad_cache_chunk=3")
    # Compare gradients, not parameters after AdamW: Adam turns noise-level gradient
    # differences (float summation order) into full-size updates. In float64 so that the
    # comparison is about the algorithm, not about fp32 summation order across chunks.
    for trainer in (plain, cached):
        trainer.model.double()
        batch = trainer.collator([trainer.train_examples[i] for i in trainer.sampler.indices(0)], 0)
        loss = trainer.forward_backward(trainer.model, [batch])
    assert plain.params and len(plain.params) == len(cached.params)
    for (name, p), (_, q) in zip(plain.model.named_parameters(), cached.model.named_parameters()):
        if p.requires_grad:
            scale = p.grad.abs().max().item()
            assert (q.grad - p.grad).abs().max().item() <= 1e-10 * scale, name
    assert loss > 0


def test_non_finite_loss_is_skipped_then_aborts(tmp_path, tiny_data):
    trainer = make_trainer(tmp_path / "run", tiny_data, "train.max_steps=5", "train.max_bad_steps=2")
    before = [p.detach().clone() for p in trainer.params]
    trainer.model.loss_from_outputs = lambda outputs, batch: torch.tensor(float("nan"), requires_grad=True)
    trainer.train_step()
    assert trainer.skipped_steps == 1 and trainer.step == 1
    for p, q in zip(before, trainer.params):
        assert torch.equal(p, q)  # the bad step changed nothing
    with pytest.raises(TrainingAborted, match="2 non-finite losses in a row"):
        trainer.train_step()


def test_grad_accum_logs_the_mean_loss_and_the_same_gradient(tmp_path, tiny_data):
    # Without in-batch negatives every query's loss is its own, so splitting the batch into
    # micro-batches must give the same loss and gradient as one batch.
    common = ["train.max_steps=1", "task.in_batch_negatives=false", "train.clip_grad_norm=0"]
    one = make_trainer(tmp_path / "a", tiny_data, *common)
    four = make_trainer(tmp_path / "b", tiny_data, *common, "train.grad_accum=4")
    r1, r4 = one.train_step(), four.train_step()
    assert r1["loss"] == pytest.approx(r4["loss"], rel=1e-5)  # fp32 means taken in another order
    assert r1["grad_norm"] == pytest.approx(r4["grad_norm"], rel=1e-5)


def test_a_fresh_run_refuses_a_folder_with_another_runs_checkpoints(tmp_path, tiny_data):
    make_trainer(tmp_path / "run", tiny_data, "train.max_steps=1").train()
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        make_trainer(tmp_path / "run", tiny_data, "train.max_steps=1")


def test_resume_survives_a_metrics_line_cut_short_by_the_crash(tmp_path, tiny_data):
    make_trainer(tmp_path / "run", tiny_data, "train.max_steps=2").train()
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    resumed = make_trainer(tmp_path / "run", tiny_data, "train.max_steps=3", "train.resume=auto")
    resumed.train()
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2, 3]


def test_distill_without_teacher_scores_fails_before_the_model_is_built(tmp_path):
    from tests.conftest import synthetic_examples, write_jsonl

    data = write_jsonl(tmp_path / "t.jsonl", synthetic_examples(8))
    with pytest.raises(ConfigError, match=r"t.jsonl:1 has no pos_scores"):
        make_trainer(tmp_path / "run", (data, ""), "task=reranker", "task.loss=distill")


def test_distill_with_a_line_without_negatives_names_that_line(tmp_path):
    """A line with scores but no negatives would borrow other queries' documents, which its teacher
    never scored: refused before the model is built, naming the line."""
    from tests.conftest import synthetic_examples, write_jsonl

    lines = synthetic_examples(8, with_scores=True)
    lines[4]["neg"], lines[4]["neg_scores"] = [], []
    data = write_jsonl(tmp_path / "t.jsonl", lines)
    with pytest.raises(ConfigError, match=r"needs each query's own scored negatives: .*t.jsonl:5 has none"):
        make_trainer(tmp_path / "run", (data, ""), "task=embedding", "task.loss=distill")


@pytest.mark.parametrize("task", [
    ["task=reranker", "task.loss=hinge", "task.hinge_margin=0.5"],
    ["task=reranker", "task.loss=ranknet"],
    ["task=embedding", "task.loss=distill", "train.lr=1e-4"],
])
def test_pairwise_and_distillation_losses_train(tmp_path, tiny_data, task):
    trainer = make_trainer(tmp_path / "run", (tiny_data[0], ""), "train.max_steps=3", "train.schedule=constant",
                           *task)
    first = trainer.collator([trainer.train_examples[i] for i in trainer.sampler.indices(0)], 0)

    def loss_of_the_first_batch():
        with torch.no_grad():
            return trainer.model(first).item()

    before = loss_of_the_first_batch()
    trainer.train()
    assert losses(tmp_path / "run")[1] == pytest.approx(before, rel=1e-5)  # the loss trained is the loss computed
    assert loss_of_the_first_batch() < before


def test_matryoshka_evaluation_reports_every_dimension(tmp_path, tiny_data):
    trainer = make_trainer(tmp_path / "run", tiny_data, "train.max_steps=1", "task.matryoshka_dims=[8,32]")
    results = trainer.train()
    for name in ("mrr@10", "dim8/mrr@10", "dim32/mrr@10", "dim8/ndcg@10"):
        assert name in results["final"], sorted(results["final"])
    assert "eval/dim8/mrr@10" in read_metrics(tmp_path / "run")[-1]
    # Truncated to the full size, the prefix metrics would equal the full ones: they are not copies.
    assert results["final"]["dim8/mrr@10"] != results["final"]["mrr@10"] or \
        results["final"]["dim8/map"] != results["final"]["map"]


@pytest.mark.parametrize("overrides, message", [
    (["task.loss=hinge"], r"task.loss='hinge' is not one of auto, infonce, distill \(for task.type=embedding\)"),
    (["task=reranker", "task.loss=infonce"], "is not one of auto, listwise, bce, distill, hinge, ranknet"),
    (["task=reranker", "task.loss=ranknet", "task.num_negatives=0"], "ranknet needs task.num_negatives >= 1"),
    (["task.matryoshka_dims=[32,8]"], "distinct sizes >= 1 in increasing order"),
    (["task.matryoshka_dims=[8,64]"], "below model.hidden_size=64"),
    (["task.matryoshka_dims=[8]", "task.matryoshka_weights=[1,2]"], "one weight >= 0 per entry"),
    (["task.matryoshka_weights=[1]"], "task.matryoshka_dims is empty"),
    (["task=reranker", "task.matryoshka_dims=[8]"], "is for task.type=embedding"),
])
def test_recipe_keys_fail_in_one_line(tmp_path, tiny_data, overrides, message):
    cfg, _ = compose(TINY + [f"data.train={tiny_data[0]}", *overrides])
    with pytest.raises(ConfigError, match=message) as err:
        validate(cfg)
    assert "\n" not in str(err.value)
