"""Tensor-parallel layers, region maps and data-parallel helpers against one-process PyTorch.

One gloo job per world size (2 and 4 ranks) runs every check below; each rank builds the
single-process reference from the same seed, runs the parallel layer on its share, and
records forward and backward differences (outputs, input gradients, every parameter's
gradient gathered whole with full_tensor()). The parent process then asserts per check, so
a failure names the check, the rank and the tensor that differed.

A check never raises between collectives on purpose: mismatches are recorded, not asserted,
so every rank keeps issuing the same collectives in the same order.
"""
from __future__ import annotations

import functools
import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from engine.parallel.spawn import spawn_ranks

WORLD_SIZES = (2, 4)
TOKENS = 8  # divisible by every tp here, so sequence-parallel slices are equal
# float32: elementwise rtol, plus an absolute floor scaled to the tensor's largest entry, since
# gradients summed over ranks in another order differ by a few ulps of their largest terms.
RTOL, ATOL = 1e-5, 1e-6


# ---- recording comparisons ---------------------------------------------------------------------


class Record:
    """Comparisons of one check on one rank: label -> max abs error, plus what failed."""

    def __init__(self):
        self.errors: dict[str, float] = {}
        self.failures: list[str] = []

    def close(self, label: str, got, want) -> None:
        if got is None or want is None:
            if (got is None) != (want is None):
                self.failures.append(f"{label}: got {'None' if got is None else 'a tensor'}, "
                                     f"want {'None' if want is None else 'a tensor'}")
            return
        got, want = _full(got).detach().float(), _full(want).detach().float()
        if got.shape != want.shape:
            self.failures.append(f"{label}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            return
        err = float((got - want).abs().max()) if got.numel() else 0.0
        scale = float(want.abs().max()) if want.numel() else 0.0
        self.errors[label] = err
        if not torch.allclose(got, want, rtol=RTOL, atol=ATOL * max(1.0, scale)):
            self.failures.append(f"{label}: max abs error {err:.3g} (max |want| {scale:.3g})")

    def true(self, label: str, condition: bool, detail: str = "") -> None:
        if not condition:
            self.failures.append(f"{label}: {detail}")

    def params(self, parallel: nn.Module, reference: nn.Module) -> None:
        """Same parameter names; every value and gradient equal once gathered whole."""
        mine = dict(parallel.named_parameters())
        theirs = dict(reference.named_parameters())
        self.true("parameter names", sorted(mine) == sorted(theirs), f"{sorted(mine)} != {sorted(theirs)}")
        for name in sorted(theirs):  # the same order on every rank: full_tensor() is collective
            if name not in mine:
                continue
            self.close(f"{name} value", mine[name], theirs[name])
            self.close(f"{name}.grad", mine[name].grad, theirs[name].grad)


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def rand(*shape, seed: int) -> torch.Tensor:
    """The same numbers on every rank for the same seed."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


# ---- what each rank knows --------------------------------------------------------------------


class Ctx:
    """The meshes the checks use, built once per job."""

    def __init__(self, world: int):
        from engine.parallel.layout import Layout
        from engine.parallel.mesh import init_mesh

        cpu = torch.device("cpu")
        self.world, self.rank = world, dist.get_rank()
        self.mesh = init_mesh(Layout(tp=world), cpu)  # all ranks one tp group
        self.tp_mesh, self.group = self.mesh.submesh("tp"), self.mesh.group("tp")
        self.tp, self.tp_rank = world, self.mesh.tp_rank
        # A data-parallel grid too: dp x tp = 2 x 2 on four ranks, dp = 2 on two.
        self.dp_mesh = init_mesh(Layout(tp=2, dp=2) if world == 4 else Layout(dp=2), cpu)


# ---- reference layers ----------------------------------------------------------------------------


def make_linear(n_in: int, n_out: int, bias: bool, lora: bool, seed: int) -> nn.Linear:
    """A plain layer, or a LoRALinear whose B is nonzero so the adapter changes the output."""
    from engine.model.lora import LoRALinear

    torch.manual_seed(seed)
    if not lora:
        return nn.Linear(n_in, n_out, bias=bias)
    layer = LoRALinear(n_in, n_out, bias=bias, rank=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def make_norm(dim: int, seed: int):
    from engine.model.norm import RMSNorm

    norm = RMSNorm(dim, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * rand(dim, seed=seed))
    return norm


# ---- region maps ---------------------------------------------------------------------------------


def check_copy_to_tp(ctx: Ctx, rec: Record) -> None:
    from engine.parallel.tensor import copy_to_tp

    x = leaf(rand(4, 3, seed=1))
    y = copy_to_tp(x, ctx.group)
    grads = [rand(4, 3, seed=100 + q) for q in range(ctx.tp)]  # each rank's downstream differs
    (y * grads[ctx.tp_rank]).sum().backward()
    rec.close("forward is identity", y, x)
    rec.close("backward is the all-reduce", x.grad, sum(grads))


def check_reduce_from_tp(ctx: Ctx, rec: Record) -> None:
    from engine.parallel.tensor import reduce_from_tp

    parts = [rand(4, 3, seed=10 + q) for q in range(ctx.tp)]
    x = leaf(parts[ctx.tp_rank])
    y = reduce_from_tp(x, ctx.group)
    g = rand(4, 3, seed=2)  # replicated downstream: the same gradient everywhere
    (y * g).sum().backward()
    rec.close("forward is the sum", y, sum(parts))
    rec.close("backward is identity", x.grad, g)


def check_gather_from_sp_split(ctx: Ctx, rec: Record) -> None:
    from engine.parallel.tensor import gather_from_sp

    parts = [rand(2, 3, seed=20 + q) for q in range(ctx.tp)]
    x = leaf(parts[ctx.tp_rank])
    y = gather_from_sp(x, ctx.group, grad="split")
    own_grad = rand(2 * ctx.tp, 3, seed=200 + ctx.tp_rank)  # rank-dependent: "split" must not sum
    (y * own_grad).sum().backward()
    rec.close("forward is the token concat", y, torch.cat(parts))
    rec.close("backward is this rank's slice of its own gradient", x.grad, own_grad.chunk(ctx.tp)[ctx.tp_rank])


def check_gather_from_sp_reduce_scatter(ctx: Ctx, rec: Record) -> None:
    from engine.parallel.tensor import gather_from_sp

    parts = [rand(2, 3, seed=30 + q) for q in range(ctx.tp)]
    x = leaf(parts[ctx.tp_rank])
    y = gather_from_sp(x, ctx.group, grad="reduce_scatter")
    grads = [rand(2 * ctx.tp, 3, seed=300 + q) for q in range(ctx.tp)]
    (y * grads[ctx.tp_rank]).sum().backward()
    rec.close("forward is the token concat", y, torch.cat(parts))
    rec.close("backward is the reduce-scatter", x.grad, sum(grads).chunk(ctx.tp)[ctx.tp_rank])


def check_reduce_scatter_to_sp(ctx: Ctx, rec: Record) -> None:
    from engine.parallel.tensor import reduce_scatter_to_sp

    parts = [rand(TOKENS, 3, seed=40 + q) for q in range(ctx.tp)]
    x = leaf(parts[ctx.tp_rank])
    y = reduce_scatter_to_sp(x, ctx.group)
    grads = [rand(TOKENS // ctx.tp, 3, seed=400 + q) for q in range(ctx.tp)]
    (y * grads[ctx.tp_rank]).sum().backward()
    rec.close("forward is this rank's slice of the sum", y, sum(parts).chunk(ctx.tp)[ctx.tp_rank])
    rec.close("backward is the all-gather", x.grad, torch.cat(grads))


def check_region_errors(ctx: Ctx, rec: Record) -> None:
    # Both raise before any communication, on every rank alike.
    from engine.parallel.tensor import gather_from_sp, reduce_scatter_to_sp

    for label, call, words in [
        ("bad grad mode", lambda: gather_from_sp(torch.zeros(2, 3), ctx.group, grad="sum"), "grad='sum'"),
        ("indivisible tokens", lambda: reduce_scatter_to_sp(torch.zeros(ctx.tp + 1, 3), ctx.group),
         "not divisible"),
    ]:
        try:
            call()
            rec.true(label, False, "no error raised")
        except ValueError as e:
            rec.true(label, words in str(e), f"message {str(e)!r} lacks {words!r}")


# ---- linear layers ---------------------------------------------------------------------------------


def check_column(ctx: Ctx, rec: Record, bias: bool, lora: bool) -> None:
    from engine.parallel.tensor import ColumnParallelLinear, RegionEntry

    tp, r = ctx.tp, ctx.tp_rank
    ref = make_linear(16, 24, bias, lora, seed=3)
    par = ColumnParallelLinear(ref, ctx.tp_mesh)
    x, g = rand(TOKENS, 16, seed=4), rand(TOKENS, 24, seed=5)
    x_ref = leaf(x)
    y_ref = ref(x_ref)
    (y_ref * g).sum().backward()

    x_par = leaf(x)
    y = par(RegionEntry(ctx.group, sequence_parallel=False)(x_par))
    (y * g.chunk(tp, -1)[r]).sum().backward()
    rec.close("output features of this rank", y, y_ref.chunk(tp, -1)[r])
    rec.close("input grad", x_par.grad, x_ref.grad)
    rec.params(par, ref)


def check_row(ctx: Ctx, rec: Record, bias: bool, lora: bool, sp: bool) -> None:
    from engine.parallel.tensor import RowParallelLinear

    tp, r = ctx.tp, ctx.tp_rank
    ref = make_linear(24, 16, bias, lora, seed=6)
    par = RowParallelLinear(ref, ctx.tp_mesh, sequence_parallel=sp)
    x, g = rand(TOKENS, 24, seed=7), rand(TOKENS, 16, seed=8)
    x_ref = leaf(x)
    y_ref = ref(x_ref)
    (y_ref * g).sum().backward()

    # The input is a column layer's output: this rank's input features, every token.
    x_par = leaf(x.chunk(tp, -1)[r])
    y = par(x_par)
    tokens = (lambda t: t.chunk(tp)[r]) if sp else (lambda t: t)  # sp: this rank's token slice
    (y * tokens(g)).sum().backward()
    rec.close("output", y, tokens(y_ref))
    rec.close("input grad (own features)", x_par.grad, x_ref.grad.chunk(tp, -1)[r])
    rec.params(par, ref)


class _MLPHalf(nn.Module):
    """The MLP half of a decoder layer: x + down(silu(up(entry(norm(x)))))."""

    def __init__(self, norm, up, down, entry=None):
        super().__init__()
        self.norm, self.up, self.down = norm, up, down
        self.entry = entry if entry is not None else nn.Identity()

    def forward(self, x):
        return x + self.down(F.silu(self.up(self.entry(self.norm(x)))))


def check_mlp_block(ctx: Ctx, rec: Record, sp: bool) -> None:
    """Norm, region entry, column and row layers (both with bias and LoRA) as the model chains them."""
    from engine.parallel.tensor import ColumnParallelLinear, ParallelRMSNorm, RegionEntry, RowParallelLinear

    ref = _MLPHalf(make_norm(16, seed=9), make_linear(16, 24, True, True, seed=10),
                   make_linear(24, 16, True, True, seed=11))
    par = _MLPHalf(
        ParallelRMSNorm(ref.norm, ctx.tp_mesh, sum_grads=sp),
        ColumnParallelLinear(ref.up, ctx.tp_mesh),
        RowParallelLinear(ref.down, ctx.tp_mesh, sequence_parallel=sp),
        RegionEntry(ctx.group, sequence_parallel=sp),
    )
    _compare_on_tokens(ctx, rec, par, ref, seed=12, split_tokens=sp)


def check_head_slice(ctx: Ctx, rec: Record, num_kv_heads: int, bias: bool, lora: bool) -> None:
    """k_proj with fewer KV heads than ranks: rank r reads KV head r // (tp / num_kv_heads)."""
    from engine.parallel.tensor import HeadSliceLinear, RegionEntry

    head_dim, tp, r = 4, ctx.tp, ctx.tp_rank
    ref = make_linear(16, num_kv_heads * head_dim, bias, lora, seed=14)
    par = HeadSliceLinear(ref, ctx.tp_mesh, num_kv_heads, head_dim)
    ranks_per_head = tp // num_kv_heads
    rows = [slice(q // ranks_per_head * head_dim, (q // ranks_per_head + 1) * head_dim) for q in range(tp)]
    rec.true("rows of this rank's head", par.rows == rows[r], f"{par.rows} != {rows[r]}")

    x = rand(TOKENS, 16, seed=15)
    grads = [rand(TOKENS, head_dim, seed=500 + q) for q in range(tp)]  # each rank's own query heads
    x_ref = leaf(x)
    y_ref = ref(x_ref)
    sum((y_ref[:, rows[q]] * grads[q]).sum() for q in range(tp)).backward()

    x_par = leaf(x)
    y = par(RegionEntry(ctx.group, sequence_parallel=False)(x_par))
    (y * grads[r]).sum().backward()
    rec.close("output = full k_proj rows of the head", y, y_ref[:, rows[r]])
    rec.close("input grad", x_par.grad, x_ref.grad)
    rec.params(par, ref)


def check_replicated_linear(ctx: Ctx, rec: Record) -> None:
    from engine.parallel.tensor import ReplicatedLinear

    ref = make_linear(16, 3, True, False, seed=16)
    par = ReplicatedLinear(ref, ctx.tp_mesh)
    x, g = rand(TOKENS, 16, seed=17), rand(TOKENS, 3, seed=18)
    x_ref, x_par = leaf(x), leaf(x)
    y_ref, y = ref(x_ref), par(x_par)
    (y_ref * g).sum().backward()
    (y * g).sum().backward()
    rec.close("output", y, y_ref)
    rec.close("input grad", x_par.grad, x_ref.grad)
    rec.params(par, ref)


# ---- vocabulary and norms ------------------------------------------------------------------------

VOCAB, DIM = 32, 8
IDS = [0, 31, 8, 9, 16, 24, 9, 7]  # every rank's slice at tp 2 and 4, one id twice


def make_embedding(seed: int) -> nn.Embedding:
    torch.manual_seed(seed)
    return nn.Embedding(VOCAB, DIM)


def check_embedding(ctx: Ctx, rec: Record, sp: bool) -> None:
    from engine.parallel.tensor import VocabParallelEmbedding

    tp, r = ctx.tp, ctx.tp_rank
    ref = make_embedding(seed=19)
    par = VocabParallelEmbedding(ref, ctx.tp_mesh, sequence_parallel=sp)
    ids, g = torch.tensor(IDS), rand(len(IDS), DIM, seed=20)
    y_ref = ref(ids)
    (y_ref * g).sum().backward()
    tokens = (lambda t: t.chunk(tp)[r]) if sp else (lambda t: t)
    y = par(ids)
    (y * tokens(g)).sum().backward()
    rec.close("output", y, tokens(y_ref))
    rec.params(par, ref)


def check_head_rows(ctx: Ctx, rec: Record, token_ids: tuple[int, ...]) -> None:
    """The reranker's yes/no rows, each read from whichever rank holds it."""
    from engine.parallel.tensor import VocabParallelEmbedding, VocabParallelHead

    ref = make_embedding(seed=21)
    emb = VocabParallelEmbedding(ref, ctx.tp_mesh, sequence_parallel=False)
    head = VocabParallelHead(emb.weight, emb.vocab_start, emb.vocab_end, ctx.group)
    g = rand(len(token_ids), DIM, seed=22)
    rows_ref = ref.weight[list(token_ids)]
    (rows_ref * g).sum().backward()
    rows = head.rows(list(token_ids))
    (rows * g).sum().backward()
    rec.close("rows", rows, rows_ref)
    rec.close("weight.grad", emb.weight.grad, ref.weight.grad)


def check_tied_head(ctx: Ctx, rec: Record, sp: bool) -> None:
    """Embedding lookup and head rows through one tied weight: both gradients land on it."""
    from engine.parallel.tensor import VocabParallelEmbedding, VocabParallelHead

    tp, r = ctx.tp, ctx.tp_rank
    ref = make_embedding(seed=23)
    emb = VocabParallelEmbedding(ref, ctx.tp_mesh, sequence_parallel=sp)
    head = VocabParallelHead(emb.weight, emb.vocab_start, emb.vocab_end, ctx.group)
    ids, g_emb, g_rows = torch.tensor(IDS), rand(len(IDS), DIM, seed=24), rand(2, DIM, seed=25)
    yes_no = [3, VOCAB - 2]  # first and last rank's slices
    hidden = rand(5, DIM, seed=26)

    ((ref(ids) * g_emb).sum() + (ref.weight[yes_no] * g_rows).sum()).backward()
    tokens = (lambda t: t.chunk(tp)[r]) if sp else (lambda t: t)
    ((emb(ids) * tokens(g_emb)).sum() + (head.rows(yes_no) * g_rows).sum()).backward()
    rec.close("weight.grad", emb.weight.grad, ref.weight.grad)
    rec.close("full logits", head(hidden), hidden @ ref.weight.detach().T)


def check_norm(ctx: Ctx, rec: Record, sum_grads: bool) -> None:
    """sum_grads=True: each rank normalises its own tokens; False: all ranks the same tokens."""
    from engine.parallel.tensor import ParallelRMSNorm

    ref = make_norm(16, seed=27)
    par = ParallelRMSNorm(ref, ctx.tp_mesh, sum_grads=sum_grads)
    _compare_on_tokens(ctx, rec, par, ref, seed=28, split_tokens=sum_grads)


def _compare_on_tokens(ctx: Ctx, rec: Record, par, ref, seed: int, split_tokens: bool) -> None:
    """Forward and backward of ref on all tokens and of par on this rank's token slice
    (split_tokens) or on all of them; outputs, input gradients and parameters must agree."""
    tp, r = ctx.tp, ctx.tp_rank
    x, g = rand(TOKENS, 16, seed=seed), rand(TOKENS, 16, seed=seed + 1)
    x_ref = leaf(x)
    y_ref = ref(x_ref)
    (y_ref * g).sum().backward()
    tokens = (lambda t: t.chunk(tp)[r]) if split_tokens else (lambda t: t)
    x_par = leaf(tokens(x))
    y = par(x_par)
    (y * tokens(g)).sum().backward()
    rec.close("output", y, tokens(y_ref))
    rec.close("input grad", x_par.grad, tokens(x_ref.grad))
    rec.params(par, ref)


# ---- data parallelism ------------------------------------------------------------------------------


def check_all_gather_with_grad(ctx: Ctx, rec: Record) -> None:
    """Over the dp group: forward concatenates in dp-rank order; backward sums every rank's use."""
    from engine.parallel.collectives import all_gather_with_grad

    mesh = ctx.dp_mesh
    dp, d = mesh.dp, mesh.dp_rank
    parts = [rand(2, 3, seed=60 + q) for q in range(dp)]
    x = leaf(parts[d])
    y = all_gather_with_grad(x, mesh.group("dp"))
    grads = [rand(2 * dp, 3, seed=600 + q) for q in range(dp)]
    (y * grads[d]).sum().backward()
    rec.close("forward", y, torch.cat(parts))
    rec.close("backward = sum of gradients of own slice", x.grad, sum(grads).chunk(dp)[d])


CLIP_PARAMS = [  # full shape, placements over the (dp, tp) mesh
    ((8, 12), (Shard(0), Shard(1))),
    ((12,), (Replicate(), Shard(0))),
    ((8, 4), (Shard(0), Replicate())),
    ((3, 5), (Replicate(), Replicate())),
]


def check_clip_grad_norm(ctx: Ctx, rec: Record, mesh_name: str, max_norm: float) -> None:
    from engine.parallel.data import clip_grad_norm

    mesh = ctx.mesh if mesh_name == "tp" else ctx.dp_mesh
    grid = mesh.device_mesh["dp", "tp"]
    ref_params, params = [], []
    for k, (shape, placements) in enumerate(CLIP_PARAMS):
        p_ref = nn.Parameter(rand(*shape, seed=70 + k))
        p_ref.grad = rand(*shape, seed=700 + k)
        # Clones: a replicated DTensor may share storage with its source, and the reference
        # clip below scales its gradients in place.
        p = nn.Parameter(distribute_tensor(p_ref.detach().clone(), grid, placements))
        p.grad = distribute_tensor(p_ref.grad.clone(), grid, placements)
        ref_params.append(p_ref)
        params.append(p)
    frozen = nn.Parameter(distribute_tensor(rand(4, 4, seed=79), grid, (Replicate(), Replicate())))
    params.append(frozen)  # no gradient: skipped, as by torch
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ref_params, max_norm))
    norm = clip_grad_norm(params, max_norm, mesh)
    rec.close("norm", torch.tensor(norm), torch.tensor(ref_norm))
    for k, (p, p_ref) in enumerate(zip(params, ref_params)):
        rec.close(f"param {k} grad after clip", p.grad, p_ref.grad)


def check_fsdp_tp_grads(ctx: Ctx, rec: Record) -> None:
    """FSDP2 over dp around tp layers (as parallelize composes them): each dp rank's loss is the
    mean over its own rows, and the averaged gradients equal one process on all rows; the clip
    norm over these strided 2-D shards equals torch's on the gathered gradients."""
    from torch.distributed.fsdp import fully_shard

    from engine.parallel.data import clip_grad_norm, gather_full_parameters
    from engine.parallel.tensor import ColumnParallelLinear, RegionEntry, RowParallelLinear

    mesh = ctx.dp_mesh
    tp_mesh, dp, d = mesh.submesh("tp"), mesh.dp, mesh.dp_rank
    ref = nn.Sequential(make_linear(16, 24, True, True, seed=80), nn.SiLU(), make_linear(24, 16, True, True, seed=81))
    par = nn.Sequential(
        RegionEntry(mesh.group("tp"), sequence_parallel=False),
        ColumnParallelLinear(ref[0], tp_mesh), nn.SiLU(), RowParallelLinear(ref[2], tp_mesh, sequence_parallel=False),
    )
    fully_shard(par, mesh=mesh.submesh("dp_sp"))
    x, g = rand(4 * dp, 16, seed=82), rand(4 * dp, 16, seed=83)
    ((ref(x) * g).sum(-1).mean()).backward()
    (par(x.chunk(dp)[d]) * g.chunk(dp)[d]).sum(-1).mean().backward()

    ref_params = dict(ref.named_parameters())
    for name, grad in _as_reference_names(gather_full_parameters(par, gradients=True)).items():
        rec.close(f"{name}.grad", grad, ref_params[name].grad)
    rec.true("every gradient gathered", len(ref_params) == len(list(par.parameters())), "parameter counts differ")
    ref_norm = float(torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5))
    norm = clip_grad_norm(list(par.parameters()), 0.5, mesh)
    rec.close("clip norm", torch.tensor(norm), torch.tensor(ref_norm))
    for name, grad in _as_reference_names(gather_full_parameters(par, gradients=True)).items():
        rec.close(f"{name}.grad after clip", grad, ref_params[name].grad)


