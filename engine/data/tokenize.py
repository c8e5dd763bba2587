"""Texts -> token ids, templated and truncated so that the tokens a score depends on survive.

Rules (docs/data.md has the long form):
- Only the user's text is ever cut: the document first, then the query. The reranker's
  prefix and suffix (whose last position is where yes/no is read) and the embedding EOS
  (which `last` pooling reads) are never cut: the EOS is appended after truncation.
- A template is tokenized as one string, as inference code tokenizes it, so tokens at the
  seams ("<Query>: " + query) are the ones the model will see at inference. Truncation
  therefore cuts the *text* of the query/document at a token start (found with the fast
  tokenizer's offsets) and re-tokenizes, until the whole fits.
- No special tokens from the tokenizer (add_special_tokens=False); a BOS is put first only
  when the tokenizer itself adds one by default (Llama 3, Mistral), because those models
  never saw text without it. EOS is added here, by task.append_eos, for embeddings.
"""
from __future__ import annotations

from typing import Callable

from engine.data.templates import (
    PLACEHOLDER,
    TemplateError,
    fill,
    query_instruction,
    require_placeholders,
    reranker_instruction,
    reranker_template,
)

# Texts longer than this many characters per allowed token are cut before tokenizing, so a
# 10 MB document costs what its first part costs. No common tokenizer averages 64 chars per
# token; where text does (long runs of one symbol), less than the budget is kept, never more.
MAX_CHARS_PER_TOKEN = 64

Values = dict[str, str]


