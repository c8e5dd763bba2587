"""Triton kernels for the InfoNCE candidate log-sum-exp: forward, dq and dk, never the (B, N) logits.

Imported only when the 'triton' backend is chosen (engine/kernels/infonce/__init__.py). The spec is
reference.candidate_lse_reference; this file must agree with it.

Forward (_lse_forward_kernel), grid (query blocks, candidate splits): a program holds
BLOCK_M queries and walks its share of their candidates in BLOCK_N tiles. Each score tile
is a small GEMM over d in BLOCK_D chunks (embedding widths of 1024-8192 do not fit a
register tile), masked by the candidate rules, and folded into a running max and sum
(online log-sum-exp, float32). Each split writes a partial LSE; torch.logsumexp over the
splits gives lse (B,); an extra_lse joins it there (torch.logaddexp), and the backward
kernels take the merged lse. The backward needs nothing else: O(B).

Backward: P_ix = exp(s_ix / tau - lse_i) on kept candidates, recomputed per tile, and
    dq_i = (g_i / tau) sum_x P_ix k_x        _dq_kernel, grid (query blocks, splits)
    dk_x = (1 / tau) sum_i g_i P_ix q_i      _dk_kernel, grid (candidate blocks,)
dk is a second pass over query tiles, not atomics: with atomics every (query block,
candidate tile) pair would add a BLOCK_N x d slab, (B / BLOCK_M) * N * d float atomics in
all (8.6e9 at B = N = 32768, d = 1024, BLOCK_M = 128), traffic far above the one extra
score GEMM the second pass costs; the second pass is also deterministic. A program owns
its output rows, but a (rows, d) float32 accumulator does not fit in registers for large
d, so it accumulates in global memory, one (rows, BLOCK_D) slab per d chunk (read, add a
tl.dot, write), with a barrier per tile because the threads that read a slab are not
always the ones that wrote it. Output rows are zeroed by their owner first, so a launch
is idempotent and the autotuner may run it repeatedly.

Splits. In data-parallel training a rank holds few queries (B = 256-1024) against many
gathered candidates (N = 32K-128K): B / BLOCK_M programs would leave most of an H100's
132 SMs idle. Forward and dq therefore also split the candidate axis: partial LSEs
(splits, B) and partial dq (splits, B, d) float32, summed in torch; the split count aims
at two programs per SM, keeps >= 1024 candidates per split and caps the dq scratch at
SCRATCH_BYTES. dk needs no split: N / BLOCK_N programs are plenty whenever N >= B.

Candidate rules in the kernels: group_size limits a query block to the span of its
queries' groups (contiguous, the engine's layout), and dk skips query blocks whose groups
miss its candidate block, so group-only InfoNCE costs O(B * G * d), not O(B * N * d).

Autotune configurations (H100, SM90: 228 KiB shared memory per SM, 64K registers):
- 16-bit inputs use tensor cores. 128 x 128 score tiles with BLOCK_D = 64 and 8 warps (two
  warpgroups, one 64-row wgmma each) is the shape Triton's own Hopper matmul tutorial
  favours; three stages of (128 + 128) x 64 x 2 B = 96 KiB of operands fit shared memory.
- 128 x 64 and 64 x 128 with 4 warps and 4 stages: smaller register footprint for the
  backward kernels, which also hold the float32 P tile and an accumulator slab.
- 64 x 64, BLOCK_D = 32: float32 inputs run with input_precision="ieee" (no tensor
  cores, FMA) to meet the float32 contract (relative 1e-5; TF32 keeps 10 mantissa bits and
  would miss it by two orders of magnitude), and small tiles keep FMA kernels occupied.
The key is (B, N, D): training shapes are fixed, so tuning runs once per run.
These choices are reasoned, not measured: the development VM has no GPU. tests/kernels/
test_infonce.py runs the autotuned kernels natively when a GPU is present.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from engine.kernels.infonce.reference import margin_threshold

SCRATCH_BYTES = 512 * 2**20  # cap on the dq partials of a split launch
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class BlockConfig:
    """Explicit tile sizes (tests, the interpreter); None means autotune and the split heuristic."""

    block_m: int = 16
    block_n: int = 16
    block_d: int = 16
    splits: int = 1


def triton_candidate_lse(
    q: Tensor,
    k: Tensor,
    positive: Tensor,
    *,
    temperature: float,
    group_size: int | None = None,
    false_negative_margin: float | None = None,
    exclude_positive: bool = False,
    extra_lse: Tensor | None = None,
    config: BlockConfig | None = None,
) -> Tensor:
    """candidate_lse_reference's result and gradients from the Triton kernels (module docstring)."""
    threshold = margin_threshold(q, k, positive, false_negative_margin)
    if config is None and q.device.type != "cuda":
        config = BlockConfig()  # the interpreter: the autotuner times with CUDA events
    rules = (group_size, threshold, exclude_positive)
    return TritonCandidateLSE.apply(q, k, positive, extra_lse, rules, temperature, config)


