"""Tokenization: templates tokenized as one string, truncation never cuts the prefix, suffix or EOS.

The reference is the tokenizer itself on the hand-built full string: what inference code
(Qwen3-Reranker's model card, sentence-transformers) would feed the model.
"""
import random

import pytest
from tokenizers import processors

from engine.config import DataConfig, TaskConfig
from engine.data.byte_tokenizer import byte_tokenizer
from engine.data.templates import QWEN3_RERANKER_PREFIX, QWEN3_RERANKER_SUFFIX, TemplateError
from engine.data.tokenize import TextEncoder

TOKENIZER = byte_tokenizer()
EOS = TOKENIZER.eos_token_id


def ids(text):
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


def reranker(max_len=1024, template="qwen3", instruction="Judge"):
    return TextEncoder(TOKENIZER, TaskConfig(type="reranker", template=template, instruction=instruction),
                       DataConfig(max_len=max_len))


def embedder(query_max_len=128, doc_max_len=512, **task):
    task = TaskConfig(type="embedding", **task)
    return TextEncoder(TOKENIZER, task, DataConfig(query_max_len=query_max_len, doc_max_len=doc_max_len))


def body(query, document, instruction="Judge"):
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


def test_short_pair_is_the_full_string_tokenized():
    (seq,) = reranker().pairs(["what is x"], ["x is y"])
    assert seq == ids(QWEN3_RERANKER_PREFIX + body("what is x", "x is y") + QWEN3_RERANKER_SUFFIX)


def test_long_document_is_cut_and_suffix_kept():
    max_len = 300
    document = "doc text " * 200
    (seq,) = reranker(max_len).pairs(["what is x"], [document])
    assert len(seq) == max_len  # byte tokens: the cut leaves exactly the budget
    suffix = ids(QWEN3_RERANKER_SUFFIX)
    assert seq[-len(suffix):] == suffix
    fixed = len(ids(QWEN3_RERANKER_PREFIX + body("what is x", "") + QWEN3_RERANKER_SUFFIX))
    kept = document[: max_len - fixed]
    assert seq == ids(QWEN3_RERANKER_PREFIX + body("what is x", kept) + QWEN3_RERANKER_SUFFIX)


def test_document_goes_first_then_the_query():
    max_len = 260
    query, document = "q" * 500, "d" * 500
    (seq,) = reranker(max_len).pairs([query], [document])
    fixed = len(ids(QWEN3_RERANKER_PREFIX + body("", "") + QWEN3_RERANKER_SUFFIX))
    expected = QWEN3_RERANKER_PREFIX + body(query[: max_len - fixed], "") + QWEN3_RERANKER_SUFFIX
    assert seq == ids(expected)


def test_per_example_prompt_replaces_the_instruction():
    (seq,) = reranker().pairs(["q"], ["d"], prompts=["Own"])
    assert seq == ids(QWEN3_RERANKER_PREFIX + body("q", "d", instruction="Own") + QWEN3_RERANKER_SUFFIX)


@pytest.mark.parametrize("seed", range(5))
def test_random_lengths_keep_every_invariant(seed):
    """Whatever the lengths: fits, suffix whole, query and document are prefixes of the
    originals, the query is only cut once the document is gone, and nothing is cut needlessly."""
    rng = random.Random(seed)
    max_len = rng.randint(230, 400)  # the template alone takes 216 tokens
    encoder = reranker(max_len)
    suffix = ids(QWEN3_RERANKER_SUFFIX)
    words = ["alpha", "yes", "no", "b", "élan", "know", "\n", "  "]
    for _ in range(20):
        query = " ".join(rng.choice(words) for _ in range(rng.randint(1, 80)))
        document = " ".join(rng.choice(words) for _ in range(rng.randint(1, 120)))
        (seq,) = encoder.pairs([query], [document])
        assert len(seq) <= max_len and seq[-len(suffix):] == suffix
        text = TOKENIZER.decode(seq)
        inner = text[len(QWEN3_RERANKER_PREFIX) : len(text) - len(QWEN3_RERANKER_SUFFIX)]
        kept_query, kept_document = inner.removeprefix("<Instruct>: Judge\n<Query>: ").split("\n<Document>: ")
        assert query.startswith(kept_query) and document.startswith(kept_document)
        if kept_query != query:
            assert kept_document == ""
        full = len(ids(QWEN3_RERANKER_PREFIX + body(query, document) + QWEN3_RERANKER_SUFFIX))
        if full <= max_len:
            assert (kept_query, kept_document) == (query, document)
        else:
            assert len(seq) >= max_len - 3  # a multi-byte character may not fit whole


