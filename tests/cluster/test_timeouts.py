"""Hangs end: a rank that stops joining collectives (engine/train/faults.py "hang") makes the other
rank exit non-zero within train.collective_timeout (+30 s), with one line naming the missing rank,
where it is, and the collective this rank waited in; torchrun then ends the job. Nothing waits for
torch's default 30 minutes."""
from __future__ import annotations

import re
import time

from tests.cluster.conftest import torchrun

TIMEOUT_S = 10


def test_a_rank_that_stops_joining_ends_the_job_within_the_collective_timeout(tmp_path):
    start = time.monotonic()
    result = torchrun(2, tmp_path / "run", f"train.collective_timeout={TIMEOUT_S}", "train.max_steps=4",
                      extra_env={"EMBER_FAULT": "hang:rank=1:step=2:at=step"}, timeout=TIMEOUT_S + 120)
    elapsed = time.monotonic() - start
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    lines = [line for line in log.splitlines() if line.startswith("[rank 0] collective failed")]
    assert len(lines) == 1, log[-3000:]
    line = lines[0]
    assert line.startswith("[rank 0] collective failed at step 2: loss all-reduce over dp after at most "
                           f"train.collective_timeout={TIMEOUT_S} s ("), line
    assert re.search(r"rank 1 is at step 2: forward/backward \(this rank, 0, is at step 2: loss all-reduce", line), line
    # Startup (imports, the model) takes a few seconds here; the wait itself is the timeout.
    assert elapsed < TIMEOUT_S + 30 + 20, (elapsed, log[-3000:])
