"""bench/encode.py on a tiny random export: both systems run, the table comes out, and the checks
pass; the comparison behind them fails on vectors or token ids that differ."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import torch

from bench.encode import compare
from engine.build import build_task_model, load_tokenizer
from engine.cli import compose
from engine.export import export_task
from tests.conftest import REPO


def tiny_export(folder) -> str:
    # An untrained tiny Llama with the byte tokenizer: the bench only needs the two systems to agree.
    cfg, _ = compose(["task.pooling=mean", "data.doc_max_len=64"])
    tokenizer = load_tokenizer(cfg.model)
    return export_task(build_task_model(cfg, torch.device("cpu"), tokenizer), cfg, tokenizer, str(folder))


def test_encode_bench_compares_ember_and_sentence_transformers(tmp_path, tiny_data):
    model = tiny_export(tmp_path / "export")
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "encode.py"), "--model", model,
                             "--data", os.path.dirname(tiny_data[0]), "--texts", "24", "--max-tokens", "200",
                             "--batch-size", "8", "--jobs", "2", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = result.stdout
    assert re.search(r"tokens per text \(before the EOS\): min (\d+), median \d+, max (\d+)", text), text
    for name in ("Ember Embedder.encode", "sentence-transformers"):
        assert re.search(rf"^\| {name} \| [\d,.]+ \| [\d,]+ \|", text, re.M), text
    assert "PASSED" in text and re.search(r"^machine: \d+ cores", text, re.M), text
    report = json.loads(out.read_text())
    lengths = report["lengths"]
    assert 50 <= lengths["min"] < lengths["max"] <= 200  # mixed lengths in the asked range
    assert report["checks"]["min_cosine"] >= 0.99999 and report["checks"]["problems"] == []
    ember, st = report["rows"]["ember"], report["rows"]["st"]
    assert ember["texts"] == st["texts"] == 24 and ember["tokens"] == st["tokens"] > 24 * 50
    # Longer on average than the export's doc_max_len=64: the bench's --max-len reached both systems.
    assert ember["tokens"] > 24 * 64


def test_comparison_fails_on_other_vectors_or_other_token_ids():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((6, 16)).astype(np.float32)
    lengths = np.array([3, 1, 4, 2, 5, 3])
    ids = rng.integers(0, 100, int(lengths.sum()))
    ember = {"vectors": vectors, "ids": ids, "lengths": lengths}
    stats, problems = compare(ember, {**ember, "vectors": vectors * 2 + 1e-7})  # scale does not change a cosine
    assert problems == [] and stats["min_cosine"] > 0.999999

    other = vectors.copy()
    other[4] += 0.02 * rng.standard_normal(16).astype(np.float32)  # cosine ~0.9998: a different model's vector
    stats, problems = compare(ember, {**ember, "vectors": other})
    assert stats["worst_text"] == 4 and len(problems) == 1 and "cosine below" in problems[0]

    shifted = ids.copy()
    shifted[lengths[:2].sum() + 1] += 1  # one token of text 2
    stats, problems = compare(ember, {**ember, "ids": shifted})
    assert stats["token_id_mismatches"] == 1 and "text 2" in problems[0] and "position 1" in problems[0]
