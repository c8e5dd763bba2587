"""Text templates: how a query, a document, or a (query, document) pair becomes model input.

Embedding: `task.query_template` with {instruction} and {query} (Qwen3-Embedding style
"Instruct: ...\\nQuery:..."), `task.doc_template` with {document}.
Reranker: a `RerankerTemplate` of prefix + body + suffix. "qwen3" is Qwen3-Reranker's exact
chat template, "plain" a bare one, any other string a custom body. The tokenizer keeps the
prefix and suffix whole and truncates only inside the body (see tokenize.py), which is why
the three parts are kept apart here.

Placeholders are filled in one pass with a regex, not str.format: braces in templates
(JSON examples) or in the filled-in text ("{query}" inside a query) stay literal.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

PLACEHOLDER = re.compile(r"\{(instruction|query|document)\}")

QWEN3_RERANKER_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
QWEN3_RERANKER_BODY = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
QWEN3_RERANKER_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
PLAIN_RERANKER_BODY = "{instruction}\nQuery: {query}\nDocument: {document}"


class TemplateError(ValueError):
    """A template that cannot hold what it must (one line, names the config key)."""


@dataclass(frozen=True)
class RerankerTemplate:
    prefix: str  # tokenized on its own and never truncated
    body: str  # holds {instruction}, {query}, {document}; the only part truncation touches
    suffix: str  # tokenized on its own and never truncated: the score is read after it

    def format(self, instruction: str, query: str, document: str) -> str:
        """The whole input as one string (what inference code without truncation builds)."""
        return self.prefix + fill(self.body, instruction=instruction, query=query, document=document) + self.suffix


def fill(template: str, **values: str) -> str:
    """Replace {instruction}/{query}/{document} in one pass; other braces stay as they are."""
    return PLACEHOLDER.sub(lambda match: values.get(match.group(1), match.group(0)), template)


def require_placeholders(template: str, names: tuple[str, ...], key: str) -> None:
    missing = [name for name in names if "{" + name + "}" not in template]
    if missing:
        raise TemplateError(f"{key}={template!r} has no {', '.join('{' + n + '}' for n in missing)} placeholder")


def query_instruction(task_cfg, prompt: str | None = None) -> str:
    """The example's own prompt when it has one, else the configured instruction."""
    return prompt or task_cfg.query_instruction


def format_query(task_cfg, query: str, prompt: str | None = None) -> str:
    """The templated query; with an empty instruction, the bare query (no dangling "Instruct: ")."""
    instruction = query_instruction(task_cfg, prompt)
    if not instruction:
        return query
    require_placeholders(task_cfg.query_template, ("query",), "task.query_template")
    return fill(task_cfg.query_template, instruction=instruction, query=query)


def format_document(task_cfg, doc: str) -> str:
    require_placeholders(task_cfg.doc_template, ("document",), "task.doc_template")
    return fill(task_cfg.doc_template, document=doc)


def reranker_template(task_cfg) -> RerankerTemplate:
    """The preset named by task.template ("qwen3", "plain"), or task.template itself as a body."""
    if task_cfg.template == "qwen3":
        return RerankerTemplate(QWEN3_RERANKER_PREFIX, QWEN3_RERANKER_BODY, QWEN3_RERANKER_SUFFIX)
    if task_cfg.template == "plain":
        return RerankerTemplate("", PLAIN_RERANKER_BODY, "")
    require_placeholders(task_cfg.template, ("query", "document"), "task.template")
    return RerankerTemplate("", task_cfg.template, "")


def reranker_instruction(task_cfg, prompt: str | None = None) -> str:
    return prompt or task_cfg.instruction


def format_pair(task_cfg, query: str, document: str, prompt: str | None = None) -> str:
    """A reranker input as one untruncated string (evaluation tools and tests compare with it)."""
    return reranker_template(task_cfg).format(reranker_instruction(task_cfg, prompt), query, document)
