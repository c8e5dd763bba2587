"""The PyTorch InfoNCE path: candidate log-sum-exp over row tiles, never the (B, N) logits.

What runs on CPU (and on any device when `backend="torch"`). Queries are cut into tiles of
whole rows; a tile of r rows meets the candidates it may see in one (r, n) score block, so
the log-sum-exp of each row is exact within its tile and needs no online rescaling. The
tile's height is chosen so that r * n stays at TILE_ELEMENTS whatever N is: memory beyond
inputs and outputs is O(N) per tile plus O(B + N) (lse, gradients), never B x N.

Three matrix products, like the naive path. The loss is the last operation of a training
step, so the forward computes the gradients while it holds each tile's probabilities P
(P = softmax of the kept logits, one tile at a time):
    dq_i = (g_i / tau) sum_x P_ix k_x         exact for any upstream gradient g: scale rows
    dk_x = (1 / tau) sum_i g_i P_ix q_i       known in the forward only for g uniform
and the backward scales them by g. dk is linear in g through a (B, N) matrix, so no O(N d)
summary made before g is known gives it for every g; when g is not uniform the backward
recomputes each tile's P from the saved lse and forms dk exactly (two more products, still
no B x N). A loss keeps g uniform by being a plain mean of lse_i minus terms that do not
involve the pool, and `extra_lse` exists for that: terms from outside the pool (the
positive's own logit, the query-query and doc-doc blocks) join inside the log-sum-exp
rather than through a logaddexp downstream, whose weights would make g vary per query.

Tile height: see TILE_ELEMENTS; bench/kernel_bench.py --what infonce --tiles measures it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from engine.kernels.infonce.reference import margin_threshold

# Score elements per tile (rows = TILE_ELEMENTS // N, a 64 MiB float32 block). Measured on the
# 2-core development VM, float32, d = 1024, forward + backward (bench/kernel_bench.py --tiles),
# wall seconds / peak memory growth:
#     TILE_ELEMENTS        2^21          2^22          2^23          2^24          2^25
#     B = N = 8192     3.05 / 170M   2.76 / 170M   2.85 / 186M   2.76 / 250M        -
#     B = N = 32768         -        58.4 / 665M   51.1 / 649M   48.3 / 665M   50.0 / 681M
# Short tiles lose because each one reads and writes all of dk (N x d) in its P^T q
# product: fewer than ~512 rows and that traffic shows. Memory is dominated by the
# O((B + N) d) gradients, so the taller tile costs little.
TILE_ELEMENTS = 2**24


def chunked_candidate_lse(
    q: Tensor,
    k: Tensor,
    positive: Tensor,
    *,
    temperature: float,
    group_size: int | None = None,
    false_negative_margin: float | None = None,
    exclude_positive: bool = False,
    extra_lse: Tensor | None = None,
    tile_rows: int | None = None,
) -> Tensor:
    """candidate_lse_reference's result and gradients, computed tile by tile (see the module docstring)."""
    threshold = margin_threshold(q, k, positive, false_negative_margin)
    rows = tile_rows if tile_rows is not None else max(1, TILE_ELEMENTS // max(1, k.shape[0]))
    grad_on = torch.is_grad_enabled()
    want = (grad_on and q.requires_grad, grad_on and k.requires_grad)
    rules = (group_size, threshold, exclude_positive)
    return ChunkedCandidateLSE.apply(q, k, positive, extra_lse, rules, temperature, rows, want)


class ChunkedCandidateLSE(torch.autograd.Function):
    """forward: lse (B,), and dq, dk for a unit upstream gradient | backward: scale by g (dk recomputed if g varies)."""

    @staticmethod
    def forward(ctx, q, k, positive, extra_lse, rules, temperature, rows, want):
        want_dq, want_dk = want
        tiles = _Tiles(q, k, positive, extra_lse, rules, temperature, rows)
        lse = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if want_dq else None
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device) if want_dk else None
        for start, stop in tiles.row_ranges():
            probs, lo, hi = tiles.probs(start, stop, lse_out=lse[start:stop])  # (rows, hi - lo)
            if want_dq:
                torch.mm(probs, tiles.k32[lo:hi], out=dq[start:stop])
            if want_dk:
                dk[lo:hi].addmm_(probs.T, tiles.q32[start:stop])
        ctx.save_for_backward(q, k, positive, extra_lse, lse, _scaled(dq, 1 / temperature),
                              _scaled(dk, 1 / temperature))
        ctx.setup = (rules, temperature, rows)
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lse):
        q, k, positive, extra_lse, lse, dq_unit, dk_unit = ctx.saved_tensors
        g = grad_lse.float()  # (B,)
        dq = dk = d_extra = None
        if ctx.needs_input_grad[0]:
            dq = (dq_unit * g[:, None]).to(q.dtype)
        if ctx.needs_input_grad[1]:
            if bool((g == g[0]).all()):
                dk = (dk_unit * g[0]).to(k.dtype)
            else:
                dk = _recompute_dk(q, k, positive, extra_lse, lse, g, *ctx.setup).to(k.dtype)
        if ctx.needs_input_grad[3]:
            d_extra = (g * (extra_lse.float() - lse).exp()).to(extra_lse.dtype)  # softmax weight of the extra term
        return dq, dk, None, d_extra, None, None, None, None


