"""JSONL formats: each one parsed, each error reported as PATH:LINE: reason, fail and skip modes."""
import json

import pytest

from engine.data.formats import DataError, load_examples


def write_lines(tmp_path, lines, name="train.jsonl"):
    """Write raw lines (dicts are JSON-encoded, strings written as they are)."""
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(x) if isinstance(x, (dict, list)) else x for x in lines) + "\n")
    return str(path)


def test_flag_embedding_line_with_everything(tmp_path):
    line = {
        "query": "q", "pos": ["p1", "p2"], "neg": ["n1"], "pos_scores": [0.9, 0.8], "neg_scores": [0.1],
        "prompt": "Find it", "query_id": 7, "pos_ids": ["d1", "d2"], "neg_ids": ["d3"],
    }
    (ex,) = load_examples(write_lines(tmp_path, [line]))
    assert (ex.query, ex.positives, ex.negatives) == ("q", ["p1", "p2"], ["n1"])
    assert (ex.pos_scores, ex.neg_scores, ex.prompt) == ([0.9, 0.8], [0.1], "Find it")
    assert (ex.query_id, ex.pos_ids, ex.neg_ids, ex.line) == ("7", ["d1", "d2"], ["d3"], 1)


def test_flag_embedding_optional_fields_absent(tmp_path):
    (ex,) = load_examples(write_lines(tmp_path, [{"query": "q", "pos": ["p"]}]))
    assert ex.negatives == [] and ex.pos_scores is None and ex.prompt is None and ex.query_id is None


def test_swift_query_response(tmp_path):
    lines = [
        {"query": "q1", "response": "r1", "rejected_response": ["n1", "n2"], "qid": "a"},
        {"query": "q2", "response": "r2", "rejected_response": "n3", "_id": "b"},  # string form
        {"query": "q3", "response": "r3"},
    ]
    a, b, c = load_examples(write_lines(tmp_path, lines))
    assert (a.query, a.positives, a.negatives, a.query_id) == ("q1", ["r1"], ["n1", "n2"], "a")
    assert (b.negatives, b.query_id) == (["n3"], "b")
    assert (c.positives, c.negatives) == (["r3"], [])


def test_swift_messages(tmp_path):
    line = {
        "messages": [
            {"role": "system", "content": "Retrieve FAQ answers"},
            {"role": "user", "content": "old turn"},
            {"role": "assistant", "content": "..."},
            {"role": "user", "content": "the query"},
        ],
        "positive_messages": [[{"role": "assistant", "content": "pos A"}], [{"role": "user", "content": "pos B"}]],
        "negative_messages": [[{"role": "user", "content": "ignored"}, {"role": "assistant", "content": "neg A"}]],
    }
    (ex,) = load_examples(write_lines(tmp_path, [line]))
    assert ex.query == "the query" and ex.prompt == "Retrieve FAQ answers"
    assert ex.positives == ["pos A", "pos B"] and ex.negatives == ["neg A"]


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    path = write_lines(tmp_path, ["", {"query": "a", "pos": ["b"]}, "   ", "", {"query": "c", "pos": ["d"]}])
    assert [ex.line for ex in load_examples(path)] == [2, 5]


# Each bad line, placed after blank lines so that line numbering is tested too.
BAD_LINES = [
    ("{not json", "not JSON (Expecting property name enclosed in double quotes at column 2)"),
    ("[1, 2]", "not a JSON object (got list)"),
    (
        {"question": "q", "answer": "a"},
        "no recognised format (keys found: answer, question); expected query+pos (FlagEmbedding), "
        "query+response (ms-swift) or messages+positive_messages (ms-swift messages)",
    ),
    ({"pos": ["p"]}, "missing field query"),
    ({"query": "  ", "pos": ["p"]}, "query is empty"),
    ({"query": 3, "pos": ["p"]}, "query must be a string, got int"),
    ({"query": "q", "pos": 5}, "pos must be a list of strings, got int"),
    ({"query": "q", "pos": ["p", 5]}, "pos must be a list of strings, got int at pos[1]"),
    ({"query": "q", "pos": []}, "pos is empty: every example needs at least one positive"),
    ({"query": "q", "pos": ["p", ""]}, "pos[1] is empty"),
    ({"query": "q", "pos": ["p"], "neg": "n"}, "neg must be a list of strings, got string"),
    ({"query": "q", "pos": ["p"], "pos_scores": [1.0, 2.0]}, "pos_scores has 2 values but pos has 1"),
    ({"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": []}, "neg_scores has 0 values but neg has 1"),
    ({"query": "q", "pos": ["p"], "pos_scores": ["high"]}, "pos_scores must be a list of numbers, got string at pos_scores[0]"),
    ({"query": "q", "pos": ["p"], "pos_ids": ["a", "b"]}, "pos_ids has 2 ids but the line has 1 positives"),
    ({"query": "q", "pos": ["p"], "query_id": [1]}, "query_id must be a string or an integer, got list"),
    ({"query": "q", "response": None}, "response must be a string, got null"),
    ({"messages": [{"role": "user", "content": "q"}]}, "missing field positive_messages"),
    ({"messages": [{"role": "system", "content": "s"}], "positive_messages": []}, "messages has no user message (the query is the last user message)"),
    ({"messages": [{"role": "bot", "content": "q"}], "positive_messages": []}, "messages[0].role must be system, user or assistant, got 'bot'"),
    ({"messages": [{"role": "user", "content": "q"}], "positive_messages": []}, "positive_messages is empty: every example needs at least one positive"),
    ({"messages": [{"role": "user", "content": "q"}], "positive_messages": [[]]}, "positive_messages[0] is empty"),
    ({"messages": [{"role": "user", "content": "q"}], "positive_messages": "p"}, "positive_messages must be a list of message lists, got string"),
]


