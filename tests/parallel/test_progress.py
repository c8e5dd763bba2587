"""engine/parallel/progress.py without processes (a HashStore stands in for torchrun's): marks cost no
store request on the training path, the publishing thread writes the latest within PUBLISH_EVERY_S,
and a failed collective's line names the ranks that are elsewhere, or that never reported."""
from __future__ import annotations

import time

import torch.distributed as dist

from engine.parallel.progress import PUBLISH_EVERY_S, Progress


def wait_published(progress: Progress, key: str, value: str) -> None:
    deadline = time.monotonic() + 5 * PUBLISH_EVERY_S
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
