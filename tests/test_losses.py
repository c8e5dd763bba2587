"""engine.losses against references written out with explicit loops, forward and gradients."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from engine.losses import LossInputError, distill_kl, info_nce, listwise_ce, pointwise_bce


def reference_info_nce(q, d, *, group_size, temperature, in_batch_negatives=True, margin=None,
                       query_query=False, doc_doc=False, query_offset=0, all_queries=None):
    """Per query: build the candidate list by hand, then -log(exp(s+) / sum exp(s))."""
    G, tau = group_size, temperature
    num_groups = d.shape[0] // G
    query_pool = q if all_queries is None else all_queries
    losses, dropped = [], 0
    for i in range(q.shape[0]):
        g = query_offset + i
        positive_doc = d[g * G]
        s_pos = torch.dot(q[i], positive_doc)
        candidates = [s_pos]

        def offer(s):
            nonlocal dropped
            if margin is not None and s.item() > s_pos.item() + margin:
                dropped += 1
            else:
                candidates.append(s)

        for k in range(1, G):
            offer(torch.dot(q[i], d[g * G + k]))
        if in_batch_negatives:
            for j in range(num_groups):
                if j != g:
                    for k in range(G):
                        offer(torch.dot(q[i], d[j * G + k]))
        if query_query:
            self_index = i if all_queries is None else g
            for j in range(query_pool.shape[0]):
                if j != self_index:
                    offer(torch.dot(q[i], query_pool[j]))
        if doc_doc:
            for j in range(num_groups):
                if j != g:
                    offer(torch.dot(positive_doc, d[j * G]))
        denominator = sum(torch.exp(s / tau) for s in candidates)
        losses.append(-torch.log(torch.exp(s_pos / tau) / denominator))
    return sum(losses) / len(losses), dropped


def unit_rows(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def loss_and_grads(fn, q, d, **kw):
    q = q.clone().requires_grad_(True)
    d = d.clone().requires_grad_(True)
    out = fn(q, d, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    gq, gd = torch.autograd.grad(loss, (q, d))
    return loss.detach(), gq, gd, out


@pytest.mark.parametrize(
    "in_batch, margin, query_query, doc_doc",
    list(itertools.product([True, False], [None, 0.0, 0.1], [False, True], [False, True])),
)
def test_info_nce_matches_loop_reference(in_batch, margin, query_query, doc_doc):
    B, G, H, tau = 4, 3, 6, 0.05  # H=6 so random unit vectors often beat the positive
    q, d = unit_rows(B, H, seed=1), unit_rows(B * G, H, seed=2)
    kw = dict(group_size=G, temperature=tau, in_batch_negatives=in_batch, query_query=query_query, doc_doc=doc_doc)

    loss, gq, gd, _ = loss_and_grads(info_nce, q, d, false_negative_margin=margin, **kw)
    ref, ref_gq, ref_gd, (_, dropped) = loss_and_grads(reference_info_nce, q, d, margin=margin, **kw)

    assert loss.dtype == torch.float32  # fp32 math whatever comes in
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gq, ref_gq, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gd, ref_gd, rtol=1e-4, atol=1e-5)
    if margin == 0.0:
        assert dropped > 0  # the mask was actually exercised


def test_planted_false_negative_vanishes():
    B, G, H, tau = 3, 3, 8, 0.05
    q, d = unit_rows(B, H, seed=3), unit_rows(B * G, H, seed=4)
    d[1] = q[0]  # a "hard negative" of query 0 that matches it perfectly: beats the positive
    # Without in-batch negatives, d[1] is a candidate of query 0 only.
    kw = dict(group_size=G, temperature=tau, in_batch_negatives=False)
    loss, gq, gd, _ = loss_and_grads(info_nce, q, d, false_negative_margin=0.1, **kw)

    assert torch.all(gd[1] == 0)  # no gradient reaches the dropped candidate
    far = d.clone()
    far[1] = -q[0] * 50  # exp(-50/0.05) underflows: the same as not being there
    loss_without, *_ = loss_and_grads(info_nce, q, far, false_negative_margin=0.1, **kw)
    torch.testing.assert_close(loss, loss_without, rtol=1e-6, atol=1e-6)
    unmasked, *_ = loss_and_grads(info_nce, q, d, **kw)
    assert unmasked > loss + 1.0


def test_positive_is_never_masked():
    B, G, H = 3, 2, 5
    q, d = unit_rows(B, H, seed=5), unit_rows(B * G, H, seed=6)
    # A margin so negative that every candidate, the positive included, exceeds p + m:
    # only the positive survives, so the loss is log(exp(p)/exp(p)) = 0 and finite.
    loss, gq, gd, _ = loss_and_grads(
        info_nce, q, d, group_size=G, false_negative_margin=-10.0, query_query=True, doc_doc=True
    )
    assert loss.item() == 0.0
    assert torch.all(gq == 0) and torch.all(gd == 0)


def test_candidate_scoring_exactly_like_the_positive_is_kept():
    # Small integers make every dot product exact, so the tie is a real tie in fp32.
    q = torch.tensor([[1.0, 0.0, 0.0]])
    d = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # The hard negative d[1] equals the positive: it does not *exceed* it, so it stays in Z.
    loss = info_nce(q, d, group_size=3, temperature=1.0, false_negative_margin=0.0)
    torch.testing.assert_close(loss, torch.tensor(math.log(2 + math.exp(-1))), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("query_query, doc_doc, margin", [(False, False, None), (True, True, 0.05)])
def test_query_offset_matches_reference_and_splits_the_global_loss(query_query, doc_doc, margin):
    num_groups, G, H, tau = 5, 3, 6, 0.05
    all_q, d = unit_rows(num_groups, H, seed=9), unit_rows(num_groups * G, H, seed=10)
    kw = dict(group_size=G, temperature=tau, query_query=query_query, doc_doc=doc_doc)

    # One "rank" holding queries 2..3 against the whole gathered pool.
    local_q = all_q[2:4]
    loss, gq, gd, _ = loss_and_grads(
        info_nce, local_q, d, false_negative_margin=margin, query_offset=2, all_queries=all_q, **kw
    )
    ref, ref_gq, ref_gd, _ = loss_and_grads(
        reference_info_nce, local_q, d, margin=margin, query_offset=2, all_queries=all_q, **kw
    )
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gq, ref_gq, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gd, ref_gd, rtol=1e-4, atol=1e-5)

    # Layout independence: the query-weighted mean of the shards' losses is the global loss.
    full = info_nce(all_q, d, false_negative_margin=margin, **kw)
    shards = [(0, 2), (2, 4), (4, 5)]
    sharded = sum(
        (end - start) * info_nce(all_q[start:end], d, false_negative_margin=margin,
                                 query_offset=start, all_queries=all_q, **kw)
        for start, end in shards
    ) / num_groups
    torch.testing.assert_close(sharded, full, rtol=1e-6, atol=1e-6)


def test_low_precision_inputs_use_fp32_math():
    B, G, H = 3, 2, 8
    q, d = unit_rows(B, H, seed=11).bfloat16(), unit_rows(B * G, H, seed=12).bfloat16()
    loss = info_nce(q, d, group_size=G)
    ref, _ = reference_info_nce(q.double(), d.double(), group_size=G, temperature=0.05)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(group_size=4), "do not split into groups"),
        (dict(group_size=3, temperature=0.0), "temperature"),
        (dict(group_size=3, query_offset=1), "do not have"),
        (dict(group_size=3, query_query=True, all_queries=torch.zeros(3, 5)), "all_queries"),
    ],
)
def test_info_nce_rejects_inconsistent_inputs(kwargs, message):
    q, d = torch.randn(2, 5), torch.randn(6, 5)
    with pytest.raises(LossInputError, match=message):
        info_nce(q, d, **kwargs)


def scores_and_grad(fn, scores, *args, **kw):
    scores = scores.clone().requires_grad_(True)
    loss = fn(scores, *args, **kw)
    (grad,) = torch.autograd.grad(loss, scores)
    return loss.detach(), grad


def random_scores(seed, shape=(4, 5)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


def test_listwise_ce_is_softmax_cross_entropy_on_column_zero():
    def by_hand(scores):
        per_row = [-(row[0] - torch.log(torch.exp(row).sum())) for row in scores]
        return sum(per_row) / len(per_row)

    scores = random_scores(0)
    loss, grad = scores_and_grad(listwise_ce, scores)
    ref, ref_grad = scores_and_grad(by_hand, scores)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_pointwise_bce_is_mean_binary_cross_entropy():
    def by_hand(scores, labels):
        total = 0.0
        for s, y in zip(scores.flatten(), labels.flatten()):
            p = 1 / (1 + torch.exp(-s))
            total = total - (y * torch.log(p) + (1 - y) * torch.log(1 - p))
        return total / scores.numel()

    scores = random_scores(1)
    labels = torch.zeros_like(scores)
    labels[:, 0] = 1
    labels[1, 3] = 0.5  # soft labels are allowed
    loss, grad = scores_and_grad(pointwise_bce, scores, labels)
    ref, ref_grad = scores_and_grad(by_hand, scores, labels)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distill_kl_is_batchmean_kl_times_t_squared(temperature):
    def by_hand(scores, teacher, temperature):
        total = 0.0
        for s_row, t_row in zip(scores, teacher):
            p_teacher = torch.softmax(t_row / temperature, dim=0)
            p_student = torch.softmax(s_row / temperature, dim=0)
            total = total + sum(pt * (torch.log(pt) - torch.log(ps)) for pt, ps in zip(p_teacher, p_student))
        return total / scores.shape[0] * temperature**2

    scores, teacher = random_scores(2), random_scores(3)
    loss, grad = scores_and_grad(distill_kl, scores, teacher, temperature=temperature)
    ref, ref_grad = scores_and_grad(by_hand, scores, teacher, temperature)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    # Identical distributions: zero divergence.
    assert distill_kl(teacher, teacher, temperature=temperature).abs().item() < 1e-6


def test_ranking_losses_reject_mismatched_shapes():
    with pytest.raises(LossInputError, match="labels"):
        pointwise_bce(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(LossInputError, match="teacher"):
        distill_kl(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(LossInputError, match=r"\(B, G\)"):
        listwise_ce(torch.zeros(6))