@pytest.mark.parametrize("bad, reason", BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_each_error_names_path_line_and_reason(tmp_path, bad, reason):
    path = write_lines(tmp_path, [{"query": "ok", "pos": ["ok"]}, "", bad])
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert str(err.value) == f"{path}:3: {reason}"


def test_fail_mode_lists_every_bad_line(tmp_path):
    good = {"query": "q", "pos": ["p"]}
    path = write_lines(tmp_path, [good, "oops", "", good, {"query": "q"}, "42"])
    with pytest.raises(DataError) as err:
        load_examples(path, on_error="fail")
    lines = str(err.value).split("\n")
    assert [line.split(": ")[0] for line in lines] == [f"{path}:2", f"{path}:5", f"{path}:6"]
    assert lines[1] == f"{path}:5: missing field pos (FlagEmbedding) or response (ms-swift)"
    assert lines[2] == f"{path}:6: not a JSON object (got int)"


def test_skip_mode_drops_bad_lines_and_warns_once_with_count(tmp_path):
    good = {"query": "q", "pos": ["p"]}
    path = write_lines(tmp_path, [good, "oops", good, {"query": "q", "pos": []}, good])
    warnings = []
    examples = load_examples(path, on_error="skip", warn=warnings.append)
    assert [ex.line for ex in examples] == [1, 3, 5]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{path}: skipped 2 bad line(s) of 5")
    assert f"{path}:2: not JSON" in warnings[0] and f"{path}:4: pos is empty" in warnings[0]


def test_skip_mode_with_no_good_line_fails(tmp_path):
    path = write_lines(tmp_path, ["oops", "[]"])
    with pytest.raises(DataError, match="no valid example left \\(2 bad lines skipped\\)"):
        load_examples(path, on_error="skip", warn=lambda message: None)


def test_fail_mode_with_no_good_line_lists_the_lines(tmp_path):
    path = write_lines(tmp_path, ["oops"])
    with pytest.raises(DataError, match=f"^{path}:1: not JSON"):
        load_examples(path)


def test_empty_file_and_missing_file(tmp_path):
    empty = write_lines(tmp_path, ["", "  "])
    with pytest.raises(DataError, match="no examples"):
        load_examples(empty)
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError) as err:
        load_examples(missing)
    assert str(err.value) == f"{missing}: no such file"


def test_invalid_utf8_is_one_bad_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"query": "a", "pos": ["b"]}\n{"query": "\xff", "pos": ["b"]}\n')
    with pytest.raises(DataError) as err:
        load_examples(str(path))
    assert str(err.value) == f"{path}:2: not valid UTF-8 (byte 12 of the line)"


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_non_finite_scores_are_rejected(tmp_path):
    path = tmp_path / "nan.jsonl"
    path.write_text('{"query": "q", "pos": ["p"], "pos_scores": [NaN]}\n')
    with pytest.raises(DataError) as err:
        load_examples(str(path))
    assert str(err.value) == f"{path}:1: pos_scores[0] is nan, not a finite number"


def test_byte_order_mark_on_the_first_line_is_ignored(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + b'{"query": "q", "pos": ["p"]}\n')
    assert load_examples(str(path))[0].query == "q"


def test_ids_work_in_every_format(tmp_path):
    lines = [
        {"query": "q", "response": "r", "rejected_response": ["n"], "query_id": "a", "pos_ids": ["d1"], "neg_ids": [5]},
        {"messages": [{"role": "user", "content": "q"}], "positive_messages": [[{"role": "user", "content": "p"}]],
         "qid": 3, "pos_ids": ["d2"]},
    ]
    a, b = load_examples(write_lines(tmp_path, lines))
    assert (a.query_id, a.pos_ids, a.neg_ids) == ("a", ["d1"], ["5"])
    assert (b.query_id, b.pos_ids, b.neg_ids) == ("3", ["d2"], None)
