"""bench/comm.py on the smallest settings: the counted tensor-parallel volume per layer equals
Megatron's analytic 2(t-1)/t x 4 x T h, and no collective escapes the count."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import REPO


def test_comm_bench_matches_the_analytic_volume():
    args = ["--tp", "2", "--sp", "on", "off", "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2",
            "--batch", "2", "--negatives", "1"]
    env = {**os.environ, "PYTHONPATH": REPO, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "comm.py"), *args],
                            capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    summary = next(line for line in out.splitlines() if line.startswith("summary:"))
    assert "per layer: tp2 sp 1.000, tp2 1.000;" in summary, summary
    assert summary.endswith("counting complete"), summary
    # Both towers in one pass (engine/tasks/base.py encode_together) x 2 layers x 2 places per layer,
    # in each direction.
    for op in ("all-gather", "reduce-scatter"):
        for phase in ("forward", "backward"):
            assert re.search(rf"^tp +layers +activation +{phase} +{op} +4 ", out, re.M), out
    assert re.search(r"^tp +layers +activation +backward +all-reduce +4 ", out, re.M), out
    # The extras are listed apart: the embedding's reduce and, under SP, the final gather.
    assert re.search(r"^tp +model\.embed_tokens +activation +forward +reduce-scatter +1 ", out, re.M), out
    assert re.search(r"^tp +output_gather +activation +forward +all-gather +1 ", out, re.M), out