class TextEncoder:
    """Tokenizes queries, documents and (query, document) pairs for one task configuration."""

    def __init__(self, tokenizer, task_cfg, data_cfg, warn: Callable[[str], None] = print):
        self.tokenizer = tokenizer
        self.task = task_cfg
        self.data = data_cfg
        self.warn = warn
        self._warned: set[str] = set()
        if not getattr(tokenizer, "is_fast", False):
            raise TemplateError(
                "a fast (Rust) tokenizer is needed for safe truncation; load it with AutoTokenizer (use_fast=True)"
            )
        self.lead_ids = implicit_bos(tokenizer)
        require_placeholders(task_cfg.query_template, ("query",), "task.query_template")
        require_placeholders(task_cfg.doc_template, ("document",), "task.doc_template")
        self.eos_id = self._eos_id() if task_cfg.type == "embedding" and task_cfg.append_eos else None
        if task_cfg.type == "reranker":
            self.template = reranker_template(task_cfg)
            self.prefix_ids = self.lead_ids + self._ids(self.template.prefix)
            self.suffix_ids = self._ids(self.template.suffix)
            self.body_budget = data_cfg.max_len - len(self.prefix_ids) - len(self.suffix_ids)
            if self.body_budget < 1:
                raise TemplateError(
                    f"data.max_len={data_cfg.max_len} leaves no room for the query and document: the "
                    f"task.template={task_cfg.template!r} prefix and suffix alone take "
                    f"{len(self.prefix_ids) + len(self.suffix_ids)} tokens"
                )

    # ---- embedding ---------------------------------------------------------------------

    def queries(self, texts: list[str], prompts: list[str | None] | None = None) -> list[list[int]]:
        """Templated queries, each at most data.query_max_len tokens (EOS included)."""
        prompts = prompts if prompts is not None else [None] * len(texts)
        templates, values = [], []
        for text, prompt in zip(texts, prompts, strict=True):
            instruction = query_instruction(self.task, prompt)
            # An empty instruction means the bare query, not "Instruct: \nQuery:...".
            templates.append(self.task.query_template if instruction else "{query}")
            values.append({"instruction": instruction, "query": text})
        return self._embedding_ids(templates, values, ("query",), self.data.query_max_len)

    def documents(self, texts: list[str]) -> list[list[int]]:
        """Templated documents, each at most data.doc_max_len tokens (EOS included)."""
        templates = [self.task.doc_template] * len(texts)
        values = [{"document": text} for text in texts]
        return self._embedding_ids(templates, values, ("document",), self.data.doc_max_len)

    def _embedding_ids(self, templates, values, cut_order, max_len) -> list[list[int]]:
        eos = [] if self.eos_id is None else [self.eos_id]
        budget = max_len - len(self.lead_ids) - len(eos)
        if budget < 0:
            raise TemplateError(f"max length {max_len} cannot hold the BOS/EOS tokens the model needs")
        bodies = self._fit(templates, values, cut_order, budget)
        return [self.lead_ids + body + eos for body in bodies]

    # ---- reranker ----------------------------------------------------------------------

    def pairs(
        self, queries: list[str], documents: list[str], prompts: list[str | None] | None = None
    ) -> list[list[int]]:
        """prefix + body(instruction, query, document) + suffix, at most data.max_len tokens;
        the body loses document tokens first, then query tokens."""
        if self.task.type != "reranker":
            raise TemplateError(f"pairs() is for task.type=reranker, not {self.task.type}")
        prompts = prompts if prompts is not None else [None] * len(queries)
        values = [
            {"instruction": reranker_instruction(self.task, prompt), "query": query, "document": document}
            for query, document, prompt in zip(queries, documents, prompts, strict=True)
        ]
        templates = [self.template.body] * len(values)
        bodies = self._fit(templates, values, ("document", "query"), self.body_budget)
        return [self.prefix_ids + body + self.suffix_ids for body in bodies]

    def yes_no_token_ids(self) -> tuple[int, int]:
        return yes_no_token_ids(self.tokenizer, self.task)

    # ---- truncation --------------------------------------------------------------------

    def _fit(self, templates: list[str], values: list[Values], cut_order, budget: int) -> list[list[int]]:
        """Token ids of each filled template, at most `budget` each, cutting only the values
        named in cut_order (in that order), from their end."""
        values = [_precut(v, cut_order, budget) for v in values]
        ids = self._batch_ids([fill(t, **v) for t, v in zip(templates, values)])
        pending = [i for i, seq in enumerate(ids) if len(seq) > budget]
        # Each round shortens every pending text by its measured overshoot; seams that
        # tokenize differently after a cut are caught by the next round. Every round cuts at
        # least one token of text, so the loop ends.
        while pending:
            rendered = [_render(templates[i], values[i]) for i in pending]
            encoded = self.tokenizer(
                [text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True
            )
            still_long = []
            for i, (_, spans), seq, offsets in zip(
                pending, rendered, encoded["input_ids"], encoded["offset_mapping"]
            ):
                if len(seq) <= budget:
                    ids[i] = seq
                    continue
                shorter = _cut_values(values[i], spans, offsets, len(seq) - budget, cut_order)
                if shorter is None:
                    ids[i] = seq[:budget]
                    self._warn_once(
                        "hard cut",
                        f"an instruction and template alone exceed the {budget} tokens left for them; cut at "
                        "the token limit (prefix, suffix and EOS kept). Raise the max length or shorten the prompt.",
                    )
                    continue
                emptied = [name for name in cut_order if values[i].get(name) and not shorter.get(name)]
                if emptied:
                    self._warn_once(
                        "emptied",
                        f"a {emptied[0]} was cut to nothing to fit {budget} tokens; raise the max length "
                        "(data.query_max_len / doc_max_len / max_len)",
                    )
                values[i] = shorter
                still_long.append(i)
            pending = still_long
        return ids

    def _warn_once(self, kind: str, message: str) -> None:
        # Once per kind: a run would otherwise print the same line for every batch.
        if kind not in self._warned:
            self._warned.add(kind)
            self.warn(message)

    def _batch_ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(seq) for seq in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _eos_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise TemplateError("task.append_eos=true but the tokenizer has no EOS token (set task.append_eos=false)")
        return int(eos)


def yes_no_token_ids(tokenizer, task_cfg) -> tuple[int, int]:
    """Vocabulary ids of task.yes_token and task.no_token (the reranker's two logits)."""
    return (token_id(tokenizer, task_cfg.yes_token, "task.yes_token"),
            token_id(tokenizer, task_cfg.no_token, "task.no_token"))


def token_id(tokenizer, token: str, key: str) -> int:
    """The id of `token` as one vocabulary entry, or a TemplateError naming the config key."""
    found = tokenizer.convert_tokens_to_ids(token)
    is_unknown = found is None or (found == tokenizer.unk_token_id and token != tokenizer.unk_token)
    if is_unknown or isinstance(found, list):
        raise TemplateError(f"{key}={token!r} is not a single token of the tokenizer's vocabulary")
    return int(found)


def implicit_bos(tokenizer) -> list[int]:
    """[bos] when the tokenizer puts BOS in front of text by default, else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [int(bos)] if probe and probe[0] == bos else []


def _precut(values: Values, cut_order, budget: int) -> Values:
    limit = max(budget, 1) * MAX_CHARS_PER_TOKEN
    if all(len(values.get(name, "")) <= limit for name in cut_order):
        return values
    return {k: (v[:limit] if k in cut_order else v) for k, v in values.items()}


def _render(template: str, values: Values) -> tuple[str, dict[str, tuple[int, int]]]:
    """The filled template and the character span of the first occurrence of each value."""
    parts, spans, position, cursor = [], {}, 0, 0
    for match in PLACEHOLDER.finditer(template):
        literal = template[cursor : match.start()]
        parts.append(literal)
        position += len(literal)
        name = match.group(1)
        value = values.get(name, match.group(0))
        spans.setdefault(name, (position, position + len(value)))
        parts.append(value)
        position += len(value)
        cursor = match.end()
    parts.append(template[cursor:])
    return "".join(parts), spans


def _cut_values(values: Values, spans, offsets, excess: int, cut_order) -> Values | None:
    """`values` with the first non-empty value of cut_order shortened by about `excess`
    tokens (cut at a token start), or None when nothing cuttable is left."""
    for name in cut_order:
        text = values.get(name, "")
        if not text or name not in spans:
            continue
        start, end = spans[name]
        # Zero-width offsets belong to no character (some special tokens); skip them.
        token_starts = [s - start for s, e in offsets if start <= s < end and e > s]
        keep = len(token_starts) - excess
        cut = token_starts[keep] if keep > 0 else 0
        return {**values, name: text[:cut]}
    return None
