"""The InfoNCE candidate log-sum-exp, written the obvious way: the spec every backend is tested against.

It builds the whole (B, N) logits matrix. Never optimise this file; chunked.py and triton.py
are the fast paths and must agree with it.
"""
from __future__ import annotations

import torch
from torch import Tensor


def candidate_lse_reference(
    q: Tensor,
    k: Tensor,
    positive: Tensor,
    *,
    temperature: float,
    group_size: int | None = None,
    false_negative_margin: float | None = None,
    exclude_positive: bool = False,
    extra_lse: Tensor | None = None,
) -> Tensor:
    r"""lse_i = log sum_{x kept} exp(q_i . k_x / temperature), float32, shape (B,).

    q (B, d) queries, k (N, d) candidates, positive (B,) the index in k of each query's
    positive. Candidate x is kept for query i iff all of
      - group_size is None, or x // group_size == positive_i // group_size (own group only);
      - false_negative_margin is None, or q_i.k_x <= q_i.k_{positive_i} + margin, the
        threshold detached (the mask is a data decision, not part of the function);
    and the positive itself is always kept, so every row has at least one term.

    exclude_positive=True leaves the positive's own term out: the log-sum-exp of the other
    kept candidates, -inf for a query that keeps none. A loss adds the positive back
    through extra_lse, as the very tensor q_i.k_pos / temperature it subtracts, so the two
    cancel exactly: a query with nothing else kept gets exactly zero loss and gradient.

    extra_lse (B,), differentiable, is the log-sum-exp of terms from outside the pool that
    join each query's sum: lse_i = log(exp(extra_lse_i) + sum_{x kept} exp(...)). A loss
    that is a plain mean of lse_i minus pool-free terms then hands every query the same
    upstream gradient, which the chunked path's forward-time gradients rely on.
    """
    q32, k32 = q.float(), k.float()
    scores = q32 @ k32.T  # (B, N)
    threshold = margin_threshold(q, k, positive, false_negative_margin)
    with torch.no_grad():
        candidate = torch.arange(k.shape[0], device=k.device)[None, :]  # (1, N)
        keep = torch.ones_like(scores, dtype=torch.bool)
        if group_size is not None:
            keep &= candidate // group_size == (positive // group_size)[:, None]
        if threshold is not None:
            keep &= scores <= threshold[:, None]
        is_positive = candidate == positive[:, None]
        keep = keep & ~is_positive if exclude_positive else keep | is_positive
    logits = scores.masked_fill(~keep, float("-inf")) / temperature  # (B, N)
    if extra_lse is not None:
        logits = torch.cat([logits, extra_lse.float()[:, None]], dim=1)  # (B, N + 1)
    return torch.logsumexp(logits, dim=1)


def positive_scores(q: Tensor, k: Tensor, positive: Tensor) -> Tensor:
    """q_i . k_{positive_i} in float32, (B,), differentiable."""
    return (q.float() * k[positive].float()).sum(-1)


def margin_threshold(q: Tensor, k: Tensor, positive: Tensor, margin: float | None) -> Tensor | None:
    """The false-negative threshold q_i.k_pos + margin (B,), detached; None when there is no margin.

    Every backend takes the threshold from here, so a candidate sitting exactly on it is
    judged the same way by all of them.
    """
    if margin is None:
        return None
    with torch.no_grad():
        return positive_scores(q, k, positive) + margin

