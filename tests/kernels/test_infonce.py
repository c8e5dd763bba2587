"""InfoNCE candidate log-sum-exp (engine/kernels/infonce): the chunked PyTorch path and the Triton kernels
against the naive reference, forward and gradients, then the engine's loss through them.

The stories:
- every candidate rule (whole pool / own group, false-negative margin, positive kept or left
  out, an extra outside term) on awkward shapes: B and N not multiples of any tile, a d that
  is not a multiple of BLOCK_D, tiles that straddle groups, and both upstream gradients the
  chunked path distinguishes (uniform: gradients from the forward; not uniform: dk recomputed);
- edge rows: a query whose every negative is masked (lse = its positive's logit; -inf and zero
  gradients when the positive is left out too), and the positive surviving any margin;
- the chunked path never allocates a (B, N) tensor (every op's output inspected) and its peak
  memory stays far below one logits matrix (a fresh process, peak RSS reset and read);
- engine.losses.info_nce through the kernels equals the old formula (full logits matrix),
  and a tiny encoder trains to the same losses with the 'torch' and 'triton' backends.

Triton runs under TRITON_INTERPRET=1 on CPU (set below, before triton is first imported:
triton reads it when a kernel is decorated), with explicit 16-wide blocks; natively, with the
autotuner and bfloat16, when a GPU is present.

Tolerances, relative to the largest magnitude of the expected tensor (a gradient entry near
zero after cancellation carries no relative precision of its own):
- float32 1e-5: both sides compute in float32 and differ only in summation order over at
  most a few dozen terms (~1e-7 relative); any masking or indexing mistake is order one.
- float16 2e-3: inputs are rounded to float16 for both sides, the kernels then accumulate in
  float32, but the backward feeds P to the product in float16 (as FlashAttention does),
  which keeps ~3 significant digits.
- bfloat16 2e-2 (GPU only): the same with 8 mantissa bits, ~4e-3 per rounded P entry.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import engine.kernels.infonce as infonce  # noqa: E402
from engine.losses import info_nce  # noqa: E402
from engine.kernels.infonce import candidate_lse, candidate_lse_reference, info_nce_loss  # noqa: E402
from engine.kernels.infonce import chunked as chunked_module  # noqa: E402
from engine.kernels.infonce.chunked import chunked_candidate_lse  # noqa: E402
from tests.gpu import requires_gpu  # noqa: E402

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_gpu = requires_gpu("needs a CUDA GPU and triton", also=HAS_TRITON)
# The interpreter warns about log(0) in a split that holds none of a row's candidates:
# the -inf it writes is the intended 'no terms here'.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

TRITON_DEVICE = "cuda" if HAS_GPU else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
B, N, D = 13, 37, 24  # 13 and 37: no tile divides them; 24 = one and a half 16-wide d chunks


# ---- helpers -----------------------------------------------------------------------------------


def assert_close_rel(actual, expected, rel, what=""):
    """max |actual - expected| <= rel * max |expected|, equal infinities allowed."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, what
    same_inf = torch.isinf(expected) & (actual == expected)
    assert torch.isfinite(actual[~same_inf]).all(), f"{what}: unexpected inf/nan"
    finite = ~same_inf
    if not finite.any():
        return
    scale = expected[finite].abs().max().clamp_min(1e-30)
    error = (actual[finite] - expected[finite]).abs().max()
    assert error <= rel * scale, f"{what}: max error {error:.3g} > {rel:g} x {scale:.3g}"