class TritonCandidateLSE(torch.autograd.Function):
    """forward: lse (B,) by the online-LSE kernel | backward: dq and dk kernels recompute the tiles."""

    @staticmethod
    def forward(ctx, q, k, positive, extra_lse, rules, temperature, config):
        qk, kk = _kernel_inputs(q, k)
        launch = _Launch(qk, kk, positive.contiguous(), rules, temperature, config)
        lse = launch.forward()
        if extra_lse is not None:
            lse = torch.logaddexp(lse, extra_lse.float())
        ctx.save_for_backward(qk, kk, launch.positive, extra_lse, lse)
        ctx.setup = (rules, temperature, config, q.dtype, k.dtype)
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lse):
        qk, kk, positive, extra_lse, lse = ctx.saved_tensors
        rules, temperature, config, q_dtype, k_dtype = ctx.setup
        launch = _Launch(qk, kk, positive, rules, temperature, config)
        grad = grad_lse.float().contiguous()
        dq = launch.dq(lse, grad).to(q_dtype) if ctx.needs_input_grad[0] else None
        dk = launch.dk(lse, grad).to(k_dtype) if ctx.needs_input_grad[1] else None
        d_extra = None
        if ctx.needs_input_grad[3]:
            d_extra = (grad * (extra_lse.float() - lse).exp()).to(extra_lse.dtype)  # the extra term's softmax weight
        return dq, dk, None, d_extra, None, None, None


def _kernel_inputs(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Contiguous q and k in one dtype tl.dot takes (float64 and mixed pairs go to float32)."""
    dtype = q.dtype if q.dtype == k.dtype and q.dtype in _KERNEL_DTYPES else torch.float32
    return q.to(dtype).contiguous(), k.to(dtype).contiguous()


class _Launch:
    """One problem's kernel arguments, grids and block choice, for the three launches."""

    def __init__(self, q, k, positive, rules, temperature, config):
        group_size, threshold, self.exclude_positive = rules
        self.q, self.k, self.positive = q, k, positive
        self.num_queries, self.dim = q.shape
        self.num_candidates = k.shape[0]
        self.has_margin = threshold is not None
        # Without a margin the kernels never read the threshold, but its pointer needs a tensor.
        self.threshold = threshold.contiguous() if threshold is not None else torch.empty(1, device=q.device)
        self.inv_temperature = 1.0 / temperature
        self.has_group = group_size is not None
        self.group_size = group_size if group_size is not None else 1
        self.config = config
        self.splits = config.splits if config is not None else _num_splits(q, self.num_candidates, group_size)
        # TF32 would break the float32 contract (module docstring); 16-bit inputs ignore it.
        self.precision = "ieee" if q.dtype == torch.float32 else "tf32"

    def _common(self) -> tuple:
        return (self.q, self.k, self.positive, self.threshold)

    def _sizes(self) -> tuple:
        return (self.num_queries, self.num_candidates, self.dim, self.inv_temperature, self.group_size)

    def _flags(self) -> dict:
        return dict(HAS_GROUP=self.has_group, HAS_MARGIN=self.has_margin, EXCLUDE_POSITIVE=self.exclude_positive,
                    PRECISION=self.precision)

    def _blocks(self) -> dict:
        c = self.config
        return dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=c.block_d)

    def forward(self) -> Tensor:
        partial = torch.empty(self.splits, self.num_queries, dtype=torch.float32, device=self.q.device)
        args = (*self._common(), partial, *self._sizes())
        if self.config is None:
            grid = lambda meta: (triton.cdiv(self.num_queries, meta["BLOCK_M"]), self.splits)  # noqa: E731
            _lse_forward_tuned[grid](*args, **self._flags())
        else:
            grid = (triton.cdiv(self.num_queries, self.config.block_m), self.splits)
            _lse_forward_kernel[grid](*args, **self._flags(), **self._blocks())
        # A query's kept candidates lie in some split, so its column has a finite entry
        # (all -inf only for a query that kept nothing under exclude_positive: lse -inf).
        return torch.logsumexp(partial, dim=0) if self.splits > 1 else partial[0]

    def dq(self, lse: Tensor, grad: Tensor) -> Tensor:
        partial = torch.empty(self.splits, self.num_queries, self.dim, dtype=torch.float32, device=self.q.device)
        args = (*self._common(), lse, grad, partial, *self._sizes())
        if self.config is None:
            grid = lambda meta: (triton.cdiv(self.num_queries, meta["BLOCK_M"]), self.splits)  # noqa: E731
            _dq_tuned[grid](*args, **self._flags())
        else:
            grid = (triton.cdiv(self.num_queries, self.config.block_m), self.splits)
            _dq_kernel[grid](*args, **self._flags(), **self._blocks())
        return partial.sum(dim=0) if self.splits > 1 else partial[0]

    def dk(self, lse: Tensor, grad: Tensor) -> Tensor:
        dk = torch.empty(self.num_candidates, self.dim, dtype=torch.float32, device=self.k.device)
        args = (*self._common(), lse, grad, dk, *self._sizes())
        if self.config is None:
            grid = lambda meta: (triton.cdiv(self.num_candidates, meta["BLOCK_N"]),)  # noqa: E731
            _dk_tuned[grid](*args, **self._flags())
        else:
            grid = (triton.cdiv(self.num_candidates, self.config.block_n),)
            _dk_kernel[grid](*args, **self._flags(), **self._blocks())
        return dk


