"""The process grid: which ranks share each group, for several layouts on 2 and 4 gloo ranks,
and the one-process mesh that has no groups at all.

World = pp x dp x ring x ulysses x tp with tp fastest, so on four ranks tp=2, dp=2 makes
{0,1} and {2,3} the tp groups and {0,2}, {1,3} the dp groups. One spawned job per world size
builds every layout in turn and writes what each rank saw; the parent asserts per layout.
"""
from __future__ import annotations

import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist

from engine.parallel.layout import Layout
from engine.parallel.mesh import ParallelMesh, init_mesh
from engine.parallel.spawn import spawn_ranks

DIMS = ("pp", "dp", "ring", "ulysses", "tp", "dp_sp")

# Layout -> for each dimension, the groups (rank lists) it must split the world into.
LAYOUTS = {
    2: {
        "tp=2": (Layout(tp=2), {"tp": [[0, 1]], "dp": [[0], [1]], "dp_sp": [[0], [1]]}),
        "dp=2": (Layout(dp=2), {"tp": [[0], [1]], "dp": [[0, 1]], "dp_sp": [[0, 1]]}),
    },
    4: {
        "tp=2,dp=2": (Layout(tp=2, dp=2), {"tp": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]],
                                           "dp_sp": [[0, 2], [1, 3]], "pp": [[0], [1], [2], [3]]}),
        "dp=4": (Layout(dp=4), {"tp": [[0], [1], [2], [3]], "dp": [[0, 1, 2, 3]], "dp_sp": [[0, 1, 2, 3]]}),
        "tp=4": (Layout(tp=4), {"tp": [[0, 1, 2, 3]], "dp": [[0], [1], [2], [3]], "dp_sp": [[0], [1], [2], [3]]}),
        # ring and ulysses are data-parallel for the parameters: dp_sp flattens dp x ring x ulysses.
        "tp=2,ring=2": (Layout(tp=2, ring=2), {"tp": [[0, 1], [2, 3]], "ring": [[0, 2], [1, 3]],
                                               "dp": [[0], [1], [2], [3]], "dp_sp": [[0, 2], [1, 3]]}),
        "ulysses=2,dp=2": (Layout(ulysses=2, dp=2), {"ulysses": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]],
                                                     "tp": [[0], [1], [2], [3]], "dp_sp": [[0, 1, 2, 3]]}),
        "pp=2,tp=2": (Layout(pp=2, tp=2), {"pp": [[0, 2], [1, 3]], "tp": [[0, 1], [2, 3]],
                                           "dp_sp": [[0], [1], [2], [3]]}),
    },
}


def _what_rank_sees(mesh: ParallelMesh) -> dict:
    """Everything the parent checks, as plain JSON."""
    groups = {dim: dist.get_process_group_ranks(mesh.group(dim)) for dim in DIMS}
    local = {dim: mesh.local_rank(dim) for dim in DIMS if dim != "dp_sp"}
    local["dp_sp"] = mesh.submesh("dp_sp").get_local_rank()
    sizes = {dim: mesh.submesh(dim).size() for dim in DIMS}
    mesh.barrier()
    return {
        "groups": groups, "local": local, "sizes": sizes, "rank": mesh.rank,
        "tp_rank": mesh.tp_rank, "dp_rank": mesh.dp_rank, "tp": mesh.tp, "dp": mesh.dp, "dp_sp": mesh.dp_sp,
        "logging": mesh.is_logging_rank, "distributed": mesh.distributed, "describe": mesh.describe(),
    }