def _as_reference_names(tensors: dict) -> dict:
    """The parallel Sequential has the region entry in front: its "1.x" is the reference's "0.x"."""
    shift = {"1": "0", "3": "2"}
    return {shift[k.split(".")[0]] + "." + k.split(".", 1)[1]: v for k, v in tensors.items()}


def check_reduce_mean_sum(ctx: Ctx, rec: Record) -> None:
    from engine.parallel.data import reduce_mean, reduce_sum

    for label, mesh in (("tp-only mesh", ctx.mesh), ("dp mesh", ctx.dp_mesh)):
        dp, d = mesh.dp, mesh.dp_rank
        want_mean = sum(q + 1.0 for q in range(dp)) / dp
        got = reduce_mean(d + 1.0, mesh)
        rec.true(f"{label}: reduce_mean", abs(got - want_mean) < 1e-12, f"{got} != {want_mean}")
        got = reduce_sum(10 * d + 1, mesh)
        want = sum(10 * q + 1 for q in range(dp))
        rec.true(f"{label}: reduce_sum", got == want, f"{got} != {want}")


def check_row_lora_dropout(ctx: Ctx, rec: Record) -> None:
    """Row-parallel LoRA dropout: the ranks' masks are the slices of one mask over all input
    features (the one a single process draws from the same seed), not one pattern repeated."""
    from engine.parallel.collectives import all_gather_rows
    from engine.parallel.tensor import RowParallelLinear

    tp, r = ctx.tp, ctx.tp_rank
    ref = make_linear(24, 16, bias=False, lora=True, seed=6)
    ref.lora_dropout = nn.Dropout(0.5)
    par = RowParallelLinear(ref, ctx.tp_mesh, sequence_parallel=False).train()
    torch.manual_seed(123)
    kept = par._dropout_own_features(torch.ones(TOKENS, 24 // tp)) * 0.5  # 1 kept, 0 dropped
    torch.manual_seed(123)
    want = torch.empty(TOKENS, 24).bernoulli_(0.5)
    got = all_gather_rows(kept.T.contiguous(), ctx.group).T  # (TOKENS, 24): every rank's columns in order
    rec.close("dropout mask over all features", got, want)
    slices = want.chunk(tp, -1)
    rec.true("ranks draw different columns", not torch.equal(slices[0], slices[1]), "slices are equal")
    rec.true("this rank's slice", torch.equal(kept, slices[r]), "own columns differ from the full mask's")


def check_run_packed_split(ctx: Ctx, rec: Record) -> None:
    """Evaluation over dp ranks: each rank runs about 1/dp of the texts, every rank the same
    number of forward calls, and all get every result in the input order."""
    from engine.inference import run_packed

    mesh = ctx.dp_mesh
    texts = [[t % 50 + 1 for t in range(n)] for n in (5, 3, 9, 1, 4, 7, 2)]  # 7 texts: shares of 4 and 3
    calls, seqs = [0], [0]

    def forward(packed):
        calls[0] += 1
        seqs[0] += packed.num_seqs
        ends = packed.cu_seqlens[1:].long()
        sums = torch.cumsum(packed.input_ids.float(), 0)[ends - 1]
        return torch.diff(sums, prepend=sums.new_zeros(1))[:, None]  # (num_seqs, 1): each text's id sum

    got = run_packed(forward, texts, batch_size=2, device=torch.device("cpu"), dp_group=mesh.group("dp"))
    want = torch.tensor([[float(sum(t))] for t in texts])
    rec.close("results in input order", got, want)
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, (mesh.dp_rank, calls[0], seqs[0]))
    real = {dp_rank: n for dp_rank, _, n in counts}
    rec.true("same number of forward calls on every rank", len({c for _, c, _ in counts}) == 1, str(counts))
    rec.true("each dp rank ran its share", sorted(real.values()) == [3, 4], str(counts))
    for few in (texts[:1], []):  # a rank with no texts still joins every forward (and none for no texts)
        got = run_packed(forward, few, batch_size=2, device=torch.device("cpu"), dp_group=mesh.group("dp"))
        rec.close(f"{len(few)} text(s)", got, want[: len(few)] if few else torch.empty(0))


# ---- the job -----------------------------------------------------------------------------------


def checks(world: int) -> list[tuple[str, object]]:
    """(name, check) in the order every rank runs them; names are what pytest shows."""
    out = [
        ("copy_to_tp", check_copy_to_tp),
        ("reduce_from_tp", check_reduce_from_tp),
        ("gather_from_sp[split]", check_gather_from_sp_split),
        ("gather_from_sp[reduce_scatter]", check_gather_from_sp_reduce_scatter),
        ("reduce_scatter_to_sp", check_reduce_scatter_to_sp),
        ("region_errors", check_region_errors),
    ]
    for bias in (False, True):
        for lora in (False, True):
            out.append((f"column[bias={bias},lora={lora}]", functools.partial(check_column, bias=bias, lora=lora)))
            for sp in (False, True):
                out.append((f"row[bias={bias},lora={lora},sp={sp}]",
                            functools.partial(check_row, bias=bias, lora=lora, sp=sp)))
    for sp in (False, True):
        out.append((f"mlp_block[sp={sp}]", functools.partial(check_mlp_block, sp=sp)))
    # HeadSliceLinear is used when tp > num_kv_heads: 1 KV head on 2 ranks, 2 KV heads on 4.
    kv = world // 2
    for bias, lora in ((False, False), (True, True)):
        out.append((f"head_slice[kv={kv},bias={bias},lora={lora}]",
                    functools.partial(check_head_slice, num_kv_heads=kv, bias=bias, lora=lora)))
    out.append(("replicated_linear", check_replicated_linear))
    for sp in (False, True):
        out.append((f"embedding[sp={sp}]", functools.partial(check_embedding, sp=sp)))
        out.append((f"tied_head[sp={sp}]", functools.partial(check_tied_head, sp=sp)))
    for ids in ((3, VOCAB - 2), (VOCAB - 2, 3), (9, 10), (5, 5, 20)):
        out.append((f"head_rows{list(ids)}", functools.partial(check_head_rows, token_ids=ids)))
    for sum_grads in (False, True):
        out.append((f"rms_norm[sum_grads={sum_grads}]", functools.partial(check_norm, sum_grads=sum_grads)))
    out.append(("all_gather_with_grad", check_all_gather_with_grad))
    for mesh_name in ("tp", "dp"):
        for max_norm in (0.5, 1e3):  # clipped, and left alone
            out.append((f"clip_grad_norm[{mesh_name},max_norm={max_norm}]",
                        functools.partial(check_clip_grad_norm, mesh_name=mesh_name, max_norm=max_norm)))
    if world == 4:
        out.append(("fsdp_tp_grads", check_fsdp_tp_grads))
    out.append(("reduce_mean_sum", check_reduce_mean_sum))
    out.append(("row_lora_dropout", check_row_lora_dropout))
    out.append(("run_packed_split", check_run_packed_split))
    return out


def _worker(rank: int, world: int, out_dir: str) -> None:
    results: dict[str, dict] = {}
    broken = None
    try:
        ctx = Ctx(world)
        for name, check in checks(world):
            if broken:  # the ranks may be out of step now; later collectives would mean nothing
                results[name] = {"failures": [f"not run: {broken} raised before it"], "errors": {}}
                continue
            rec = Record()
            try:
                check(ctx, rec)
            except Exception:
                rec.failures.append("raised:\n" + traceback.format_exc())
                broken = name
            results[name] = {"failures": rec.failures, "errors": rec.errors}
    except Exception:
        results["<setup>"] = {"failures": ["raised:\n" + traceback.format_exc()], "errors": {}}
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)


