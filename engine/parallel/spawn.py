"""Run a function on N fresh local processes joined in a gloo group: what tests and benchmarks
use to be several ranks on one machine (training itself is started by torchrun).

    results = spawn_ranks(measure, 4, args)    # measure(rank, world, args) on 4 processes

Each process joins its own gloo group (a free port; no group for a single process), runs the
function, writes its return value (JSON) for the parent, meets the others at a barrier and
leaves with os._exit (leave_process: gloo's worker threads can abort a finished process at
interpreter finalization, pytorch#179291). A function that raises prints its traceback and
exits 1, so mp.spawn fails naming the rank. A rank stuck in a collective fails after
timeout_s instead of gloo's thirty minutes.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.parallel.mesh import leave_process


def spawn_ranks(fn: Callable[..., Any], world: int, *args, timeout_s: int = 120,
                threads: int | None = 1) -> list:
    """fn(rank, world, *args) on `world` processes; each rank's return value, in rank order.

    fn must be importable (mp.spawn pickles it by name). threads: torch threads per rank
    (None = the machine's cores shared evenly)."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_entry, args=(fn, world, free_port(), timeout_s, threads, out, args), nprocs=world, join=True)
        results = []
        for rank in range(world):
            with open(os.path.join(out, f"rank{rank}.json")) as f:
                results.append(json.load(f))
    return results


def free_port() -> int:
    """A TCP port nobody listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, timeout_s: int, threads: int | None, out: str,
           args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))  # ranks share the cores
    code = 0
    try:
        if world > 1:
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        result = fn(rank, world, *args)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        code = 1
    leave_process(code)