def _worker(rank: int, world: int, out_dir: str) -> None:
    seen: dict[str, object] = {}
    try:
        for name, (layout, _) in LAYOUTS[world].items():
            seen[name] = _what_rank_sees(init_mesh(layout, torch.device("cpu")))
        # A layout for another world size is refused (same on every rank, before any group).
        try:
            init_mesh(Layout(tp=2 * world), torch.device("cpu"))
            seen["wrong world"] = "no error"
        except RuntimeError as e:
            seen["wrong world"] = str(e)
    except Exception:
        seen["<error>"] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(seen, f)


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    """world -> what each rank saw, one spawned job per world size."""
    done: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in done:
            out = str(tmp_path_factory.mktemp(f"mesh{world}"))
            spawn_ranks(_worker, world, out, timeout_s=60)
            ranks = []
            for rank in range(world):
                with open(os.path.join(out, f"rank{rank}.json")) as f:
                    ranks.append(json.load(f))
            errors = [r["<error>"] for r in ranks if "<error>" in r]
            assert not errors, errors[0]
            done[world] = ranks
        return done[world]

    return get


CASES = [(world, name) for world in LAYOUTS for name in LAYOUTS[world]]


@pytest.mark.parametrize("world,name", CASES, ids=[f"world{w}-{n}" for w, n in CASES])
def test_groups_follow_tp_fastest_order(seen, world, name):
    layout, expected = LAYOUTS[world][name]
    ranks = seen(world)
    for rank, r in enumerate(ranks):
        s = r[name]
        assert s["rank"] == rank and s["distributed"]
        assert s["logging"] == (rank == 0)
        for dim, groups in expected.items():
            mine = next(g for g in groups if rank in g)
            assert s["groups"][dim] == mine, f"rank {rank}: {dim} group {s['groups'][dim]}, want {mine}"
            assert s["sizes"][dim] == len(mine)
            assert s["local"][dim] == mine.index(rank), f"rank {rank}: local {dim} rank"
        # Degrees not named are 1: each rank is alone in that group.
        for dim in ("pp", "ring", "ulysses"):
            if getattr(layout, dim) == 1:
                assert s["groups"][dim] == [rank]
        assert s["tp_rank"] == s["local"]["tp"] and s["dp_rank"] == s["local"]["dp"]
        assert (s["tp"], s["dp"]) == (layout.tp, layout.dp)
        assert s["dp_sp"] == layout.dp * layout.ring * layout.ulysses == s["sizes"]["dp_sp"]
        assert s["describe"] == (f"world {world} = pp {layout.pp} x dp {layout.dp} x ring {layout.ring} "
                                 f"x ulysses {layout.ulysses} x tp {layout.tp}")
    if layout.ring == layout.ulysses == 1:  # dp_sp is then just dp
        assert all(r[name]["groups"]["dp_sp"] == r[name]["groups"]["dp"] for r in ranks)


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_layout_for_another_world_size_is_refused(seen, world):
    for r in seen(world):
        assert r["wrong world"] == f"the layout needs {2 * world} processes but {world} were started"


def test_one_process_mesh_has_no_groups():
    from engine.parallel.data import clip_grad_norm, reduce_mean, reduce_sum

    mesh = init_mesh(Layout(), torch.device("cpu"))
    assert not dist.is_initialized(), "one process must not start torch.distributed"
    assert mesh == ParallelMesh(Layout())
    assert not mesh.distributed and mesh.rank == 0 and mesh.is_logging_rank
    assert (mesh.tp, mesh.dp, mesh.dp_sp, mesh.tp_rank, mesh.dp_rank) == (1, 1, 1, 0, 0)
    for dim in DIMS:
        assert mesh.submesh(dim) is None and mesh.group(dim) is None
    assert mesh.local_rank("ring") == 0
    mesh.barrier()  # a no-op, not an error
    assert mesh.describe() == "world 1 = pp 1 x dp 1 x ring 1 x ulysses 1 x tp 1"
    # The data-parallel helpers pass numbers through and clip like torch.
    assert reduce_mean(2.5, mesh) == 2.5 and reduce_sum(7, mesh) == 7
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    p.grad, q.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([3.0, 4.0, 0.0])
    assert clip_grad_norm([p], 1.0, mesh) == pytest.approx(float(torch.nn.utils.clip_grad_norm_([q], 1.0)))
    torch.testing.assert_close(p.grad, q.grad)