def problem(seed, dtype=torch.float32, device="cpu", num_queries=B, num_candidates=N, dim=D, with_extra=False):
    """Unit-norm rows (so that random negatives often beat the positive under a margin)."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(num_queries, dim, generator=g), dim=-1).to(dtype)
    k = F.normalize(torch.randn(num_candidates, dim, generator=g), dim=-1).to(dtype)
    positive = torch.randint(0, num_candidates, (num_queries,), generator=g)
    extra = torch.randn(num_queries, generator=g) if with_extra else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(q), to(k), to(positive), to(extra)


def upstream(kind, num_queries=B, device="cpu"):
    if kind == "uniform":
        return torch.full((num_queries,), 1.0 / num_queries, device=device)  # a plain mean
    g = torch.Generator().manual_seed(99)
    return (torch.rand(num_queries, generator=g) - 0.3).to(device)  # weights, some negative


def lse_and_grads(fn, q, k, positive, extra, grad, **rules):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k) + ((extra,) if extra is not None else ())]
    lse = fn(leaves[0], leaves[1], positive, extra_lse=leaves[2] if extra is not None else None, **rules)
    grads = torch.autograd.grad(lse, leaves, grad.to(lse.dtype))
    return lse.detach(), grads


def check_against_reference(fn, q, k, positive, extra, grad_kind, rules, rel):
    grad = upstream(grad_kind, q.shape[0], q.device)
    lse, grads = lse_and_grads(fn, q, k, positive, extra, grad, **rules)
    ref_lse, ref_grads = lse_and_grads(candidate_lse_reference, q, k, positive, extra, grad, **rules)
    assert lse.dtype == torch.float32
    assert_close_rel(lse, ref_lse, rel, "lse")
    for name, got, want in zip(("dq", "dk", "d_extra"), grads, ref_grads):
        assert got.dtype == want.dtype, name
        assert_close_rel(got, want, rel, name)
    return lse, ref_lse


def masked_count(q, k, positive, margin):
    """How many (query, candidate) pairs the margin drops: proves a margin case masks something."""
    scores = q.float() @ k.float().T
    threshold = (q.float() * k.float()[positive]).sum(-1) + margin
    return int((scores > threshold[:, None]).sum())


# The candidate rules: (group_size, false_negative_margin, exclude_positive, with_extra).
RULES = [
    (None, None, False, False),  # whole pool, nothing masked
    (None, 0.0, False, False),  # margin masking over the whole pool
    (4, None, False, False),  # own group only (groups of 4; the last group of 37 is partial)
    (4, 0.05, True, True),  # group + margin, positive left out and re-added as the engine does
    (None, 0.1, True, True),  # the engine's in-batch setting
]


# ---- the chunked PyTorch path ------------------------------------------------------------------


@pytest.mark.parametrize("grad_kind", ["uniform", "weighted"])
@pytest.mark.parametrize("group_size, margin, exclude, extra", RULES)
def test_chunked_matches_reference(group_size, margin, exclude, extra, grad_kind):
    q, k, positive, extra_lse = problem(seed=1, with_extra=extra)
    if margin is not None:
        assert masked_count(q, k, positive, margin) > 0  # the margin is exercised
    rules = dict(temperature=0.05, group_size=group_size, false_negative_margin=margin, exclude_positive=exclude)
    for tile_rows in (4, 64):  # several row tiles (13 = 4 + 4 + 4 + 1), and one tile for all
        fn = lambda *a, **kw: chunked_candidate_lse(*a, tile_rows=tile_rows, **kw)  # noqa: E731
        check_against_reference(fn, q, k, positive, extra_lse, grad_kind, rules, TOL[torch.float32])


def test_chunked_float16_inputs_match_reference():
    q, k, positive, extra = problem(seed=2, dtype=torch.float16, with_extra=True)
    rules = dict(temperature=0.05, group_size=None, false_negative_margin=0.05, exclude_positive=True)
    fn = lambda *a, **kw: chunked_candidate_lse(*a, tile_rows=5, **kw)  # noqa: E731
    check_against_reference(fn, q, k, positive, extra, "weighted", rules, TOL[torch.float16])


def test_uniform_gradient_uses_forward_gradients_and_weighted_recomputes(monkeypatch):
    """The fast path must be the one taken for a mean, and the recompute for anything else."""
    recomputed = []
    real = chunked_module._recompute_dk
    monkeypatch.setattr(chunked_module, "_recompute_dk", lambda *a: recomputed.append(1) or real(*a))
    q, k, positive, _ = problem(seed=3)
    for kind, expected_calls in (("uniform", 0), ("weighted", 1)):
        recomputed.clear()
        lse_and_grads(lambda *a, **kw: chunked_candidate_lse(*a, tile_rows=4, **kw), q, k, positive, None,
                      upstream(kind), temperature=0.05)
        assert len(recomputed) == expected_calls, kind


def test_engine_loss_hands_the_kernel_a_uniform_gradient(monkeypatch):
    """info_nce merges every outside term through extra_lse, so its backward never recomputes."""
    monkeypatch.setattr(chunked_module, "_recompute_dk", lambda *a: pytest.fail("dk was recomputed"))
    q, d, _, _ = problem(seed=4, num_queries=4, num_candidates=12)
    q.requires_grad_(True), d.requires_grad_(True)
    info_nce(q, d, group_size=3, false_negative_margin=0.1, query_query=True, doc_doc=True, backend="torch").backward()
    assert q.grad.abs().sum() > 0 and d.grad.abs().sum() > 0


# ---- edge rows: fully masked negatives, the positive kept --------------------------------------


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_query_with_every_negative_masked(backend):
    q, k, positive, _ = problem(seed=5, device=TRITON_DEVICE if backend == "triton" else "cpu")
    run = _backend_fn(backend)
    # A margin below -2 masks every candidate of unit vectors, the positive excepted.
    positive_logit = (q * k[positive]).sum(-1) / 0.05
    lse, (dq, dk) = lse_and_grads(run, q, k, positive, None, upstream("weighted", device=q.device),
                                  temperature=0.05, false_negative_margin=-3.0)
    assert_close_rel(lse, positive_logit, 1e-6, "lse is the positive's logit alone")
    # d lse_i / d q_i = k_pos / tau when the positive is the only term.
    assert_close_rel(dq, upstream("weighted", device=q.device)[:, None] * k[positive] / 0.05, 1e-5, "dq")
    # Left out as well: nothing is kept, lse = -inf, and no gradient (not NaN) flows.
    lse, (dq, dk) = lse_and_grads(run, q, k, positive, None, upstream("weighted", device=q.device),
                                  temperature=0.05, false_negative_margin=-3.0, exclude_positive=True)
    assert torch.isneginf(lse).all()
    assert torch.all(dq == 0) and torch.all(dk == 0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_positive_is_never_masked_and_loss_is_exactly_zero(backend):
    q, k, positive, _ = problem(seed=6, device=TRITON_DEVICE if backend == "triton" else "cpu")
    q.requires_grad_(True), k.requires_grad_(True)
    loss = info_nce_loss(q, k, positive, temperature=0.05, false_negative_margin=-10.0, backend=backend)
    assert torch.all(loss == 0)  # the positive alone: log(exp(p)/exp(p)), exactly
    loss.sum().backward()
    assert torch.all(q.grad == 0) and torch.all(k.grad == 0)


# ---- the Triton kernels ------------------------------------------------------------------------


def _backend_fn(backend):
    if backend == "torch":
        return lambda *a, **kw: chunked_candidate_lse(*a, tile_rows=4, **kw)
    from engine.kernels.infonce.triton import BlockConfig, triton_candidate_lse

    # Two splits: a query with nothing kept in either must still merge to -inf, not NaN.
    config = None if HAS_GPU else BlockConfig(block_m=16, block_n=16, block_d=16, splits=2)
    return lambda *a, **kw: triton_candidate_lse(*a, config=config, **kw)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("group_size, margin, exclude, extra", RULES)
def test_triton_matches_reference(group_size, margin, exclude, extra, splits, dtype):
    from engine.kernels.infonce.triton import BlockConfig, triton_candidate_lse

    q, k, positive, extra_lse = problem(seed=7, dtype=dtype, device=TRITON_DEVICE, with_extra=extra)
    config = BlockConfig(block_m=16, block_n=16, block_d=16, splits=splits)
    fn = lambda *a, **kw: triton_candidate_lse(*a, config=config, **kw)  # noqa: E731
    rules = dict(temperature=0.05, group_size=group_size, false_negative_margin=margin, exclude_positive=exclude)
    # The kernels' backward never depends on g being uniform; a weighted g checks the scaling.
    check_against_reference(fn, q, k, positive, extra_lse, "weighted", rules, TOL[dtype])


@needs_triton
def test_triton_group_span_skips_and_unsorted_positives():
    """Group-only: query blocks walk only their groups' span; unsorted positives widen the span."""
    from engine.kernels.infonce.triton import BlockConfig, triton_candidate_lse

    num_queries, group = 40, 3
    q, k, _, _ = problem(seed=8, num_queries=num_queries, num_candidates=num_queries * group, device=TRITON_DEVICE)
    in_order = torch.arange(num_queries, device=TRITON_DEVICE) * group  # the engine's layout
    shuffled = in_order[torch.randperm(num_queries, generator=torch.Generator().manual_seed(0)).to(TRITON_DEVICE)]
    config = BlockConfig(block_m=16, block_n=16, block_d=16, splits=1)
    fn = lambda *a, **kw: triton_candidate_lse(*a, config=config, **kw)  # noqa: E731
    for positive in (in_order, shuffled + 1):  # + 1: a positive that is not first in its group
        check_against_reference(fn, q, k, positive, None, "weighted", dict(temperature=0.05, group_size=group),
                                TOL[torch.float32])


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size, margin, exclude, extra", RULES)
def test_triton_autotuned_on_gpu(group_size, margin, exclude, extra, dtype):
    """Native kernels with the autotuner and the split heuristic, a B << N shape as in DP training."""
    from engine.kernels.infonce.triton import triton_candidate_lse

    q, k, positive, extra_lse = problem(seed=9, dtype=dtype, device="cuda", num_queries=300, num_candidates=5000,
                                        dim=200, with_extra=extra)
    rules = dict(temperature=0.05, group_size=group_size, false_negative_margin=margin, exclude_positive=exclude)
    check_against_reference(triton_candidate_lse, q, k, positive, extra_lse, "weighted", rules, TOL[dtype])


