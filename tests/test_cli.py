"""The entry points as a user runs them: one-line errors, dry runs, train -> export -> evaluate."""
from __future__ import annotations

import json
import re
import time

from tests.conftest import run_entry, synthetic_examples, write_jsonl

TINY = ["train.batch_size=4", "task.num_negatives=2", "train.tensorboard=false",
        "task.query_instruction=find the item", "data.query_max_len=64", "data.doc_max_len=24"]


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    text = "\n".join(lines)
    for fragment in fragments:
        assert fragment in text, text
    return lines


def test_malformed_data_reports_every_bad_line_and_exits_nonzero(tmp_path):
    good = json.dumps(synthetic_examples(1)[0])
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([good, "{not json", good, '{"query": "q", "pos": []}', "",
                               '{"query": "q", "pos": [3]}']) + "\n")
    result = run_entry("train.py", f"data.train={path}", f"train.output_dir={tmp_path / 'run'}", *TINY)
    lines = assert_one_line_error(result, f"{path}:2:", f"{path}:4:", f"{path}:6:")
    assert len(lines) == 3  # one line per bad line, nothing else
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_on_error_skip_skips_and_counts(tmp_path):
    lines = [json.dumps(x) for x in synthetic_examples(8)] + ["{not json"]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = run_entry("train.py", f"data.train={path}", "data.on_error=skip", "train.max_steps=1",
                       f"train.output_dir={tmp_path / 'run'}", *TINY)
    assert result.returncode == 0, result.stderr
    assert "skipped 1" in (result.stdout + result.stderr).lower()


def test_config_errors_are_one_line(tmp_path, train_here):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_examples(4))
    cases = [
        (["train.no_such_key=1"], "no_such_key"),
        (["task.pooling=max"], "task.pooling"),
        (["train.batch_size=6", "train.grad_accum=4"], "train.grad_accum"),
        (["data.train=/nonexistent.jsonl"], "/nonexistent.jsonl"),
        (["model.num_heads=3"], "model.num_heads"),
        (["train.log_every=0"], "train.log_every"),
        (["eval.k=[0]"], "eval.k"),
        (["train.betas=[0.9]"], "train.betas"),
        (["task.distill_temperature=0"], "task.distill_temperature"),
        (["train.device=cuda"], "train.device=cuda"),
        (["train.recompute=blocks"], "train.recompute"),
        (["train.collective_timeout=0"], "train.collective_timeout"),
        (["task.query_template='Q: {query} (end)'", "export.output_dir=/tmp/x"], "task.query_template"),
        (["task.query_template=Q: {query}"], "task.query_template=Q: {query}"),
    ]
    for index, (overrides, fragment) in enumerate(cases):
        # The first in a fresh interpreter, as a user runs it; the rest in this process (same entry point).
        run = run_entry if index == 0 else train_here
        result = run("train.py", f"data.train={data}", f"train.output_dir={tmp_path / 'r'}", *overrides) if index == 0 \
            else run(f"data.train={data}", f"train.output_dir={tmp_path / 'r'}", *overrides)
        lines = assert_one_line_error(result, fragment)
        assert len(lines) == 1, lines


def test_dry_run_of_the_70b_reranker_takes_seconds():
    start = time.perf_counter()
    result = run_entry("train.py", "+exp=reranker_70b", "train.dry_run=true")
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert "70.55B total" in result.stdout, result.stdout
    assert "memory per rank" in result.stdout
    assert elapsed < 60


def test_every_real_size_experiment_validates(train_here):
    # In this process (the fresh-interpreter dry run is the test above): the same entry point.
    for exp in ("embedding_qwen3_8b", "reranker_qwen3_8b", "embedding_70b", "reranker_70b"):
        result = train_here(f"+exp={exp}", "train.dry_run=true")
        assert result.returncode == 0, (exp, result.stderr)
        if exp.endswith("70b"):  # pp 2: each stage's layers and memory, by the stage rule
            assert "  stage 0: embedding + layers 0-" in result.stdout, result.stdout
            assert re.search(r"  stage 1: layers \d+-79 \+ head: weights .* GiB per rank", result.stdout), result.stdout
            assert re.search(r"^pipeline: 1f1b schedule, \d+ micro-batches per pass, bubble", result.stdout, re.M)
    # The interleaved schedule plans two chunks per stage.
    result = train_here("+exp=embedding_70b", "train.dry_run=true", "parallel.pp_schedule=interleaved",
                        "parallel.pp_virtual=2")
    assert result.returncode == 0, result.stderr
    assert re.search(r"  stage 0: embedding \+ layers 0-\d+; layers \d+-\d+: weights", result.stdout), result.stdout
    assert "pipeline: interleaved schedule, 2 virtual stages per rank" in result.stdout, result.stdout