def _recompute_dk(q, k, positive, extra_lse, lse, g, rules, temperature, rows) -> Tensor:
    """dk_x = (1/tau) sum_i g_i P_ix q_i for any g, from the saved lse: two products per tile."""
    tiles = _Tiles(q, k, positive, extra_lse, rules, temperature, rows)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    for start, stop in tiles.row_ranges():
        probs, lo, hi = tiles.probs(start, stop, lse=lse[start:stop])
        weighted_q = tiles.q32[start:stop] * (g[start:stop] / temperature)[:, None]  # (rows, d)
        dk[lo:hi].addmm_(probs.T, weighted_q)
    return dk


class _Tiles:
    """Row tiles of the logits and their softmax, one at a time."""

    def __init__(self, q, k, positive, extra_lse, rules, temperature, rows):
        self.q32, self.k32 = q.float(), k.float()
        self.positive = positive
        self.extra_lse = None if extra_lse is None else extra_lse.detach().float()
        self.group_size, self.threshold, self.exclude_positive = rules
        self.temperature, self.rows = temperature, rows

    def row_ranges(self):
        num_queries = self.q32.shape[0]
        for start in range(0, num_queries, self.rows):
            yield start, min(start + self.rows, num_queries)

    def probs(self, start: int, stop: int, *, lse: Tensor | None = None, lse_out: Tensor | None = None):
        """(P, lo, hi): softmax weights of kept candidates lo:hi of queries start:stop.

        With `lse` given (the backward) P comes from it; otherwise the rows' lse is written
        into `lse_out`. P is built in place in the score block: one (rows, hi-lo) float32
        allocation per tile.
        """
        logits, lo, hi = self._logits(start, stop)
        if lse is not None:
            # A query that kept nothing has lse = -inf; exp(-inf - 0) = 0 where
            # exp(-inf - -inf) would be NaN.
            return logits.sub_(lse.masked_fill(lse == float("-inf"), 0.0)[:, None]).exp_(), lo, hi
        row_max = logits.amax(dim=1)
        # A row that kept nothing (only with exclude_positive) has max -inf: shift it by 0
        # instead, so its terms are exp(-inf) = 0.
        row_max.masked_fill_(row_max == float("-inf"), 0.0)
        weights = logits.sub_(row_max[:, None]).exp_()  # exp(logit - row_max)
        row_sum = weights.sum(dim=1)
        row_lse = row_max + row_sum.log()  # -inf for a row that kept nothing
        if self.extra_lse is not None:
            row_lse = torch.logaddexp(row_lse, self.extra_lse[start:stop])
        lse_out.copy_(row_lse)
        to_probs = torch.where(row_sum > 0, (row_max - row_lse).exp(), 0.0)  # exp(row_max - lse)
        return weights.mul_(to_probs[:, None]), lo, hi

    def _logits(self, start: int, stop: int) -> tuple[Tensor, int, int]:
        """(logits, lo, hi): s / tau of queries start:stop and candidates lo:hi, -inf where not kept."""
        lo, hi = self._candidate_range(self.positive[start:stop])
        scores = self.q32[start:stop] @ self.k32[lo:hi].T  # (rows, hi - lo) raw similarities
        if self.group_size is not None or self.threshold is not None or self.exclude_positive:
            scores.masked_fill_(self._dropped(scores, start, stop, lo), float("-inf"))
        # Mask before scaling: the threshold compares raw similarities, as the spec does.
        return scores.mul_(1 / self.temperature), lo, hi

    @torch.no_grad()
    def _dropped(self, scores: Tensor, start: int, stop: int, lo: int) -> Tensor:
        """bool (rows, cols), True where a candidate of the tile is not kept (the spec's rules).

        Built as the drop mask, with the positive's cell set by index, so that it costs
        two or three passes over the tile rather than the spec's six.
        """
        rows, cols = scores.shape
        positive = self.positive[start:stop]
        dropped = None
        if self.group_size is not None:
            candidate_group = torch.arange(lo, lo + cols, device=scores.device) // self.group_size  # (cols,)
            dropped = candidate_group[None, :] != (positive // self.group_size)[:, None]
        if self.threshold is not None:
            above = scores > self.threshold[start:stop, None]
            dropped = above if dropped is None else dropped.logical_or_(above)
        if dropped is None:
            dropped = torch.zeros_like(scores, dtype=torch.bool)
        column = positive - lo  # (rows,) the positive's column in this tile, if it lies in it
        inside = (column >= 0) & (column < cols)
        dropped[torch.arange(rows, device=scores.device)[inside], column[inside]] = self.exclude_positive
        return dropped

    def _candidate_range(self, positive: Tensor) -> tuple[int, int]:
        """Columns the tile's queries may see: their groups' span (contiguous groups), else all."""
        num_candidates = self.k32.shape[0]
        if self.group_size is None:
            return 0, num_candidates
        size = self.group_size
        lo = int(positive.min()) // size * size
        hi = min(num_candidates, (int(positive.max()) // size + 1) * size)
        return lo, hi


def _scaled(t: Tensor | None, factor: float) -> Tensor | None:
    return None if t is None else t.mul_(factor)
