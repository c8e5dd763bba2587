"""Read a JSONL training file into Examples, validating every line before training starts.

Three formats are recognised per line, so one file may mix them:
- ms-swift:          {"query", "response", "rejected_response"?}
- ms-swift messages: {"messages", "positive_messages", "negative_messages"?}
- FlagEmbedding:     {"query", "pos", "neg"?, "pos_scores"?, "neg_scores"?, "prompt"?}
and any of them may carry ids: "query_id" (or "qid" / "_id"), "pos_ids", "neg_ids".

A bad line is reported as `PATH:LINE: what is wrong`. A run should fail in the first second
with every problem of the file listed, not after an hour on the first bad line, so the whole
file is read (streamed line by line) before anything trains. docs/data.md lists the messages.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

from engine.data.example import Example

QUERY_ID_KEYS = ("query_id", "qid", "_id")
MAX_REASONS_IN_WARNING = 5


class DataError(ValueError):
    """A user-facing data problem; the message is one `PATH:LINE: reason` per line."""


class LineError(ValueError):
    """What is wrong with one line (the reason only; the caller adds PATH:LINE)."""


def load_examples(path: str, on_error: str = "fail", warn: Callable[[str], None] = print) -> list[Example]:
    """All examples of a JSONL file. on_error="fail": raise one DataError listing every bad
    line; "skip": drop bad lines and warn once with their count and the first reasons."""
    if on_error not in ("fail", "skip"):
        raise DataError(f"on_error={on_error!r} is not one of fail, skip")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    examples: list[Example] = []
    errors: list[str] = []
    positives_listed_as_negatives: list[int] = []
    for line_number, text, decode_error in _numbered_lines(path):
        try:
            if decode_error:
                raise LineError(decode_error)
            example = parse_line(text, line_number)
        except LineError as reason:
            errors.append(f"{path}:{line_number}: {reason}")
            continue
        example.source = path
        if drop_positives_from_negatives(example):
            positives_listed_as_negatives.append(line_number)
        examples.append(example)
    if positives_listed_as_negatives:
        lines = ", ".join(map(str, positives_listed_as_negatives[:MAX_REASONS_IN_WARNING]))
        warn(f"{path}: {len(positives_listed_as_negatives)} line(s) list a positive among their negatives "
             f"(first: line {lines}); it is used as a positive only")
    if errors and on_error == "fail":
        raise DataError("\n".join(errors))
    if not examples:
        if errors:
            shown = "\n".join(errors[:MAX_REASONS_IN_WARNING])
            raise DataError(f"{path}: no valid example left ({len(errors)} bad lines skipped), first:\n{shown}")
        raise DataError(f"{path}: no examples (the file is empty)")
    if errors:
        shown = "\n".join(errors[:MAX_REASONS_IN_WARNING])
        warn(f"{path}: skipped {len(errors)} bad line(s) of {len(errors) + len(examples)}, first:\n{shown}")
    return examples


def _numbered_lines(path: str):
    """(1-based line number, text, decode error or "") of every non-blank line. Bytes are
    decoded per line so that one bad byte is one bad line, not a crash of the whole read."""
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield line_number, "", f"not valid UTF-8 (byte {err.start + 1} of the line)"
                continue
            if line_number == 1:
                text = text.removeprefix("\ufeff")  # byte-order mark written by some editors
            if text.strip():
                yield line_number, text, ""


def parse_line(text: str, line_number: int = 0) -> Example:
    """One JSONL line -> Example, or LineError naming the problem."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise LineError(f"not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise LineError(f"not a JSON object (got {_type_name(record)})")
    if "messages" in record:
        example = _parse_swift_messages(record)
    elif "pos" in record:
        example = _parse_flag_embedding(record)
    elif "response" in record:
        example = _parse_swift_query_response(record)
    elif "query" in record:
        raise LineError("missing field pos (FlagEmbedding) or response (ms-swift)")
    else:
        found = ", ".join(sorted(record)) or "none"
        raise LineError(
            f"no recognised format (keys found: {found}); expected query+pos (FlagEmbedding), "
            "query+response (ms-swift) or messages+positive_messages (ms-swift messages)"
        )
    _attach_ids(example, record)
    example.line = line_number
    return example


# ---- the three formats -------------------------------------------------------------------


def _parse_flag_embedding(record: dict) -> Example:
    query = _required_string(record, "query")
    positives = _string_list(record, "pos", required=True)
    negatives = _string_list(record, "neg", required=False)
    pos_scores = _score_list(record, "pos_scores", "pos", len(positives))
    neg_scores = _score_list(record, "neg_scores", "neg", len(negatives))
    prompt = _optional_string(record, "prompt")
    return Example(query, positives, negatives, pos_scores, neg_scores, prompt=prompt)


def _parse_swift_query_response(record: dict) -> Example:
    query = _required_string(record, "query")
    positive = _required_string(record, "response")
    rejected = record.get("rejected_response")
    if isinstance(rejected, str):  # ms-swift accepts one rejected response as a plain string
        record = {**record, "rejected_response": [rejected]}
    negatives = _string_list(record, "rejected_response", required=False)
    pos_scores = _score_list(record, "pos_scores", "response", 1)
    neg_scores = _score_list(record, "neg_scores", "rejected_response", len(negatives))
    prompt = _optional_string(record, "system")
    return Example(query, [positive], negatives, pos_scores, neg_scores, prompt=prompt)


