"""Run a function on N real gloo processes, one call per test job.

    spawn(check, world, out_dir)    # check(rank, world, out_dir) on `world` processes

Each process joins a fresh gloo group (its own port), runs the function, meets the others
at a barrier and leaves with os._exit: interpreter finalization with gloo's worker threads
still holding tensors can abort a process that has finished its work (pytorch#179291),
which made a passing job fail now and then. A function that raises prints its traceback
and exits 1, so mp.spawn fails the test naming the rank.
"""
from __future__ import annotations

import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.parallel.mesh import leave_process
from tests.conftest import free_port


def spawn(fn, world: int, *args, timeout_s: int = 120) -> None:
    """fn(rank, world, *args) on `world` gloo ranks; raises if any rank fails. fn must be importable."""
    mp.spawn(_entry, args=(fn, world, free_port(), timeout_s, args), nprocs=world, join=True)


def _entry(rank: int, fn, world: int, port: int, timeout_s: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(1)
    # A rank stuck in a collective fails after timeout_s instead of gloo's thirty minutes.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    code = 0
    try:
        fn(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        code = 1
    leave_process(code)
