"""Shared fixtures: tiny synthetic retrieval data and a helper to run the entry points."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "pink", "grey", "gold"]


def synthetic_examples(n: int, num_negatives: int = 3, seed: int = 0, with_scores: bool = False) -> list[dict]:
    """FlagEmbedding-format lines: 'what color is item k?' -> 'item k is <color>'."""
    import random

    rng = random.Random(seed)
    lines = []
    for k in range(n):
        color = COLORS[k % len(COLORS)]
        others = [c for c in COLORS if c != color]
        line = {
            "query": f"what color is item {k}?",
            "pos": [f"item {k} is {color}"],
            "neg": [f"item {k} is {c}" for c in rng.sample(others, num_negatives)],
        }
        if with_scores:
            line["pos_scores"] = [1.0]
            line["neg_scores"] = [round(rng.uniform(-1, 0.5), 3) for _ in range(num_negatives)]
        lines.append(line)
    return lines


def write_jsonl(path, lines) -> str:
    with open(path, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    return str(path)


@pytest.fixture
def tiny_data(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_examples(24, seed=0, with_scores=True))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", synthetic_examples(6, seed=1))
    return train, evaluation


def run_entry(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run launch/<script> as a user would, in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": REPO, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", script), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env,
    )


class InProcess:
    """A launch/ script run in this process (its __main__, as `python launch/SCRIPT ARGS` runs it): the
    same entry point without a new interpreter's imports (about 1.5 s each here); stdout/stderr and the
    exit code as subprocess.run reports them. Where a fresh interpreter matters, use run_entry."""

    def __init__(self, capsys, monkeypatch, script: str = "train.py"):
        self.capsys, self.monkeypatch, self.script = capsys, monkeypatch, script

    def __call__(self, *args: str, script: str | None = None) -> subprocess.CompletedProcess:
        import runpy

        path = os.path.join(REPO, "launch", script or self.script)
        self.monkeypatch.setattr(sys, "argv", [path, *args])
        self.capsys.readouterr()
        try:
            runpy.run_path(path, run_name="__main__")
            code = 0
        except SystemExit as exit_:
            code = exit_.code or 0
        out = self.capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.fixture
def train_here(capsys, monkeypatch):
    """launch/train.py in this process (InProcess); train_here(*args, script="export.py") for the others."""
    return InProcess(capsys, monkeypatch)


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