def run_job(world: int, out_dir: str) -> list[dict]:
    """Every check on `world` gloo ranks; one result dict per rank."""
    spawn_ranks(_worker, world, out_dir, timeout_s=60)
    ranks = []
    for rank in range(world):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            ranks.append(json.load(f))
    return ranks


@pytest.fixture(scope="module")
def job_results(tmp_path_factory):
    """world -> per-rank results, each job run once for the whole module."""
    done: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in done:
            done[world] = run_job(world, str(tmp_path_factory.mktemp(f"tp{world}")))
        return done[world]

    return get


CASES = [(world, name) for world in WORLD_SIZES for name, _ in checks(world)]


@pytest.mark.parametrize("world,name", CASES, ids=[f"world{w}-{n}" for w, n in CASES])
def test_parallel_matches_one_process(job_results, world, name):
    ranks = job_results(world)
    setup = [r["<setup>"]["failures"] for r in ranks if "<setup>" in r]
    assert not setup, f"the job failed to set up: {setup[0]}"
    problems = [f"rank {rank}: {msg}" for rank, r in enumerate(ranks) for msg in r[name]["failures"]]
    assert not problems, f"{name} on {world} ranks:\n" + "\n".join(problems)
    # Something must have been compared (a check that records nothing tests nothing).
    assert any(r[name]["errors"] for r in ranks) or name.startswith(("region_errors", "reduce_mean"))