def test_train_export_evaluate_through_the_command_line(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_examples(16))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", synthetic_examples(5, seed=3))
    run_dir = tmp_path / "run"
    result = run_entry("train.py", f"data.train={train}", f"data.eval={evaluation}", f"train.output_dir={run_dir}",
                       "train.max_steps=2", "lora.rank=4", *TINY)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary["final"]) >= {"mrr@10", "ndcg@10", "recall@1", "recall@10", "map"}

    export_dir = tmp_path / "export"
    result = run_entry("export.py", f"checkpoint={run_dir}/checkpoints/step_00000002", f"output={export_dir}")
    assert result.returncode == 0, result.stderr
    run_file = tmp_path / "run.trec"
    result = run_entry("evaluate.py", f"model.path={export_dir}", f"data.eval={evaluation}",
                       f"eval.save_run={run_file}")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    # The exported model is the trained one: same metrics as the run's final evaluation.
    for key, value in summary["final"].items():
        assert abs(metrics[key] - value) < 1e-6, key
    first = run_file.read_text().splitlines()[0].split()
    assert first[0] == "q0" and first[1] == "Q0" and first[2].startswith("d")


def test_runs_under_torchrun_with_one_process(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    train = write_jsonl(tmp_path / "train.jsonl", synthetic_examples(8))
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         os.path.join(REPO, "launch", "train.py"), f"data.train={train}", f"train.output_dir={tmp_path / 'run'}",
         "train.max_steps=2", *TINY],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["steps"] == 2


def test_entry_point_mistakes_are_one_line(tmp_path, train_here):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_examples(4))
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "config.json").write_text('{"model_type": "gpt2"}')
    cases = [
        ("export.py", ["output=/tmp/x"], "checkpoint=... is required"),
        ("export.py", [f"checkpoint={tmp_path}", "output=/tmp/x", "color=red"], "unknown argument"),
        ("evaluate.py", [f"model.path={tmp_path / 'not_a_model'}"], "data.eval is required"),
        ("evaluate.py", [f"model.path={tmp_path / 'not_a_model'}", f"data.eval={data}"], "gpt2"),
        ("train.py", [f"data.train={data}", f"train.output_dir={tmp_path / 'r'}", f"train.resume={tmp_path}"],
         "not a complete checkpoint"),
        ("train.py", [f"data.train={data}", "parallel.tp=2"], "does not divide the world size 1"),
        ("train.py", [f"data.train={data}", f"train.output_dir={tmp_path / 'r'}", "kernels.attention=nope"],
         "kernels.attention='nope'"),
        ("train.py", [f"data.train={data}", f"train.output_dir={tmp_path / 'r'}", "kernels.attention=flash_attn"],
         "kernels.attention=flash_attn"),
        ("train.py", [f"data.train={data}", f"model.path={tmp_path}"], "no config.json"),
        ("export.py", [f"checkpoint={tmp_path}", "output=/tmp/x", "export.merge_lora=maybe"], "export.merge_lora"),
        ("export.py", [f"checkpoint={tmp_path}", "output=/tmp/x"], "no config.yaml"),
    ]
    for index, (script, args, fragment) in enumerate(cases):
        # Each script once in a fresh interpreter, as a user runs it; the rest in this process.
        fresh = all(script != earlier for earlier, _, _ in cases[:index])
        result = run_entry(script, *args) if fresh else train_here(*args, script=script)
        lines = assert_one_line_error(result, fragment)
        assert len(lines) == 1, (script, lines)


def test_rank_prefix_only_under_torchrun(monkeypatch):
    from engine.cli import rank_prefix

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_prefix() == ""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert rank_prefix() == "[rank 3] "