# ---- memory: never B x N -----------------------------------------------------------------------


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


@pytest.mark.parametrize("grad_kind", ["uniform", "weighted"])
def test_chunked_never_builds_a_query_by_candidate_tensor(grad_kind):
    num, tile_rows = 256, 16
    q, k, positive, extra = problem(seed=10, num_queries=num, num_candidates=num, dim=8, with_extra=True)
    with _LargestOutput() as seen:
        lse_and_grads(lambda *a, **kw: chunked_candidate_lse(*a, tile_rows=tile_rows, **kw), q, k, positive, extra,
                      upstream(grad_kind, num), temperature=0.05, false_negative_margin=0.1, exclude_positive=True)
    assert seen.largest == tile_rows * num  # one tile of whole rows, nothing bigger, forward and backward


PEAK_MEMORY_SCRIPT = textwrap.dedent("""
    import torch
    from engine.kernels.infonce.chunked import chunked_candidate_lse

    def status_bytes(key):  # VmRSS: resident now; VmHWM: its peak since the last reset
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    torch.manual_seed(0)
    num, dim = 8192, 16
    q = torch.randn(num, dim, requires_grad=True); k = torch.randn(num, dim, requires_grad=True)
    positive, extra, weights = torch.arange(num), torch.zeros(num), torch.rand(num)
    run = lambda n: chunked_candidate_lse(q[:n], k[:n], positive[:n], temperature=0.1, tile_rows=64,
                                          false_negative_margin=0.1, exclude_positive=True, extra_lse=extra[:n])
    run(512).backward(weights[:512])  # warm-up: thread pools, allocator arenas
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    before = status_bytes("VmRSS:")
    run(num).backward(weights)  # weighted: the forward's gradients and the dk recompute both run
    print(status_bytes("VmHWM:") - before)
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_chunked_peak_memory_is_far_below_one_logits_matrix():
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    result = subprocess.run([sys.executable, "-c", PEAK_MEMORY_SCRIPT], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    logits_bytes = 8192 * 8192 * 4  # 256 MiB; the naive path holds at least two of these
    # Measured ~9 MiB: a few 64 x 8192 tiles (2 MiB each) in flight and allocator slack,
    # plus O((B + N) d) gradients. A B x N float32 anywhere would add 256 MiB.
    peak_growth = int(result.stdout.strip())
    assert peak_growth < logits_bytes / 8, f"peak RSS grew {peak_growth / 2**20:.0f} MiB"


# ---- dispatcher --------------------------------------------------------------------------------


def test_backend_names_and_auto_rule():
    assert infonce.resolve_backend("auto", "cpu") == "torch"
    assert infonce.resolve_backend("auto", "cuda") == ("triton" if HAS_TRITON else "torch")
    with pytest.raises(ValueError, match="not one of"):
        infonce.set_infonce_backend("flash")
    previous = infonce.get_infonce_backend()
    try:
        infonce.set_infonce_backend("torch")
        assert infonce.resolve_backend("auto", "cuda") == "torch"  # the module default wins over the device rule
    finally:
        infonce.set_infonce_backend(previous)


def test_importing_kernels_infonce_does_not_import_triton():
    script = "import sys, engine.kernels.infonce, engine.losses; print('triton' in sys.modules)"
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], cwd=repo, env={**env, "PYTHONPATH": str(repo)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


# ---- the engine's loss through the kernels -----------------------------------------------------


def old_info_nce(q, d, *, group_size, temperature, in_batch_negatives, false_negative_margin, query_query, doc_doc,
                 query_offset=0, all_queries=None):
    """engine.losses.info_nce before the kernels (commit e37cb1a): one concatenated logits matrix."""
    rows = torch.arange(q.shape[0], device=q.device)
    own_group = query_offset + rows
    positive_col = own_group * group_size
    q32, d32 = q.float(), d.float()
    query_doc = q32 @ d32.T
    positive = query_doc[rows, positive_col]
    threshold = None if false_negative_margin is None else (positive.detach() + false_negative_margin)[:, None]

    def below(sim):
        return torch.ones_like(sim, dtype=torch.bool) if threshold is None else sim <= threshold

    def drop_self(sim, self_col):
        with torch.no_grad():
            keep = below(sim)
            keep[torch.arange(sim.shape[0], device=sim.device), self_col] = False
        return sim.masked_fill(~keep, float("-inf"))

    with torch.no_grad():
        keep = below(query_doc)
        if not in_batch_negatives:
            keep &= (torch.arange(d.shape[0], device=d.device) // group_size)[None, :] == own_group[:, None]
        keep[rows, positive_col] = True
    blocks = [query_doc.masked_fill(~keep, float("-inf"))]
    if query_query:
        pool = q32 if all_queries is None else all_queries.float()
        blocks.append(drop_self(q32 @ pool.T, rows if all_queries is None else own_group))
    if doc_doc:
        positives = d32[::group_size]
        blocks.append(drop_self(positives[own_group] @ positives.T, own_group))
    logits = torch.cat(blocks, dim=1) / temperature
    return (torch.logsumexp(logits, dim=1) - positive / temperature).mean()


ENGINE_SETTINGS = list(itertools.product([True, False], [None, 0.05], [False, True], [False, True]))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("in_batch, margin, query_query, doc_doc", ENGINE_SETTINGS)
def test_engine_info_nce_through_kernels_equals_old_formula(in_batch, margin, query_query, doc_doc, backend):
    num_groups, group, dim = 5, 3, 6  # dim 6: random unit vectors often beat the positive
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    q, d, _, _ = problem(seed=11, num_queries=num_groups, num_candidates=num_groups * group, dim=dim, device=device)
    settings = dict(group_size=group, temperature=0.05, in_batch_negatives=in_batch,
                    false_negative_margin=margin, query_query=query_query, doc_doc=doc_doc)
    # Queries 1..3 of 5 against the whole pool, as one data-parallel rank sees them.
    local = dict(query_offset=1, all_queries=q)
    results = []
    for fn in (lambda a, b: old_info_nce(a, b, **settings, **local),
               lambda a, b: info_nce(a, b, **settings, **local, backend=backend)):
        q_local, d_all = q[1:4].clone().requires_grad_(True), d.clone().requires_grad_(True)
        loss = fn(q_local, d_all)
        results.append((loss.detach(), *torch.autograd.grad(loss, (q_local, d_all))))
    # 1e-4, not 1e-5: tau = 0.05 multiplies the float32 rounding of each similarity by 20,
    # and the loss (lse - p/tau) and the positive's gradient (1 - P_pos) are differences of
    # nearly equal terms. Against a float64 evaluation the old formula itself is off by up to
    # 7e-5 here; both sides are float32 answers to an ill-conditioned question.
    for name, new, old in zip(("loss", "dq", "dd"), results[1], results[0]):
        assert_close_rel(new, old, 1e-4, name)


@needs_triton
def test_tiny_encoder_trains_to_the_same_losses_with_torch_and_triton():
    """Issue 5 check 1 in miniature: an encoder, four SGD steps, the two backends' loss curves."""
    curves = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        encoder = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16))
        encoder.to(TRITON_DEVICE)
        optimizer = torch.optim.SGD(encoder.parameters(), lr=0.5)
        data = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(4):
            queries, docs = (torch.randn(n, 12, generator=data).to(TRITON_DEVICE) for n in (6, 6 * 3))
            q, d = (F.normalize(encoder(x), dim=-1) for x in (queries, docs))
            loss = info_nce(q, d, group_size=3, temperature=0.05, false_negative_margin=0.1, query_query=True,
                            backend=backend)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        curves[backend] = torch.tensor(losses)
    assert curves["torch"][0] != curves["torch"][-1]  # it trains
    torch.testing.assert_close(curves["triton"], curves["torch"], rtol=0, atol=1e-4)
