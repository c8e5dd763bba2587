"""Training losses: InfoNCE for bi-encoders, listwise / pointwise / distillation losses for rerankers.

Pure functions on tensors, fp32 math whatever the input dtype. The tasks call them; the
distributed InfoNCE passes all-gathered documents (and queries) with `query_offset` so that
every rank computes the loss of its own queries against the global candidate pool.
docs/losses.md states every formula and default.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.kernels.infonce import candidate_lse, positive_scores


class LossInputError(ValueError):
    """Tensors handed to a loss have shapes or values that cannot mean what the caller intended."""


def info_nce(
    q: Tensor,
    d: Tensor,
    *,
    group_size: int,
    temperature: float = 0.05,
    in_batch_negatives: bool = True,
    false_negative_margin: float | None = None,
    query_query: bool = False,
    doc_doc: bool = False,
    query_offset: int = 0,
    all_queries: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""InfoNCE with hard negatives, in-batch negatives and the Qwen3-Embedding extra terms.

    q: (B, H) query embeddings. d: (N*G, H) documents in groups of G = group_size: group j is
    d[j*G:(j+1)*G], its positive first. Query i owns group g_i = query_offset + i, so with
    query_offset=0 and N == B this is the local batch; a distributed caller passes the
    all-gathered documents and the global index of q[0]'s group. Embeddings are used as given
    (normalise before calling when cosine similarity is wanted).

    With s(a, b) = a.b the raw similarity, p_i = s(q_i, d_{g_i,0}) the positive's similarity,
    tau = temperature and m = false_negative_margin, a candidate x of query i is kept iff
    keep_i(x) = [s(x) <= p_i + m] (always kept when m is None; the positive is never masked):

        Z_i = exp(p_i/tau)
            + sum_{k=1..G-1}          keep_i . exp(s(q_i, d_{g_i,k}) / tau)        hard negatives
            + [in_batch_negatives]
              sum_{j != g_i} sum_{k}  keep_i . exp(s(q_i, d_{j,k}) / tau)          other groups' docs
            + [query_query]
              sum_{j != g_i}          keep_i . exp(s(q_i, q_j) / tau)              other queries
            + [doc_doc]
              sum_{j != g_i}          keep_i . exp(s(d_{g_i,0}, d_{j,0}) / tau)    other positives vs d_i^+
        loss = mean_i ( log Z_i - p_i / tau )

    This is the improved contrastive loss of Qwen3-Embedding (Zhang et al., 2025, eq. 1-2),
    whose mask m_ij drops any extra term scoring above the positive plus a margin (0.1 there).
    query_query draws q_j from `all_queries` (one query per group of d, so row g_i is q_i)
    when given, else from q itself; pass all-gathered queries for a layout-independent loss.

    `backend` picks what computes the query-document term (kernels.infonce: "torch" = the
    chunked PyTorch path, "triton", "auto" = the module default set by set_infonce_backend,
    itself "auto" = Triton on CUDA, PyTorch elsewhere). Every backend gives the same loss.
    """
    _check_info_nce_inputs(q, d, group_size, temperature, query_offset, all_queries)
    num_queries = q.shape[0]
    q32, d32 = q.float(), d.float()
    rows = torch.arange(num_queries, device=q.device)
    own_group = query_offset + rows  # (B,) global group index of each query
    positive_col = own_group * group_size

    positive = positive_scores(q, d, positive_col)  # (B,)
    positive_logit = positive / temperature
    # The mask is a data decision, not part of the function being differentiated.
    threshold = None if false_negative_margin is None else (positive.detach() + false_negative_margin)[:, None]
    outside_pool = [positive_logit]  # (B,) log-sum-exps of the terms that are not query-document pairs

    if query_query:
        query_pool = q32 if all_queries is None else all_queries.float()
        self_col = rows if all_queries is None else own_group
        query_query_sim = q32 @ query_pool.T  # (B, B) or (B, N)
        block = _drop_self_and_false_negatives(query_query_sim, self_col, threshold)
        outside_pool.append(torch.logsumexp(block / temperature, dim=1))

    if doc_doc:
        positives = d32[::group_size]  # (N, H)
        doc_doc_sim = positives[own_group] @ positives.T  # (B, N)
        block = _drop_self_and_false_negatives(doc_doc_sim, own_group, threshold)
        outside_pool.append(torch.logsumexp(block / temperature, dim=1))

    # The query-document block is the big one (B x N*G): a kernel computes its log-sum-exp
    # without building it (engine/kernels/infonce). The positive and the small extra blocks join
    # inside that sum (extra_lse): a fully masked block gives -inf, an absent term; every
    # query then hands the kernel the same upstream gradient, 1/B, which keeps its
    # backward at three matrix products; and a query left with its positive alone gets
    # exactly zero loss, since the kernel leaves the positive out of its own terms.
    extra = outside_pool[0] if len(outside_pool) == 1 else torch.logsumexp(torch.stack(outside_pool), dim=0)
    lse = candidate_lse(
        q, d, positive_col, temperature=temperature, group_size=None if in_batch_negatives else group_size,
        false_negative_margin=false_negative_margin, exclude_positive=True, extra_lse=extra, backend=backend,
    )
    per_query = lse - positive_logit  # (B,)
    return per_query.mean()


