"""Collator: group layout (positive first), labels, teacher scores, packing, determinism."""
import itertools

import pytest
import torch

from engine.config import DataConfig, TaskConfig
from engine.data.batch import EmbeddingBatch, PackedSequences, RerankerBatch
from engine.data.byte_tokenizer import byte_tokenizer
from engine.data.collate import Collator, embed_texts_batches, pair_batches
from engine.data.example import Example
from engine.data.formats import DataError
from engine.data.templates import format_document, format_pair, format_query
from engine.data.tokenize import TextEncoder

TOKENIZER = byte_tokenizer()
EOS = TOKENIZER.eos_token_id


def ids(text):
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


def examples(n=4, negatives=5, scores=False):
    out = []
    for i in range(n):
        ex = Example(f"query {i}", [f"pos {i}a", f"pos {i}b"], [f"neg {i}.{k}" for k in range(negatives)], line=i + 1)
        if scores:
            ex.pos_scores = [10.0 + i, 20.0 + i]
            ex.neg_scores = [float(-k - i / 10) for k in range(negatives)]
        out.append(ex)
    return out


def collator(kind="embedding", num_negatives=2, warn=print, **task):
    task = TaskConfig(type=kind, num_negatives=num_negatives, **task)
    encoder = TextEncoder(TOKENIZER, task, DataConfig(), warn=warn)
    return Collator(encoder, task, seed=0, warn=warn), task


def sequences(packed: PackedSequences) -> list[list[int]]:
    cu = packed.cu_seqlens.tolist()
    return [packed.input_ids[a:b].tolist() for a, b in itertools.pairwise(cu)]


def check_packing(packed: PackedSequences, expected: list[list[int]]):
    lengths = [len(s) for s in expected]
    assert packed.cu_seqlens.tolist() == [sum(lengths[:k]) for k in range(len(lengths) + 1)]
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.input_ids.tolist() == [t for s in expected for t in s]
    assert packed.position_ids.tolist() == [p for n in lengths for p in range(n)]
    assert packed.max_seqlen == max(lengths)


def test_embedding_groups_positive_first_then_the_examples_own_negatives():
    collate, task = collator(num_negatives=2)
    batch = collate(examples(), step=3)
    assert isinstance(batch, EmbeddingBatch) and batch.group_size == 3
    check_packing(batch.queries, [ids(format_query(task, f"query {i}")) + [EOS] for i in range(4)])
    docs = [TOKENIZER.decode(s[:-1]) for s in sequences(batch.docs)]
    assert all(s[-1] == EOS for s in sequences(batch.docs))
    for i in range(4):
        group = docs[i * 3 : (i + 1) * 3]
        assert group[0] in (format_document(task, f"pos {i}a"), format_document(task, f"pos {i}b"))
        assert len(set(group[1:])) == 2
        assert all(d in [format_document(task, f"neg {i}.{k}") for k in range(5)] for d in group[1:])
    check_packing(batch.docs, sequences(batch.docs))


def test_collation_is_deterministic_and_changes_with_the_step():
    collate, _ = collator(num_negatives=2)
    first = sequences(collate(examples(), step=3).docs)
    assert first == sequences(collate(examples(), step=3).docs)
    assert first != sequences(collate(examples(), step=4).docs)


def test_micro_batches_with_offsets_equal_the_whole_batch():
    collate, _ = collator(num_negatives=2)
    data = examples()
    whole = sequences(collate(data, step=7).docs)
    halves = sequences(collate(data[:2], step=7).docs) + sequences(collate(data[2:], step=7, first_position=2).docs)
    assert halves == whole


