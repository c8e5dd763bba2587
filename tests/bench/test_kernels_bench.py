"""bench/kernel_bench.py on a small setting: both InfoNCE methods run in their own processes, and the
chunked path's peak memory is a fraction of the naive one's already at B = N = 8192 (two tiles),
the behaviour the B = N = 32768 figure in docs/performance.md rests on."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import REPO


def test_kernel_bench_runs_and_the_chunked_infonce_saves_memory():
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "kernel_bench.py"), "--what", "all",
                             "--sizes", "8192", "--dim", "64"], capture_output=True, text=True, timeout=300,
                            cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"^ +8192 \| +naive \|", out, re.M), out
    chunked = re.search(r"^ +8192 \| +torch \|.*\| +([\d.]+)x \| +([\d.]+)x$", out, re.M)
    assert chunked, out
    assert float(chunked.group(2)) < 0.5, out  # naive: three 256 MiB (B, N) tensors; chunked: tiles of 64 MiB
    assert "attention kernels" in out
