"""Hydra's `null` means "none" for every optional key, as Hydra users write it.

Each optional key is set to null on the command line over an experiment or a setting that gave
it a value, and the run shows the "none" behaviour: no evaluation, random init, the byte-level
tokenizer, no TREC file, no export, a fresh start. A required key given null is a one-line error.
"""
from __future__ import annotations

import json
import os

import pytest

from engine.cli import compose
from engine.config import ConfigError, RunConfig, validate
from tests.conftest import run_entry, synthetic_examples, write_jsonl

TINY_STEPS = ["+exp=tiny", "train.max_steps=1", "eval.max_queries=4"]
OPTIONAL_KEYS = ("model.path", "model.tokenizer", "model.rope_scaling", "data.eval", "train.resume",
                 "eval.save_run", "export.output_dir")


def summary_of(result) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("key", OPTIONAL_KEYS)
def test_null_composes_to_none_over_a_value(key):
    """Over a value set by the experiment or an earlier override, null leaves None in the typed config."""
    first = {"model.rope_scaling": "++model.rope_scaling={rope_type:linear,factor:2.0}"}.get(key, f"{key}=somewhere")
    cfg, yaml = compose(["+exp=tiny", first, f"{key}=null"])
    section, field = key.split(".")
    assert getattr(getattr(cfg, section), field) is None
    assert f"{field}: null" in yaml


def test_every_optional_key_of_the_schema_is_listed_here():
    """A new Optional key gets its null test: the list above is the schema's optional keys."""
    import dataclasses
    import typing

    import engine.config

    optional = set()
    for section in dataclasses.fields(RunConfig):
        schema = getattr(engine.config, section.type) if isinstance(section.type, str) else section.type
        hints = typing.get_type_hints(schema)
        for field in dataclasses.fields(schema):
            if type(None) in typing.get_args(hints[field.name]):
                optional.add(f"{section.name}.{field.name}")
    # data.train is typed Any (a path or a list of paths), so null is allowed without Optional.
    assert optional == set(OPTIONAL_KEYS)


def test_data_eval_null_trains_without_evaluation(tmp_path):
    summary = summary_of(run_entry("train.py", *TINY_STEPS, "data.eval=null", f"train.output_dir={tmp_path}"))
    assert summary["steps"] == 1
    assert "zero_shot" not in summary and "final" not in summary  # +exp=tiny evaluates when data.eval is set


def test_model_path_null_trains_a_random_init_model(tmp_path, train_here):
    summary = summary_of(train_here(*TINY_STEPS, f"model.path={tmp_path}/not_a_model",
                                   "model.path=null", f"train.output_dir={tmp_path}/run"))
    assert summary["steps"] == 1


def test_model_tokenizer_null_uses_the_byte_level_tokenizer(tmp_path, train_here):
    summary = summary_of(train_here(*TINY_STEPS, f"model.tokenizer={tmp_path}/no_tokenizer",
                                   "model.tokenizer=null", f"train.output_dir={tmp_path}/run"))
    assert summary["steps"] == 1


def test_eval_save_run_null_writes_no_run_file(tmp_path, train_here):
    run_file = tmp_path / "run.trec"
    summary = summary_of(train_here(*TINY_STEPS, f"eval.save_run={run_file}", "eval.save_run=null",
                                   f"train.output_dir={tmp_path}/run"))
    assert "final" in summary and not run_file.exists()


def test_export_output_dir_null_exports_nothing(tmp_path, train_here):
    export_dir = tmp_path / "export"
    summary_of(train_here(*TINY_STEPS, f"export.output_dir={export_dir}", "export.output_dir=null",
                         f"train.output_dir={tmp_path}/run"))
    assert not export_dir.exists()


def test_train_resume_null_means_a_fresh_run(tmp_path, train_here):
    """null is "start fresh": a second run into the same folder is refused as for "" (it never resumes)."""
    run_dir = tmp_path / "run"
    first = summary_of(train_here(*TINY_STEPS, "data.eval=null", "train.resume=null",
                                  f"train.output_dir={run_dir}"))
    assert first["steps"] == 1 and os.listdir(run_dir / "checkpoints")
    again = train_here(*TINY_STEPS, "data.eval=null", "train.resume=null", f"train.output_dir={run_dir}")
    assert again.returncode == 2 and "train.resume=auto continues it" in again.stderr, again.stderr


def test_evaluate_with_save_run_null(tmp_path, train_here):
    """evaluate.py composes the same tree: eval.save_run=null evaluates and writes nothing."""
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_examples(8))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", synthetic_examples(4, seed=3))
    export_dir = tmp_path / "export"
    summary_of(train_here(*TINY_STEPS, f"data.train={train}", "data.eval=null",
                         f"export.output_dir={export_dir}", f"train.output_dir={tmp_path}/run"))
    result = run_entry("evaluate.py", f"model.path={export_dir}", f"data.eval={evaluation}", "eval.save_run=null")
    assert set(summary_of(result)) >= {"mrr@10", "recall@1"}
    assert not list(tmp_path.glob("*.trec"))


def test_data_train_null_is_a_one_line_error(tmp_path, train_here):
    result = train_here("+exp=tiny", "data.train=null", f"train.output_dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "data.train is empty" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_key_that_is_not_optional_says_so_in_one_line():
    with pytest.raises(ConfigError, match="train.output_dir"):
        compose(["train.output_dir=null"])


def test_validate_treats_null_and_empty_alike():
    cfg, _ = compose(["+exp=tiny", "data.eval=null", "model.path=null"])
    validate(cfg)
    cfg.data.eval, cfg.model.path = "", ""
    validate(cfg)


def test_rope_scaling_takes_a_dict_on_the_command_line_and_empty_means_plain_rope():
    """Hydra adds a dict's keys with ++ (the plain form is a one-line error naming the key)."""
    with pytest.raises(ConfigError, match="model.rope_scaling"):
        compose(["model.rope_scaling={rope_type:linear,factor:2.0}"])
    cfg, _ = compose(["++model.rope_scaling={rope_type:linear,factor:2.0}"])
    assert cfg.model.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    from engine.model.args import ModelArgs

    assert ModelArgs.from_model_config(cfg.model).rope_scaling == {"rope_type": "linear", "factor": 2.0}
    for override in ("model.rope_scaling={}", "model.rope_scaling=null"):
        cfg, _ = compose([override])
        assert ModelArgs.from_model_config(cfg.model).rope_scaling is None
