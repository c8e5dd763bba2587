"""The process grid: world = pp x dp x ring x ulysses x tp, tp fastest (Megatron's order).

Built once from `init_device_mesh`; everything else asks this object for its groups and
ranks. One process (no torchrun) gets the same object with every degree 1 and no groups,
so library code reads `mesh.tp > 1` rather than checking whether torch.distributed is up.

Groups and what they reduce:
- tp: tensor-parallel shards of every layer (region maps in tensor.py);
- dp_sp: dp x ring x ulysses flattened, the ranks that hold the same parameters but see
  different tokens, so gradients are averaged and optimizer state is sharded over it (data.py);
- dp: the ranks that see different queries; cross-rank negatives are gathered over it;
- cp: ring x ulysses flattened, the ranks that split the same sequences (context.py); per-sequence
  results (pooled vectors, scores) are summed over it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from datetime import timedelta

import torch
import torch.distributed as dist

from engine.parallel.layout import Layout

DIM_NAMES = ("pp", "dp", "ring", "ulysses", "tp")


@dataclass
class ParallelMesh:
    layout: Layout = field(default_factory=Layout)
    device_mesh: object | None = None  # torch DeviceMesh over the world; None for one process
    dp_sp_mesh: object | None = None  # the flattened dp x ring x ulysses dimension
    cp_mesh: object | None = None  # the flattened ring x ulysses dimension (context parallelism)

    # ---- sizes and ranks -------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.device_mesh is not None

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def pp(self) -> int:
        return self.layout.pp

    @property
    def dp_sp(self) -> int:
        return self.layout.dp * self.layout.ring * self.layout.ulysses

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.distributed else 0

    def local_rank(self, dim: str) -> int:
        return self.device_mesh[dim].get_local_rank() if self.distributed else 0

    @property
    def tp_rank(self) -> int:
        return self.local_rank("tp")

    @property
    def dp_rank(self) -> int:
        return self.local_rank("dp")

    @property
    def pp_rank(self) -> int:
        return self.local_rank("pp")

    @property
    def first_of_stage(self) -> bool:
        """Rank 0 of its pipeline stage (every dimension but pp at 0): where a tensor every rank of the
        stage holds a copy of is counted once."""
        return all(self.local_rank(dim) == 0 for dim in DIM_NAMES if dim != "pp")

    @property
    def is_logging_rank(self) -> bool:
        """Rank 0 writes logs, metrics, checkpoints' side files and exports."""
        return self.rank == 0

    # ---- groups ------------------------------------------------------------------------
    def submesh(self, dim: str):
        if not self.distributed:
            return None
        return {"dp_sp": self.dp_sp_mesh, "cp": self.cp_mesh}.get(dim) or self.device_mesh[dim]

    def group(self, dim: str):
        mesh = self.submesh(dim)
        return None if mesh is None else mesh.get_group()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def describe(self) -> str:
        lay = self.layout
        return (f"world {lay.world_size} = pp {lay.pp} x dp {lay.dp} x ring {lay.ring} x ulysses {lay.ulysses} "
                f"x tp {lay.tp}")


def backend_for(device: torch.device) -> str:
    """gloo on CPU; on GPUs nccl for CUDA tensors plus gloo for the few CPU ones (logged loss,
    token counts, gathered evaluation results), which nccl refuses."""
    return "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"


def init_mesh(layout: Layout, device: torch.device, collective_timeout_s: float | None = None) -> ParallelMesh:
    """Start torch.distributed (when launched with more than one process) and build the grid.
    collective_timeout_s: how long any collective of any group may wait (train.collective_timeout);
    None keeps torch's default (30 min for gloo, 10 for NCCL)."""
    if layout.world_size == 1:
        return ParallelMesh(layout)
    from torch.distributed.device_mesh import init_device_mesh

    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = None if collective_timeout_s is None else timedelta(seconds=collective_timeout_s)
    if not dist.is_initialized():
        store = attempt_store(timeout)
        if store is None:
            dist.init_process_group(backend_for(device), timeout=timeout)
        else:
            dist.init_process_group(backend_for(device), store=store, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    if dist.get_world_size() != layout.world_size:
        raise RuntimeError(f"the layout needs {layout.world_size} processes but {dist.get_world_size()} were started")
    shape = (layout.pp, layout.dp, layout.ring, layout.ulysses, layout.tp)
    device_mesh = init_device_mesh(device.type, shape, mesh_dim_names=DIM_NAMES)
    dp_sp_mesh = device_mesh["dp", "ring", "ulysses"]._flatten("dp_sp")
    cp_mesh = device_mesh["ring", "ulysses"]._flatten("cp")
    if timeout is not None:
        # DeviceMesh makes its groups with torch's default timeout, whatever the world group's.
        groups = [device_mesh.get_group(name) for name in DIM_NAMES] + [dp_sp_mesh.get_group(), cp_mesh.get_group()]
        for group in groups:
            dist.distributed_c10d._set_pg_timeout(timeout, group)
    return ParallelMesh(layout, device_mesh, dp_sp_mesh, cp_mesh)


def attempt_store(timeout: timedelta | None) -> dist.Store | None:
    """Under torchrun: its rendezvous store, with every key under a prefix of this restart attempt.

    torchrun keeps one store for the whole job, and torch names the process groups' keys the same in
    every attempt ("default_pg/..."): after a restart, a rank can read the address a dead rank of the
    previous attempt published and fail to connect (gloo: "connectFullMesh failed ... Connection
    refused"), or wait on a stale barrier key until the timeout. Measured here before this prefix:
    2 ranks, one SIGKILLed mid-step, --max-restarts=2: 6 of 10 jobs finished (refusals and hangs,
    with static and c10d rendezvous alike). None outside torchrun (env:// as usual)."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or "MASTER_ADDR" not in os.environ:
        return None
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
        is_master=not agent_hosts_it and os.environ.get("RANK") == "0",
        timeout=timeout or timedelta(minutes=30),
    )
    run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    return dist.PrefixStore(f"ember/{run}/attempt_{restart}/", store)


def shutdown(mesh: ParallelMesh, *, finished: bool = False) -> None:
    """Destroy the process group; ranks that all finished meet at a barrier first, so none
    tears its group down while another still sends (a failed rank must not wait there)."""
    if mesh.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def leave_process(code: int) -> None:
    """Exit a spawned rank without interpreter finalization: gloo's worker threads still holding
    tensors can abort a process that finished its work (pytorch#179291)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
