"""Pairwise reranker losses (hinge, RankNet), embedding distillation and Matryoshka, against values
computed by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.config import TaskConfig
from engine.data.batch import EmbeddingBatch, PackedSequences
from engine.losses import LossInputError, info_nce, pairwise_hinge, ranknet


def test_pairwise_hinge_by_hand():
    scores = torch.tensor([[2.0, 1.5, -1.0], [0.0, 0.5, 0.2]])
    # margin 1: group 1: 1 - 0.5 = 0.5, 1 - 3 -> 0; group 2: 1 + 0.5 = 1.5, 1 + 0.2 = 1.2
    assert pairwise_hinge(scores, margin=1.0).item() == pytest.approx((0.5 + 0 + 1.5 + 1.2) / 4)
    assert pairwise_hinge(scores, margin=0.0).item() == pytest.approx((0 + 0 + 0.5 + 0.2) / 4)


def test_ranknet_by_hand_with_the_positive_first_and_with_graded_labels():
    scores = torch.tensor([[1.0, 0.0, 2.0]])
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    # Positive first: pairs (0, 1), (0, 2): log(1 + e^-(1-0)) and log(1 + e^-(1-2)).
    assert ranknet(scores).item() == pytest.approx((softplus(-1.0) + softplus(1.0)) / 2)
    # Graded: 2 > 1 > 0 on columns 2, 0, 1: pairs (2,0), (2,1), (0,1).
    labels = torch.tensor([[1.0, 0.0, 2.0]])
    expected = (softplus(-(2 - 1)) + softplus(-(2 - 0)) + softplus(-(1 - 0))) / 3
    assert ranknet(scores, labels).item() == pytest.approx(expected)


def test_ranknet_gradient_pushes_the_positive_up():
    scores = torch.zeros(2, 4, requires_grad=True)
    ranknet(scores).backward()
    assert (scores.grad[:, 0] < 0).all() and (scores.grad[:, 1:] > 0).all()


@pytest.mark.parametrize("loss", [pairwise_hinge, ranknet])
def test_pairwise_losses_need_a_negative(loss):
    with pytest.raises(LossInputError, match="G >= 2"):
        loss(torch.zeros(3, 1))


def _task(**task):
    from engine.tasks.embedding import EmbeddingTask

    return EmbeddingTask(torch.nn.Identity(), TaskConfig(**task))


def _batch(group_size: int, teacher=None) -> EmbeddingBatch:
    one = PackedSequences.from_token_lists([[1]])
    return EmbeddingBatch(queries=one, docs=one, group_size=group_size, teacher_scores=teacher)


def test_embedding_distillation_is_kl_from_the_teacher_over_each_querys_own_group():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 8), dim=-1)
    d = F.normalize(torch.randn(3 * 4, 8), dim=-1)
    teacher = torch.randn(3, 4)
    task = _task(loss="distill", temperature=0.05, distill_temperature=2.0)
    loss = task.loss_from_outputs([q, d], _batch(4, teacher))
    student = torch.stack([d[4 * i:4 * i + 4] @ q[i] for i in range(3)]) / 0.05 / 2.0
    target = F.softmax(teacher / 2.0, dim=-1)
    by_hand = (target * (target.log() - F.log_softmax(student, dim=-1))).sum(-1).mean() * 4.0
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    with pytest.raises(ValueError, match="needs teacher scores"):
        task.loss_from_outputs([q, d], _batch(4))


def test_matryoshka_adds_the_weighted_loss_of_each_renormalised_prefix():
    torch.manual_seed(1)
    q = F.normalize(torch.randn(4, 16), dim=-1)
    d = F.normalize(torch.randn(8, 16), dim=-1)
    task = _task(matryoshka_dims=[4, 8], matryoshka_weights=[0.5, 2.0])
    loss = task.loss_from_outputs([q, d], _batch(2))
    full = info_nce(q, d, group_size=2)
    prefix = lambda x, n: F.normalize(x[:, :n], dim=-1)  # noqa: E731
    expected = full + 0.5 * info_nce(prefix(q, 4), prefix(d, 4), group_size=2) \
        + 2.0 * info_nce(prefix(q, 8), prefix(d, 8), group_size=2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert _task().loss_from_outputs([q, d], _batch(2)).item() == pytest.approx(full.item(), rel=1e-6)
