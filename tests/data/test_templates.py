"""Templates: embedding query/document formatting and the reranker presets."""
import pytest

from engine.config import TaskConfig
from engine.data.templates import (
    RerankerTemplate,
    TemplateError,
    format_document,
    format_pair,
    format_query,
    reranker_template,
)

# Qwen3-Reranker's model card, written out by hand (the reference, not the code's constants).
QWEN3_EXPECTED = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    "<Instruct>: Find it\n<Query>: what is x\n<Document>: x is y"
    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)


def test_query_template_with_config_instruction_and_example_prompt():
    task = TaskConfig(query_instruction="Retrieve", query_template="Instruct: {instruction}\nQuery:{query}")
    assert format_query(task, "what") == "Instruct: Retrieve\nQuery:what"
    assert format_query(task, "what", prompt="Own prompt") == "Instruct: Own prompt\nQuery:what"


def test_empty_instruction_gives_the_bare_query():
    task = TaskConfig(query_instruction="")
    assert format_query(task, "what") == "what"


def test_braces_in_text_and_template_stay_literal():
    task = TaskConfig(query_instruction="I {x}", query_template='{"q": "{query}"} {instruction}')
    assert format_query(task, "a {query} b") == '{"q": "a {query} b"} I {x}'


def test_document_template():
    assert format_document(TaskConfig(doc_template="passage: {document}"), "text") == "passage: text"
    with pytest.raises(TemplateError, match="task.doc_template='passage' has no {document} placeholder"):
        format_document(TaskConfig(doc_template="passage"), "text")


def test_qwen3_reranker_preset_is_the_official_template():
    task = TaskConfig(type="reranker", template="qwen3", instruction="Default")
    assert format_pair(task, "what is x", "x is y", prompt="Find it") == QWEN3_EXPECTED
    template = reranker_template(task)
    assert isinstance(template, RerankerTemplate)
    assert template.prefix + template.body + template.suffix == QWEN3_EXPECTED.replace(
        "Find it", "{instruction}").replace("what is x", "{query}").replace("x is y", "{document}")


def test_plain_and_custom_reranker_templates():
    plain = TaskConfig(type="reranker", template="plain", instruction="Judge")
    assert format_pair(plain, "q", "d") == "Judge\nQuery: q\nDocument: d"
    assert reranker_template(plain).prefix == reranker_template(plain).suffix == ""
    custom = TaskConfig(type="reranker", template="Q={query} D={document} ({instruction})", instruction="i")
    assert format_pair(custom, "q", "d") == "Q=q D=d (i)"
    with pytest.raises(TemplateError, match="has no {document} placeholder"):
        reranker_template(TaskConfig(type="reranker", template="Q={query}"))