def _parse_swift_messages(record: dict) -> Example:
    messages = _message_list(record["messages"], "messages")
    user_turns = [m["content"] for m in messages if m["role"] == "user"]
    if not user_turns:
        raise LineError("messages has no user message (the query is the last user message)")
    query = user_turns[-1]
    if not query.strip():
        raise LineError("messages: the last user message is empty")
    system_turns = [m["content"] for m in messages if m["role"] == "system"]
    prompt = system_turns[-1] if system_turns and system_turns[-1].strip() else None
    if "positive_messages" not in record:
        raise LineError("missing field positive_messages")
    positives = _conversation_texts(record, "positive_messages")
    if not positives:
        raise LineError("positive_messages is empty: every example needs at least one positive")
    negatives = _conversation_texts(record, "negative_messages") if "negative_messages" in record else []
    pos_scores = _score_list(record, "pos_scores", "positive_messages", len(positives))
    neg_scores = _score_list(record, "neg_scores", "negative_messages", len(negatives))
    return Example(query, positives, negatives, pos_scores, neg_scores, prompt=prompt)


def _conversation_texts(record: dict, key: str) -> list[str]:
    """The content of the last message of each inner conversation of record[key]."""
    conversations = record[key]
    if not isinstance(conversations, list):
        raise LineError(f"{key} must be a list of message lists, got {_type_name(conversations)}")
    texts = []
    for index, conversation in enumerate(conversations):
        messages = _message_list(conversation, f"{key}[{index}]")
        if not messages:
            raise LineError(f"{key}[{index}] is empty")
        content = messages[-1]["content"]
        if not content.strip():
            raise LineError(f"{key}[{index}]: the last message is empty")
        texts.append(content)
    return texts


def _message_list(value: Any, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise LineError(f"{where} must be a list of messages, got {_type_name(value)}")
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise LineError(f"{where}[{index}] must be an object with role and content, got {_type_name(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise LineError(f"{where}[{index}].role must be system, user or assistant, got {role!r}")
        if not isinstance(content, str):
            raise LineError(f"{where}[{index}].content must be a string, got {_type_name(content)}")
    return value


def drop_positives_from_negatives(example: Example, positives: set[str] | None = None) -> bool:
    """Remove negatives whose text is one of the example's positives, or of `positives` (the query's
    positives over all its lines), with their scores and ids: a positive must never be trained as its
    own query's negative. True when any was removed."""
    positives = set(example.positives) if positives is None else positives
    keep = [i for i, text in enumerate(example.negatives) if text not in positives]
    if len(keep) == len(example.negatives):
        return False
    example.negatives = [example.negatives[i] for i in keep]
    if example.neg_scores is not None:
        example.neg_scores = [example.neg_scores[i] for i in keep]
    if example.neg_ids is not None:
        example.neg_ids = [example.neg_ids[i] for i in keep]
    return True


# ---- optional ids --------------------------------------------------------------------------


def _attach_ids(example: Example, record: dict) -> None:
    for key in QUERY_ID_KEYS:
        if key in record:
            example.query_id = _id_string(record[key], key)
            break
    example.pos_ids = _id_list(record, "pos_ids", len(example.positives), "positives")
    example.neg_ids = _id_list(record, "neg_ids", len(example.negatives), "negatives")


def _id_string(value: Any, key: str) -> str:
    # Ids are often numbers in BEIR-style files; TREC run files want strings either way.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise LineError(f"{key} must be a string or an integer, got {_type_name(value)}")
    text = str(value)
    if not text.strip():
        raise LineError(f"{key} is empty")
    return text


def _id_list(record: dict, key: str, expected: int, what: str) -> list[str] | None:
    if key not in record or record[key] is None:
        return None
    values = record[key]
    if not isinstance(values, list):
        raise LineError(f"{key} must be a list of ids, got {_type_name(values)}")
    if len(values) != expected:
        raise LineError(f"{key} has {len(values)} ids but the line has {expected} {what}")
    return [_id_string(value, f"{key}[{index}]") for index, value in enumerate(values)]


# ---- field checks --------------------------------------------------------------------------


def _required_string(record: dict, key: str) -> str:
    if key not in record:
        raise LineError(f"missing field {key}")
    value = record[key]
    if not isinstance(value, str):
        raise LineError(f"{key} must be a string, got {_type_name(value)}")
    if not value.strip():
        raise LineError(f"{key} is empty")
    return value


def _optional_string(record: dict, key: str) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise LineError(f"{key} must be a string, got {_type_name(value)}")
    return value if value.strip() else None


def _string_list(record: dict, key: str, required: bool) -> list[str]:
    if key not in record or (record[key] is None and not required):
        if required:
            raise LineError(f"missing field {key}")
        return []
    values = record[key]
    if not isinstance(values, list):
        raise LineError(f"{key} must be a list of strings, got {_type_name(values)}")
    if required and not values:
        raise LineError(f"{key} is empty: every example needs at least one positive")
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise LineError(f"{key} must be a list of strings, got {_type_name(value)} at {key}[{index}]")
        if not value.strip():
            raise LineError(f"{key}[{index}] is empty")
    return values


def _score_list(record: dict, key: str, texts_key: str, expected: int) -> list[float] | None:
    if key not in record or record[key] is None:
        return None
    values = record[key]
    if not isinstance(values, list):
        raise LineError(f"{key} must be a list of numbers, got {_type_name(values)}")
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LineError(f"{key} must be a list of numbers, got {_type_name(value)} at {key}[{index}]")
        if not math.isfinite(value):
            raise LineError(f"{key}[{index}] is {value}, not a finite number")
    if len(values) != expected:
        raise LineError(f"{key} has {len(values)} values but {texts_key} has {expected}")
    return [float(value) for value in values]


def _type_name(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "bool", int: "int", float: "float"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