def test_reranker_pairs_labels_and_teacher_scores():
    collate, task = collator("reranker", num_negatives=3, instruction="Judge")
    data = examples(n=3, scores=True)
    batch = collate(data, step=0)
    assert isinstance(batch, RerankerBatch) and batch.group_size == 4 and batch.num_queries == 3
    assert batch.labels.tolist() == [[1.0, 0.0, 0.0, 0.0]] * 3
    pairs = [TOKENIZER.decode(s) for s in sequences(batch.pairs)]
    for i, ex in enumerate(data):
        texts = [ex.positives[0], ex.positives[1]] + ex.negatives
        scores = ex.pos_scores + ex.neg_scores
        by_pair = {format_pair(task, ex.query, t): s for t, s in zip(texts, scores)}
        group = pairs[i * 4 : (i + 1) * 4]
        assert all(p in by_pair for p in group)
        assert group[0] in (format_pair(task, ex.query, ex.positives[0]), format_pair(task, ex.query, ex.positives[1]))
        assert batch.teacher_scores[i].tolist() == pytest.approx([by_pair[p] for p in group])
    assert batch.teacher_scores.shape == (3, 4) and batch.teacher_scores.dtype == torch.float32


def test_teacher_scores_are_none_unless_every_example_has_them():
    collate, _ = collator("reranker", num_negatives=1)
    data = examples(n=2, scores=True)
    data[1].neg_scores = None
    assert collate(data, step=0).teacher_scores is None


def test_examples_without_negatives_borrow_other_positives_and_warn_once():
    warnings = []
    collate, task = collator(num_negatives=2, warn=warnings.append)
    data = examples(n=3, negatives=0)
    for ex in data:
        ex.positives = ex.positives[:1]
    docs = [TOKENIZER.decode(s[:-1]) for s in sequences(collate(data, step=0).docs)]
    for i in range(3):
        others = [format_document(task, data[j].positives[0]) for j in range(3) if j != i]
        assert docs[i * 3] == format_document(task, data[i].positives[0])
        assert sorted(docs[i * 3 + 1 : i * 3 + 3]) == sorted(others)
    collate(data, step=1)
    assert len(warnings) == 1 and "no negatives" in warnings[0]


def test_one_example_without_negatives_cannot_borrow():
    collate, _ = collator(num_negatives=1, warn=lambda m: None)
    with pytest.raises(DataError, match="line 1: the example has no negatives"):
        collate(examples(n=1, negatives=0), step=0)


def test_no_negatives_configured_gives_groups_of_one():
    collate, _ = collator("reranker", num_negatives=0)
    batch = collate(examples(n=2, scores=True), step=0)
    assert batch.group_size == 1 and batch.pairs.num_seqs == 2 and batch.teacher_scores.shape == (2, 1)


def test_long_documents_in_a_batch_keep_the_suffix():
    collate, task = collator("reranker", num_negatives=1)
    data = [Example("q", ["p" * 5000], ["n" * 5000])]
    suffix = ids("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    for seq in sequences(collate(data, step=0).pairs):
        assert len(seq) == DataConfig().max_len and seq[-len(suffix):] == suffix


def test_evaluation_batches_keep_order_and_size():
    task = TaskConfig(type="embedding")
    encoder = TextEncoder(TOKENIZER, task, DataConfig())
    texts = [f"text number {i}" for i in range(7)]
    batches = list(embed_texts_batches(encoder, texts, is_query=False, batch_size=3))
    assert [b.num_seqs for b in batches] == [3, 3, 1]
    assert [s for b in batches for s in sequences(b)] == encoder.documents(texts)
    query_batches = list(embed_texts_batches(encoder, texts, is_query=True, batch_size=4, prompts=["P"] * 7))
    assert [s for b in query_batches for s in sequences(b)] == encoder.queries(texts, ["P"] * 7)

    rtask = TaskConfig(type="reranker")
    rencoder = TextEncoder(TOKENIZER, rtask, DataConfig())
    docs = [f"doc {i}" for i in range(5)]
    pair_seqs = [s for b in pair_batches(rencoder, ["q"] * 5, docs, batch_size=2) for s in sequences(b)]
    assert [TOKENIZER.decode(s) for s in pair_seqs] == [format_pair(rtask, "q", d) for d in docs]