def _below(similarity: Tensor, threshold: Tensor | None) -> Tensor:
    if threshold is None:
        return torch.ones_like(similarity, dtype=torch.bool)
    return similarity <= threshold


def _drop_self_and_false_negatives(similarity: Tensor, self_col: Tensor, threshold: Tensor | None) -> Tensor:
    with torch.no_grad():
        keep = _below(similarity, threshold)
        keep[torch.arange(similarity.shape[0], device=similarity.device), self_col] = False
    return similarity.masked_fill(~keep, float("-inf"))


def _check_info_nce_inputs(
    q: Tensor, d: Tensor, group_size: int, temperature: float, query_offset: int, all_queries: Tensor | None
) -> None:
    if q.dim() != 2 or d.dim() != 2 or q.shape[1] != d.shape[1]:
        raise LossInputError(
            f"info_nce: expected q (B, H) and d (N*G, H) with the same H, got {tuple(q.shape)} and {tuple(d.shape)}"
        )
    if group_size < 1 or d.shape[0] % group_size:
        raise LossInputError(f"info_nce: {d.shape[0]} documents do not split into groups of group_size={group_size}")
    if temperature <= 0:
        raise LossInputError(f"info_nce: temperature={temperature} must be > 0")
    num_groups = d.shape[0] // group_size
    if query_offset < 0 or query_offset + q.shape[0] > num_groups:
        raise LossInputError(
            f"info_nce: queries {query_offset}..{query_offset + q.shape[0] - 1} need groups that "
            f"{d.shape[0]} documents in groups of {group_size} ({num_groups} groups) do not have"
        )
    if all_queries is not None and (all_queries.dim() != 2 or all_queries.shape != (num_groups, q.shape[1])):
        raise LossInputError(
            f"info_nce: all_queries must hold one query per document group, shape ({num_groups}, {q.shape[1]}), "
            f"got {tuple(all_queries.shape)}"
        )


def listwise_ce(scores: Tensor) -> Tensor:
    """Softmax cross-entropy over each group with the positive in column 0; scores (B, G), mean over B."""
    _check_group_scores("listwise_ce", scores)
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores.float(), target)


def pointwise_bce(scores: Tensor, labels: Tensor) -> Tensor:
    """Binary cross-entropy on logits, mean over all B*G pairs; labels (B, G) in [0, 1]."""
    _check_group_scores("pointwise_bce", scores)
    if labels.shape != scores.shape:
        raise LossInputError(f"pointwise_bce: labels {tuple(labels.shape)} do not match scores {tuple(scores.shape)}")
    return F.binary_cross_entropy_with_logits(scores.float(), labels.float())


def distill_kl(scores: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(teacher/T) || softmax(scores/T)) summed over G, mean over B, times T^2."""
    _check_group_scores("distill_kl", scores)
    if teacher.shape != scores.shape:
        raise LossInputError(f"distill_kl: teacher {tuple(teacher.shape)} does not match scores {tuple(scores.shape)}")
    if temperature <= 0:
        raise LossInputError(f"distill_kl: temperature={temperature} must be > 0")
    student_log_probs = F.log_softmax(scores.float() / temperature, dim=-1)
    # The teacher is a fixed target; it must not pull on whatever produced it.
    teacher_log_probs = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    # Softened logits shrink the gradient by 1/T^2 (Hinton et al., 2015); scaling back keeps
    # the gradient size, and so the learning rate, independent of the temperature.
    return kl * temperature**2


def pairwise_hinge(scores: Tensor, margin: float = 1.0) -> Tensor:
    """max(0, margin - (s_pos - s_neg)) for every negative of each group (positive in column 0),
    mean over the B * (G-1) pairs."""
    _check_group_scores("pairwise_hinge", scores, pairs=True)
    scores = scores.float()
    return F.relu(margin - (scores[:, :1] - scores[:, 1:])).mean()


def ranknet(scores: Tensor, labels: Tensor | None = None) -> Tensor:
    """RankNet (Burges et al., 2005): log(1 + exp(-(s_i - s_j))) for every pair of a group whose
    label ranks i above j, mean over all such pairs of the batch. labels (B, G), higher = more
    relevant; None = the positive (column 0) above every negative."""
    _check_group_scores("ranknet", scores, pairs=True)
    if labels is None:
        labels = torch.zeros_like(scores, dtype=torch.float32)
        labels[:, 0] = 1
    if labels.shape != scores.shape:
        raise LossInputError(f"ranknet: labels {tuple(labels.shape)} do not match scores {tuple(scores.shape)}")
    labels = labels.float()
    ordered = labels[:, :, None] > labels[:, None, :]  # (B, G, G): i ranks above j
    if not ordered.any():
        raise LossInputError("ranknet: no group has two candidates with different labels")
    scores = scores.float()
    differences = scores[:, :, None] - scores[:, None, :]  # s_i - s_j
    return F.softplus(-differences[ordered]).mean()


def _check_group_scores(name: str, scores: Tensor, pairs: bool = False) -> None:
    if pairs and (scores.dim() != 2 or scores.shape[1] < 2):
        raise LossInputError(f"{name}: expected scores of shape (B, G) with G >= 2 (a positive and negatives), "
                             f"got {tuple(scores.shape)}")
    if scores.dim() != 2 or scores.shape[1] < 1:
        raise LossInputError(f"{name}: expected scores of shape (B, G), got {tuple(scores.shape)}")
