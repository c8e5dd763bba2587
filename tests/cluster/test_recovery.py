"""A killed rank costs nothing: `torchrun --max-restarts=2` with train.resume=auto, one rank SIGKILLed
(engine/train/faults.py, the same point every try) in the middle of a step, or after writing its
shards of a checkpoint that is then never completed. Each job finishes with the losses of the
uninterrupted run (relative 1e-6), resumes from the newest *complete* checkpoint (never the
half-written one), and logs its restart as one line. Under plain torchrun (static rendezvous) and
--standalone (c10d) alike: both failed in 4 of 10 tries before the per-attempt store prefix
(engine/parallel/mesh.py attempt_store)."""
from __future__ import annotations

import os

import pytest

from tests.cluster.conftest import assert_same_losses, losses, torchrun

CASES = {
    # (fault, torchrun arguments, the checkpoint the restart must resume from)
    "mid-step": ("kill:rank=1:step=3:at=step", ("--max-restarts=2",), "step_00000002"),
    "during-checkpoint": ("kill:rank=1:step=4:at=checkpoint", ("--standalone", "--max-restarts=2"), "step_00000002"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_killed_rank_restarts_and_the_job_ends_with_the_uninterrupted_losses(case, two_rank_losses, tmp_path):
    fault, torchrun_args, resume_from = CASES[case]
    run = tmp_path / "run"
    result = torchrun(2, run, "train.resume=auto", torchrun_args=torchrun_args, extra_env={"EMBER_FAULT": fault})
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "[ember] EMBER_FAULT: rank 1: kill" in log, log[-4000:]
    restarts = [line for line in log.splitlines() if line.startswith("[ember] restart ")]
    assert restarts == ["[ember] restart 1 of at most 2: torchrun restarted every rank after a failure; "
                        "resuming as train.resume says"], log[-4000:]
    assert f"[ember] resumed from {run / 'checkpoints' / resume_from} at step 2" in log, log[-4000:]
    if case == "during-checkpoint":  # the unfinished one was not loaded, and a complete step 4 was written later
        assert os.path.isfile(run / "checkpoints" / "step_00000004" / "trainer_state.json")
    assert_same_losses(losses(run), two_rank_losses, rel=1e-6)