def test_template_seams_tokenize_as_one_string():
    # "ye" + "s": the byte tokenizer merges "yes" across the template/document seam, as
    # tokenizing the whole string does; cutting the document keeps that seam token.
    encoder = reranker(template="{instruction} {query} ye{document}", instruction="i", max_len=40)
    (short,) = encoder.pairs(["q"], ["s and more"])
    assert short == ids("i q yes and more")
    (cut,) = encoder.pairs(["q"], ["s" + " x" * 100])
    assert cut == ids("i q yes" + " x" * 100)[:40]  # byte-level: the token slice is the reference


def test_prefix_and_suffix_too_long_for_max_len():
    with pytest.raises(TemplateError, match="data.max_len=100 leaves no room for the query and document"):
        reranker(max_len=100)


def test_query_truncation_keeps_eos_last():
    encoder = embedder(query_max_len=40, query_instruction="Find")
    query = "word " * 50
    (seq,) = encoder.queries([query])
    assert len(seq) == 40 and seq[-1] == EOS
    prefix = "Instruct: Find\nQuery:"
    assert seq == ids(prefix + query[: 39 - len(ids(prefix))]) + [EOS]


def test_document_truncation_keeps_eos_last_and_short_texts_are_whole():
    encoder = embedder(doc_max_len=16, doc_template="passage: {document}")
    long, short = encoder.documents(["0123456789" * 5, "hi"])
    assert long == ids("passage: 012345") + [EOS]
    assert short == ids("passage: hi") + [EOS]


def test_queries_with_prompts_and_without_instruction():
    encoder = embedder(query_instruction="Find")
    a, b = encoder.queries(["q", "q"], prompts=[None, "Own"])
    assert a == ids("Instruct: Find\nQuery:q") + [EOS]
    assert b == ids("Instruct: Own\nQuery:q") + [EOS]
    (bare,) = embedder(query_instruction="").queries(["q"])
    assert bare == ids("q") + [EOS]


def test_no_eos_when_append_eos_is_off():
    (seq,) = embedder(doc_max_len=8, append_eos=False).documents(["abcdefghijkl"])
    assert seq == ids("abcdefgh")


def test_bos_is_added_only_when_the_tokenizer_adds_one():
    tokenizer = byte_tokenizer()
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bos)]
    )
    encoder = TextEncoder(tokenizer, TaskConfig(doc_template="{document}"), DataConfig(doc_max_len=6))
    (seq,) = encoder.documents(["abcdefgh"])
    assert seq == [bos] + ids("abcd") + [EOS]
    (plain,) = embedder(doc_max_len=6).documents(["abcdefgh"])
    assert plain == ids("abcde") + [EOS]


def test_yes_no_token_ids():
    encoder = reranker()
    assert encoder.yes_no_token_ids() == (TOKENIZER.convert_tokens_to_ids("yes"), TOKENIZER.convert_tokens_to_ids("no"))
    bad = TextEncoder(TOKENIZER, TaskConfig(type="reranker", yes_token="maybe"), DataConfig())
    with pytest.raises(ValueError, match="task.yes_token='maybe' is not a single token"):
        bad.yes_no_token_ids()


def test_instruction_longer_than_the_budget_is_hard_cut_with_one_warning():
    warnings = []
    task = TaskConfig(query_instruction="x" * 100)
    encoder = TextEncoder(TOKENIZER, task, DataConfig(query_max_len=20), warn=warnings.append)
    seqs = encoder.queries(["q", "r"])
    assert all(len(s) == 20 and s[-1] == EOS for s in seqs)
    assert seqs[0] == ids("Instruct: " + "x" * 9) + [EOS]
    assert len(warnings) == 2 and "query was cut to nothing" in warnings[0] and "instruction" in warnings[1]
    encoder.queries(["q"])
    assert len(warnings) == 2  # each kind of warning once per encoder


def test_a_huge_document_is_cheap_and_exact():
    (seq,) = embedder(doc_max_len=64).documents(["z" * 5_000_000])
    assert seq == ids("z" * 63) + [EOS]
