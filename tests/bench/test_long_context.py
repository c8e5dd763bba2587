"""bench/long_context.py at tiny sizes (degree 1 and 2, ring and Ulysses): it runs end to end,
every rank sends exactly the analytic volume, the sequence-parallel step computes the same loss as
one process, and each rank keeps about half the activations of one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.long_context import Setup, analytic_bytes, ring_local_tokens, ulysses_layer_bytes
from tests.conftest import REPO


def test_the_bench_measures_degree_2_against_the_analytic_volume(tmp_path):
    out = tmp_path / "long.json"
    args = ["--tokens", "384", "--degrees", "1", "2", "--hidden", "32", "--heads", "4", "--kv-heads", "2",
            "--layers", "2", "--warmup-tokens", "32", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": REPO, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "long_context.py"), *args],
                            capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = next(line for line in result.stdout.splitlines() if line.startswith("summary:"))
    assert "traffic equals the analytic volume on every rank" in summary, summary
    assert "counting complete" in summary and "losses equal" in summary, summary

    rows = {(r["scheme"], r["degree"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("none", 1), ("ring", 2), ("ulysses", 2)}
    for scheme in ("ring", "ulysses"):
        row = rows[(scheme, 2)]
        assert len(row["ranks"]) == 2
        assert row["sent_forward"] > 0 and row["sent_backward"] > 0
        assert row["sent_forward"] == row["analytic_forward"] and row["sent_backward"] == row["analytic_backward"]
        # Half the tokens per rank; the constant parts (the short query, pooling, the attention
        # implementation's own copies) keep it a little off 0.5 at this size.
        assert 0.35 < row["saved_ratio"] < 0.7, (scheme, row["saved_ratio"])
        for rank in row["ranks"]:
            assert rank["peak_tensor_bytes"] >= rank["saved_bytes"] > 0
            assert rank["rss_growth_bytes"] > 0
    # FSDP2 moves the parameters and gradients over the same ranks, reported apart from attention.
    assert {"all-gather", "reduce-scatter"} <= set(rows[("ring", 2)]["other_bytes"])


def test_the_analytic_formulas_by_hand():
    # Zigzag over ring 2 cuts each sequence into 4 chunks: 5 tokens pad to 8, 64 stay: (8 + 64) / 2.
    assert ring_local_tokens([5, 64], ring=2, ulysses=1) == 36
    # Ulysses 4 on a stream of 66 tokens: a filler of 2 makes it 68.
    assert ring_local_tokens([2, 64], ring=1, ulysses=4) == 68
    # (U-1)/U x n/U x D x (2 Hq + 2 x KV heads repeated to U) x 4 bytes.
    assert ulysses_layer_bytes(64, 4, q_heads=8, kv_heads=2, head_dim=16, b=4) == 3 / 4 * 16 * 16 * (16 + 8) * 4

    class Args:
        hidden, heads, kv_heads, layers = 64, 4, 2, 3

    # Ring 2, 128-token document: query tower n = 32, document tower n = (128 + 64) / 2 = 96;
    # one K/V block is 2 x n x Hkv x D elements; forward blocks, backward (R-1) + R in float32.
    volume = analytic_bytes(Args, Setup(128, "ring", 2))
    blocks = sum(2 * n * 2 * 16 for n in (32, 96))
    assert volume == {"forward": 3 * blocks * 4, "backward": 3 * (blocks * 4 + 2 * blocks * 4)}
