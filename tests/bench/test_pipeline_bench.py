"""bench/pipeline.py on the smallest settings: the measured bubble follows (p-1)/(v m + p-1), the
interleaved schedule's is smaller than 1F1B's, and 1F1B keeps fewer activations than GPipe on the
first stage, as the timeline counts."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import REPO


def test_pipeline_bench_measures_the_bubble_and_the_activations_of_each_schedule():
    args = ["--pp", "2", "--micro", "4", "--work-ms", "60", "--repeats", "2", "--layers", "4", "--hidden", "64",
            "--tokens", "128"]
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "pipeline.py"), *args],
                            capture_output=True, text=True, timeout=180, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    bubble = {m.group(1).strip(): [float(x) for x in m.group(3, 4, 5)]
              for m in re.finditer(r"^(gpipe|1f1b|interleaved v2) +(\d+) +([\d.]+) +([\d.]+) +([\d.]+) ", out, re.M)}
    assert set(bubble) == {"gpipe", "1f1b", "interleaved v2"}, out
    for name, (measured, timeline, formula) in bubble.items():
        assert timeline == formula, (name, out)  # m = 4 is a multiple of pp = 2
        # Transfers add a little: ~3 ms each on a loaded CI machine, against 60 ms of work per
        # micro-batch (at 30 ms the interleaved schedule's 16 transfers once added 0.09).
        assert formula - 0.02 <= measured <= formula + 0.08, (name, out)
    assert bubble["interleaved v2"][0] < bubble["1f1b"][0], out
    memory = {m.group(1).strip(): ([float(m.group(2)), float(m.group(3))], [int(m.group(4)), int(m.group(5))])
              for m in re.finditer(r"^(gpipe|1f1b|interleaved v2) +([\d.]+) +([\d.]+) +(\d+) (\d+)$", out, re.M)}
    assert memory["gpipe"][1] == [8, 8] and memory["1f1b"][1] == [4, 2] and memory["interleaved v2"][1] == [5, 3], out
    assert memory["1f1b"][0][0] < memory["gpipe"][0][0] / 1.5, out
    assert memory["1f1b"][0][1] < memory["1f1b"][0][0], out  # the last stage keeps fewer in flight