def _num_splits(q: Tensor, num_candidates: int, group_size: int | None) -> int:
    """Candidate splits for forward and dq: about two programs per SM (module docstring)."""
    if group_size is not None or q.device.type != "cuda":
        return 1  # a group-only block sees BLOCK_M * G candidates: nothing to split
    num_queries, dim = q.shape
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    wanted = triton.cdiv(2 * sms, triton.cdiv(num_queries, 64))  # 64: the smallest BLOCK_M tuned
    by_work = triton.cdiv(num_candidates, 1024)
    by_memory = SCRATCH_BYTES // (num_queries * dim * 4)
    return max(1, min(wanted, by_work, by_memory))


# ---- device code -------------------------------------------------------------------------------


@triton.jit
def _query_rows(positive_ptr, threshold_ptr, offs_m, mask_m, HAS_MARGIN: tl.constexpr):
    """Each query's positive index and false-negative threshold (+inf without a margin)."""
    positive = tl.load(positive_ptr + offs_m, mask=mask_m, other=0).to(tl.int32)
    if HAS_MARGIN:
        threshold = tl.load(threshold_ptr + offs_m, mask=mask_m, other=0.0)
    else:
        threshold = tl.full(offs_m.shape, float("inf"), tl.float32)
    return positive, threshold


@triton.jit
def _span(positive, mask_m, N, group_size, split, num_splits, HAS_GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """Candidates [lo, hi) this program walks: its queries' groups' span (or all), cut to its split."""
    if HAS_GROUP:
        group = positive // group_size
        lo = tl.min(tl.where(mask_m, group, N), axis=0) * group_size
        hi = tl.minimum((tl.max(tl.where(mask_m, group, -1), axis=0) + 1) * group_size, N)
    else:
        lo = 0
        hi = N
    chunk = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N  # whole tiles per split
    split_lo = lo + split * chunk
    split_hi = tl.minimum(hi, split_lo + chunk)
    return split_lo, split_hi


@triton.jit
def _masked_logits(q_ptr, k_ptr, offs_m, mask_m, offs_n, mask_n, positive, threshold, D, inv_temperature,
                   group_size, HAS_GROUP: tl.constexpr, HAS_MARGIN: tl.constexpr, EXCLUDE_POSITIVE: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 logits s / tau of the tile, -inf where a candidate is not kept."""
    scores = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rows_q = offs_m.to(tl.int64)[:, None] * D
    rows_k = offs_n.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        q = tl.load(q_ptr + rows_q + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        k = tl.load(k_ptr + rows_k + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        scores = tl.dot(q, tl.trans(k), scores, input_precision=PRECISION)
    keep = tl.full((BLOCK_M, BLOCK_N), 1, tl.int1)
    if HAS_GROUP:
        keep = keep & ((offs_n[None, :] // group_size) == (positive[:, None] // group_size))
    if HAS_MARGIN:
        # Raw similarities against the raw threshold, before the temperature, as the spec does.
        keep = keep & (scores <= threshold[:, None])
    is_positive = offs_n[None, :] == positive[:, None]
    if EXCLUDE_POSITIVE:
        keep = keep & ~is_positive
    else:
        keep = keep | is_positive
    keep = keep & mask_m[:, None] & mask_n[None, :]
    return tl.where(keep, scores * inv_temperature, float("-inf"))


@triton.jit
def _finite_lse(lse_ptr, offs_m, mask_m):
    """Saved lse, with 0 for a query that kept nothing: its logits are all -inf, and
    exp(-inf - 0) = 0 where exp(-inf - -inf) would be NaN."""
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    return tl.where(lse == float("-inf"), 0.0, lse)


@triton.jit
def _zero_rows(ptr, offs_rows, mask_rows, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = offs_rows.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        tl.store(ptr + rows + offs_d[None, :], tl.zeros((ROWS, BLOCK_D), dtype=tl.float32),
                 mask=mask_rows[:, None] & (offs_d[None, :] < D))
    tl.debug_barrier()


@triton.jit
def _accumulate_rows(acc_ptr, offs_rows, mask_rows, weights, src_ptr, offs_src, mask_src, D,
                     PRECISION: tl.constexpr, BLOCK_D: tl.constexpr):
    """acc[rows, :] += weights @ src[offs_src, :], one (rows, BLOCK_D) float32 slab of global memory at a time."""
    rows = offs_rows.to(tl.int64)[:, None] * D
    rows_src = offs_src.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d[None, :] < D
        src = tl.load(src_ptr + rows_src + offs_d[None, :], mask=mask_src[:, None] & mask_d, other=0.0)
        slab = tl.load(acc_ptr + rows + offs_d[None, :], mask=mask_rows[:, None] & mask_d, other=0.0)
        slab = tl.dot(weights, src, slab, input_precision=PRECISION)
        tl.store(acc_ptr + rows + offs_d[None, :], slab, mask=mask_rows[:, None] & mask_d)
    # The next tile reads these slabs again, maybe from other threads of the block.
    tl.debug_barrier()


@triton.jit
def _lse_forward_kernel(q_ptr, k_ptr, positive_ptr, threshold_ptr, partial_lse_ptr,
                        B, N, D, inv_temperature, group_size,
                        HAS_GROUP: tl.constexpr, HAS_MARGIN: tl.constexpr, EXCLUDE_POSITIVE: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    split = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < B
    positive, threshold = _query_rows(positive_ptr, threshold_ptr, offs_m, mask_m, HAS_MARGIN)
    lo, hi = _span(positive, mask_m, N, group_size, split, tl.num_programs(1), HAS_GROUP, BLOCK_N)
    # A finite start: a row with nothing kept yet must not produce exp(-inf - -inf) = NaN.
    row_max = tl.full((BLOCK_M,), -1e30, tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        logits = _masked_logits(q_ptr, k_ptr, offs_m, mask_m, offs_n, offs_n < hi, positive, threshold, D,
                                inv_temperature, group_size, HAS_GROUP, HAS_MARGIN, EXCLUDE_POSITIVE, PRECISION,
                                BLOCK_M, BLOCK_N, BLOCK_D)
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        row_max = new_max
    # A split holding none of a row's kept candidates writes -inf: no weight in the merge. (A row
    # that keeps anything has row_sum >= 1, its maximum's exp(0); log(0) itself would make the
    # interpreter warn.)
    kept_any = row_sum > 0
    lse = tl.where(kept_any, row_max + tl.log(tl.where(kept_any, row_sum, 1.0)), float("-inf"))
    tl.store(partial_lse_ptr + split * B + offs_m, lse, mask=mask_m)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, positive_ptr, threshold_ptr, lse_ptr, grad_ptr, dq_partial_ptr,
               B, N, D, inv_temperature, group_size,
               HAS_GROUP: tl.constexpr, HAS_MARGIN: tl.constexpr, EXCLUDE_POSITIVE: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    split = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < B
    positive, threshold = _query_rows(positive_ptr, threshold_ptr, offs_m, mask_m, HAS_MARGIN)
    lse = _finite_lse(lse_ptr, offs_m, mask_m)
    row_scale = tl.load(grad_ptr + offs_m, mask=mask_m, other=0.0) * inv_temperature  # g_i / tau
    dq_ptr = dq_partial_ptr + split.to(tl.int64) * B * D  # this split's (B, D) partial
    _zero_rows(dq_ptr, offs_m, mask_m, D, BLOCK_M, BLOCK_D)
    lo, hi = _span(positive, mask_m, N, group_size, split, tl.num_programs(1), HAS_GROUP, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        logits = _masked_logits(q_ptr, k_ptr, offs_m, mask_m, offs_n, mask_n, positive, threshold, D,
                                inv_temperature, group_size, HAS_GROUP, HAS_MARGIN, EXCLUDE_POSITIVE, PRECISION,
                                BLOCK_M, BLOCK_N, BLOCK_D)
        weights = tl.exp(logits - lse[:, None]) * row_scale[:, None]  # (BLOCK_M, BLOCK_N) g_i P_ix / tau
        _accumulate_rows(dq_ptr, offs_m, mask_m, weights.to(k_ptr.dtype.element_ty), k_ptr, offs_n, mask_n, D,
                         PRECISION, BLOCK_D)


@triton.jit
def _dk_kernel(q_ptr, k_ptr, positive_ptr, threshold_ptr, lse_ptr, grad_ptr, dk_ptr,
               B, N, D, inv_temperature, group_size,
               HAS_GROUP: tl.constexpr, HAS_MARGIN: tl.constexpr, EXCLUDE_POSITIVE: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    first_n = tl.program_id(0) * BLOCK_N
    offs_n = first_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    _zero_rows(dk_ptr, offs_n, mask_n, D, BLOCK_N, BLOCK_D)
    for m0 in range(0, B, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < B
        positive, threshold = _query_rows(positive_ptr, threshold_ptr, offs_m, mask_m, HAS_MARGIN)
        if HAS_GROUP:
            group = positive // group_size
            first_group = tl.min(tl.where(mask_m, group, N), axis=0)
            last_group = tl.max(tl.where(mask_m, group, -1), axis=0)
            last_candidate = tl.minimum(first_n + BLOCK_N, N) - 1
            visible = (last_group >= first_n // group_size) & (first_group <= last_candidate // group_size)
        else:
            visible = True
        if visible:
            lse = _finite_lse(lse_ptr, offs_m, mask_m)
            row_scale = tl.load(grad_ptr + offs_m, mask=mask_m, other=0.0) * inv_temperature
            logits = _masked_logits(q_ptr, k_ptr, offs_m, mask_m, offs_n, mask_n, positive, threshold, D,
                                    inv_temperature, group_size, HAS_GROUP, HAS_MARGIN, EXCLUDE_POSITIVE, PRECISION,
                                    BLOCK_M, BLOCK_N, BLOCK_D)
            weights = tl.exp(logits - lse[:, None]) * row_scale[:, None]  # (BLOCK_M, BLOCK_N)
            _accumulate_rows(dk_ptr, offs_n, mask_n, tl.trans(weights).to(q_ptr.dtype.element_ty), q_ptr, offs_m,
                             mask_m, D, PRECISION, BLOCK_D)


def _configs() -> list:
    shapes = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 32, 4, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": d}, num_warps=w, num_stages=s)
            for m, n, d, w, s in shapes]


_KEY = ["B", "N", "D"]
_lse_forward_tuned = triton.autotune(configs=_configs(), key=_KEY)(_lse_forward_kernel)
_dq_tuned = triton.autotune(configs=_configs(), key=_KEY)(_dq_kernel)
_dk_tuned = triton.autotune(configs=_configs(), key=_KEY)(_dk_kernel)
