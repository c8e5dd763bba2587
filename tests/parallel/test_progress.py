"""engine/parallel/progress.py without processes (a HashStore stands in for torchrun's): marks cost no
store request on the training path, the publishing thread writes the latest within PUBLISH_EVERY_S,
and a failed collective's line names the ranks that stopped responding (even in the same phase),
that are elsewhere, or that never reported, and never one that gave up on the collective itself."""
from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from engine.parallel import progress as progress_module
from engine.parallel.progress import Progress


@pytest.fixture(autouse=True)
def fast_heartbeats(monkeypatch):
    """Beats every 0.1 s, stale after 0.6 s: the same logic as 1 s / 3.5 s, ten times faster."""
    monkeypatch.setattr(progress_module, "PUBLISH_EVERY_S", 0.1)
    monkeypatch.setattr(progress_module, "STALE_AFTER_S", 0.6)


def wait_published(progress: Progress, key: str, value: str) -> None:
    deadline = time.monotonic() + 5 * progress_module.PUBLISH_EVERY_S
    while time.monotonic() < deadline:
        if progress.store.check([key]) and progress.store.get(key).decode() == value:
            return
        time.sleep(0.05)
    raise AssertionError(f"{key} never became {value!r}")


def test_marks_are_published_by_the_thread_and_the_line_names_who_is_elsewhere():
    store = dist.HashStore()
    waiting, stuck = Progress(0, 3, 10, store), Progress(1, 3, 10, store)  # rank 2 never reports
    waiting.mark(2, "loss all-reduce over dp")
    stuck.mark(2, "forward/backward")
    assert not store.check([waiting.prefix + "0"]), "mark() itself must not write to the store"
    wait_published(stuck, stuck.prefix + "1", "step 2: forward/backward")
    wait_published(waiting, waiting.prefix + "0", "step 2: loss all-reduce over dp")
    line = waiting.explain(RuntimeError("[../unbound_buffer.cc:78] Timed out waiting 10000ms for recv"))
    assert line == ("collective failed at step 2: loss all-reduce over dp after at most train.collective_timeout=10 s "
                    "(Timed out waiting 10000ms for recv); rank 1 is at step 2: forward/backward, rank 2 never "
                    "reported (this rank, 0, is at step 2: loss all-reduce over dp)")


def test_without_a_store_the_line_says_so():
    alone = Progress(0, 2, 5)
    alone.mark(1, "forward/backward")
    assert alone.explain(RuntimeError("Connection closed by peer")).endswith(
        "the other ranks' positions could not be read (the rendezvous store is gone)")


def test_a_rank_that_stopped_in_the_same_phase_is_named_and_one_that_gave_up_is_not():
    store = dist.HashStore()
    waiting, dead, gave_up = (Progress(rank, 3, 10, store) for rank in range(3))
    for progress in (waiting, dead, gave_up):
        progress.mark(4, "forward/backward")
        wait_published(progress, progress.prefix + str(progress.rank), "step 4: forward/backward")
    dead.stop()  # a killed process: its heartbeat stops, its mark stays
    first = gave_up.explain(RuntimeError("Timed out waiting 10000ms for recv"))
    assert first.endswith("rank 1 stopped responding at step 4: forward/backward "
                          "(this rank, 2, is at step 4: forward/backward)"), first
    line = waiting.explain(RuntimeError("Timed out waiting 10000ms for recv"))
    # Rank 2 gave up on the collective (its own timeout): the culprit is rank 1 only.
    assert line.endswith("; rank 1 stopped responding at step 4: forward/backward "
                         "(this rank, 0, is at step 4: forward/backward)"), line


def test_when_every_rank_is_alive_in_the_same_phase_the_line_says_so():
    store = dist.HashStore()
    ranks = [Progress(rank, 2, 10, store) for rank in range(2)]
    for progress in ranks:
        progress.mark(1, "gradient norm all-reduce")
        wait_published(progress, progress.prefix + str(progress.rank), "step 1: gradient norm all-reduce")
    line = ranks[0].explain(RuntimeError("Timed out"))
    assert line.endswith("; no other rank stopped or is elsewhere (one is stuck inside the same phase, "
                         "or the network failed)"), line
    ranks[1].stop()
