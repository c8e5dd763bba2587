"""Tasks against straightforward formulas: pooling, the yes/no head, the loss wiring."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.config import TaskConfig
from engine.data.batch import EmbeddingBatch, PackedSequences, RerankerBatch
from engine.losses import info_nce, listwise_ce
from engine.model.args import ModelArgs
from engine.model.transformer import Transformer
from engine.tasks import EmbeddingTask, RerankerTask
from engine.model.pooling import pool

SEQS = [[5, 9, 11, 2], [7, 3], [8, 8, 8, 8, 8, 1], [4]]


def tiny_backbone(seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                 num_layers=2, num_heads=4, num_kv_heads=2, tie_word_embeddings=False))


def per_sequence_hidden(backbone, seqs):
    """Each sequence run alone: the reference for what packing must give."""
    return [backbone(torch.tensor([s]))[0] for s in seqs]


@pytest.mark.parametrize("mode", ["last", "mean", "cls"])
def test_pooling_of_packed_sequences_matches_each_sequence_alone(mode):
    backbone = tiny_backbone()
    packed = PackedSequences.from_token_lists(SEQS)
    hidden = backbone(packed.input_ids, position_ids=packed.position_ids, cu_seqlens=packed.cu_seqlens)
    got = pool(hidden, packed.cu_seqlens, mode)
    alone = per_sequence_hidden(backbone, SEQS)
    expected = torch.stack([
        h[-1] if mode == "last" else h[0] if mode == "cls" else h.mean(0) for h in alone
    ])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_embedding_task_loss_is_info_nce_of_normalised_pooled_states():
    backbone = tiny_backbone()
    cfg = TaskConfig(type="embedding", pooling="mean", temperature=0.1)
    task = EmbeddingTask(backbone, cfg)
    queries = PackedSequences.from_token_lists(SEQS[:2])
    doc_seqs = [SEQS[2], SEQS[3], SEQS[1], SEQS[0]]
    docs = PackedSequences.from_token_lists(doc_seqs)
    batch = EmbeddingBatch(queries=queries, docs=docs, group_size=2)
    loss = task(batch)
    q = F.normalize(torch.stack([h.mean(0) for h in per_sequence_hidden(backbone, SEQS[:2])]), dim=-1)
    d = F.normalize(torch.stack([h.mean(0) for h in per_sequence_hidden(backbone, doc_seqs)]), dim=-1)
    torch.testing.assert_close(loss, info_nce(q, d, group_size=2, temperature=0.1), rtol=1e-5, atol=1e-6)


def test_yes_no_score_equals_the_full_logit_difference_and_trains_only_two_rows():
    backbone = tiny_backbone()
    task = RerankerTask(backbone, TaskConfig(type="reranker", head="yes_no"), yes_no_ids=(10, 20))
    packed = PackedSequences.from_token_lists(SEQS)
    scores = task.encode_tower(packed)
    full = [backbone.logits(h)[-1] for h in per_sequence_hidden(backbone, SEQS)]
    torch.testing.assert_close(scores, torch.stack([f[10] - f[20] for f in full]), rtol=1e-5, atol=1e-5)
    batch = RerankerBatch(pairs=packed, group_size=2)
    task(batch).backward()
    touched = backbone.lm_head.weight.grad.abs().sum(1).nonzero().flatten().tolist()
    assert touched == [10, 20]
    torch.testing.assert_close(task(batch), listwise_ce(scores.view(2, 2)))


def test_linear_head_scores_the_last_token():
    backbone = tiny_backbone()
    task = RerankerTask(backbone, TaskConfig(type="reranker", head="linear", loss="bce"))
    packed = PackedSequences.from_token_lists(SEQS)
    expected = torch.stack([task.score(h[-1]).squeeze() for h in per_sequence_hidden(backbone, SEQS)])
    scores = task.encode_tower(packed)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    # Under FSDP a view leaving encode_tower would skip the pre-backward hook if used in place.
    assert not scores._is_view()
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = task(RerankerBatch(pairs=packed, group_size=2, labels=labels))
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(expected.view(2, 2), labels))


def test_distill_without_teacher_scores_is_a_clear_error():
    task = RerankerTask(tiny_backbone(), TaskConfig(type="reranker", loss="distill"), yes_no_ids=(1, 2))
    with pytest.raises(ValueError, match="teacher scores"):
        task(RerankerBatch(pairs=PackedSequences.from_token_lists(SEQS), group_size=2))


@pytest.mark.parametrize("task_type", ["embedding", "reranker"])
def test_both_tasks_meet_the_task_contract(task_type):
    """Schedules, evaluation and FSDP meet tasks only through engine.tasks.protocol.Task."""
    from engine.tasks import build_task
    from engine.tasks.protocol import Task

    task = build_task(tiny_backbone(), TaskConfig(type=task_type, head="linear"))
    assert isinstance(task, Task)
    assert task.dp_group is None  # one process: no data-parallel group
