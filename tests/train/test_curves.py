"""Training curves: a real tiny run's metrics.jsonl drawn by launch/plot.py, its errors, and the
TensorBoard events the same run writes."""
from __future__ import annotations

import os

import pytest

from engine.cli import compose
from engine.config import validate
from engine.train.curves import DPI, FIGSIZE_INCHES, draw, file_name, load_run
from engine.train.trainer import Trainer
from tests.conftest import InProcess, read_metrics, run_entry, synthetic_examples, write_jsonl

TINY = ["train.batch_size=4", "task.num_negatives=2", "task.query_instruction=find the item",
        "task.instruction=find the item", "data.query_max_len=64", "data.doc_max_len=24", "data.max_len=256",
        "eval.batch_size=8", "train.max_steps=3", "train.save_final=false"]
TRAIN_FILES = ["loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png"]
EVAL_KEYS = {"eval/mrr@10", "eval/ndcg@10", "eval/recall@1", "eval/recall@10", "eval/map"}  # at least these
WIDTH, HEIGHT = round(FIGSIZE_INCHES[0] * DPI), round(FIGSIZE_INCHES[1] * DPI)
# Axes, ticks, title and legend alone colour a few thousand pixels of 360,000; each curve adds more.
MIN_INKED_PIXELS = 5000


def tiny_run(run_dir, data_dir, *overrides):
    """A real training run with TensorBoard on, evaluated at step 0 and at the end; returns run_dir as str."""
    train = write_jsonl(data_dir / "train.jsonl", synthetic_examples(24, seed=0, with_scores=True))
    evaluation = write_jsonl(data_dir / "eval.jsonl", synthetic_examples(6, seed=1))
    cfg, yaml = compose(TINY + ["train.tensorboard=true", f"train.output_dir={run_dir}", f"data.train={train}",
                                f"data.eval={evaluation}", *overrides])
    validate(cfg)
    Trainer(cfg, yaml).train()
    return str(run_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs that differ in learning rate and evaluation steps (0, 2, 3 against 0, 3), trained once."""
    root = tmp_path_factory.mktemp("curves")
    return (tiny_run(root / "run_a", root, "train.lr=1e-3", "train.eval_every=2"),
            tiny_run(root / "run_b", root, "train.lr=3e-4", "train.warmup_steps=2"))


@pytest.fixture
def plot(capsys, monkeypatch):
    return InProcess(capsys, monkeypatch, script="plot.py")


def inked_pixels(path) -> int:
    """Pixels that are not near-white: what the figure drew."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (WIDTH, HEIGHT), (path, image.format, image.size)
        gray = image.convert("L")
        return sum(count for level, count in enumerate(gray.histogram()) if level < 240)


def eval_keys(run_dir) -> set[str]:
    keys = {key for record in read_metrics(run_dir) for key in record if key.startswith("eval/")}
    assert EVAL_KEYS <= keys, keys
    return keys


def assert_figures(paths, out_dir, run_dir):
    expected = TRAIN_FILES + [file_name(key) for key in eval_keys(run_dir)]
    assert sorted(os.path.basename(p) for p in paths) == sorted(expected)
    for path in paths:
        assert os.path.dirname(path) == str(out_dir)
        assert inked_pixels(path) > MIN_INKED_PIXELS, path


def test_one_run_gives_a_figure_per_quantity_in_its_plots_folder(runs, plot):
    result = plot(runs[0])
    assert result.returncode == 0, result.stderr
    paths = result.stdout.split()
    assert_figures(paths, os.path.join(runs[0], "plots"), runs[0])


def test_two_runs_side_by_side_draw_more_than_one(runs, plot, tmp_path):
    result = plot(*runs, "--out", str(tmp_path / "both"))
    assert result.returncode == 0, result.stderr
    paths = result.stdout.split()
    assert_figures(paths, tmp_path / "both", runs[0])
    draw("loss", [load_run(runs[0], "run_a")], str(tmp_path / "alone.png"))
    loss_both = next(p for p in paths if p.endswith("loss.png"))
    assert inked_pixels(loss_both) > inked_pixels(tmp_path / "alone.png")  # the second run's line and legend


def test_plot_runs_in_a_fresh_interpreter_without_a_display(runs, tmp_path):
    env_display = os.environ.pop("DISPLAY", None)
    try:
        result = run_entry("plot.py", runs[1], "--out", str(tmp_path / "fresh"), timeout=120)
    finally:
        if env_display is not None:
            os.environ["DISPLAY"] = env_display
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == len(TRAIN_FILES) + len(eval_keys(runs[1]))


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_a_folder_without_metrics_is_one_line(plot, tmp_path):
    (tmp_path / "empty_run").mkdir()
    assert_one_line_error(plot(str(tmp_path / "empty_run")), str(tmp_path / "empty_run"), "no metrics.jsonl")
    assert_one_line_error(plot(str(tmp_path / "missing")), str(tmp_path / "missing"), "no such run folder")


@pytest.mark.parametrize("content, where, reason", [
    ("", "metrics.jsonl:", "empty"),
    ("\n\n", "metrics.jsonl:", "empty"),
    ('{"step": 1, "loss": 2.0}\n{"step": 2, "loss":\n', "metrics.jsonl:2:", "not JSON"),
    ('{"step": 1, "loss": 2.0}\n\n[1, 2]\n', "metrics.jsonl:3:", "expected a JSON object"),
    ('{"loss": 2.0}\n', "metrics.jsonl:1:", "step"),
    ('{"step": 1, "tokens": 5}\n', "metrics.jsonl:", "no quantity to plot"),
])
def test_a_bad_metrics_file_names_the_file_and_line(plot, tmp_path, content, where, reason):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(content)
    result = plot(str(run))
    assert_one_line_error(result, str(run / where), reason)
    assert not (run / "plots").exists()


def test_a_binary_metrics_file_or_an_unwritable_out_is_one_line(runs, plot, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_bytes(b"\x80\x04\x95 a pickle, say")
    assert_one_line_error(plot(str(tmp_path / "run")), "metrics.jsonl", "not UTF-8")
    (tmp_path / "a_file").write_text("")
    assert_one_line_error(plot(runs[0], "--out", str(tmp_path / "a_file")), "a_file", "cannot write")


def test_a_second_bad_run_fails_before_any_figure_is_written(runs, plot, tmp_path):
    result = plot(runs[0], str(tmp_path / "nothing"), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "no such run folder")
    assert not (tmp_path / "out").exists()


def test_no_run_is_a_usage_error(plot):
    result = plot()
    assert result.returncode == 2 and "RUN" in result.stderr


def test_tensorboard_events_hold_the_losses_of_metrics_jsonl(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(runs[0], "tensorboard"))
    events.Reload()
    records = read_metrics(runs[0])
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    mrr = {r["step"]: r["eval/mrr@10"] for r in records if "eval/mrr@10" in r}
    assert sorted(losses) == [1, 2, 3] and sorted(mrr) == [0, 2, 3]
    # TensorBoard keeps scalars as float32: equal to about 7 significant digits.
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(losses, rel=1e-6)
    assert {e.step: e.value for e in events.Scalars("eval/mrr@10")} == pytest.approx(mrr, rel=1e-6)
