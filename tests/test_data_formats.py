"""Row shapes: TRL's four pass through unchanged; Alpaca and ShareGPT become messages; bad rows are counted by kind."""
import json

import pytest

from fasttune import config
from fasttune.data.formats import BadRow, convert, detect
from fasttune.data.rows import read_data
from fasttune.errors import UserError

# The examples of https://huggingface.co/docs/trl/en/dataset_formats, verbatim.
TRL_EXAMPLES = {
    "text": {"text": "The sky is blue."},
    "messages": {"messages": [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "It is blue."}]},
    "prompt_completion": {"prompt": "The sky is", "completion": " blue."},
    "conversational_prompt_completion": {"prompt": [{"role": "user", "content": "What color is the sky?"}],
                                         "completion": [{"role": "assistant", "content": "It is blue."}]},
}
DETECTED = {"text": "text", "messages": "messages", "prompt_completion": "prompt_completion",
            "conversational_prompt_completion": "prompt_completion"}


def run(tmp_path, rows, *overrides):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return read_data(config.resolve("demo", [f"data.path={path}", "data.max_rows=null", "data.eval_rows=null", *overrides])), path


def failure(tmp_path, rows, *overrides):
    with pytest.raises(UserError) as err:
        run(tmp_path, rows, *overrides)
    return str(err.value)


@pytest.mark.parametrize("name", list(TRL_EXAMPLES))
def test_trl_examples_are_detected_and_pass_through_unchanged(tmp_path, name):
    row = TRL_EXAMPLES[name]
    data, _ = run(tmp_path, [row])
    assert data.format == DETECTED[name]
    assert data.train == [row]


def test_alpaca_with_and_without_input(tmp_path):
    rows = [{"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
            {"instruction": "Name a primary colour.", "input": "", "output": "Red"},
            {"instruction": "Say hi.", "output": "Hi"}]
    data, _ = run(tmp_path, rows)
    assert data.format == "alpaca"
    assert data.train == [
        {"messages": [{"role": "user", "content": "Translate to French.\n\nGood morning"}, {"role": "assistant", "content": "Bonjour"}]},
        {"messages": [{"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Red"}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi"}]},
    ]


def test_sharegpt_with_system_and_several_turns(tmp_path):
    row = {"conversations": [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "2+2?"},
                             {"from": "gpt", "value": "4"}, {"from": "human", "value": "And 3+3?"}, {"from": "gpt", "value": "6"}]}
    data, _ = run(tmp_path, [row], "data.system_prompt=Default.")
    assert data.format == "sharegpt"
    assert data.train == [{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                                        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                                        {"role": "assistant", "content": "6"}]}]


def test_openai_messages_with_a_system_turn_keep_it(tmp_path):
    row = {"messages": [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Arr."}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Arr!"}]}
    data, _ = run(tmp_path, [row], "data.system_prompt=Default.")
    assert data.train == [row]


def test_default_system_prompt_is_added_where_there_is_none(tmp_path):
    data, _ = run(tmp_path, [TRL_EXAMPLES["messages"]], "data.system_prompt=Be brief.")
    assert data.train[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    data, _ = run(tmp_path, [TRL_EXAMPLES["conversational_prompt_completion"]], "data.system_prompt=Be brief.")
    assert data.train[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert data.train[0]["completion"] == TRL_EXAMPLES["conversational_prompt_completion"]["completion"]


def test_format_override_beats_detection(tmp_path):
    row = {"text": "The sky is blue.", "prompt": "The sky is", "completion": " blue."}
    assert detect(row) == "prompt_completion"
    data, _ = run(tmp_path, [row], "data.format=text")
    assert data.format == "text" and data.train == [{"text": "The sky is blue."}]


def test_unknown_columns_name_the_shapes_and_the_fix(tmp_path):
    message = failure(tmp_path, [{"question": "q", "answer": "a"}])
    assert "row 1 columns = ['answer', 'question']: rows need the columns of one of: messages | conversations (ShareGPT)" in message
    assert "describe them with data.mapping" in message


BAD = {"ok": TRL_EXAMPLES["messages"],
       "no_assistant": {"messages": [{"role": "user", "content": "Hello?"}]},
       "bad_role": {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
       "empty_content": {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]},
       "not_a_list": {"messages": "hello"},
       "empty_conversation": {"messages": []}}


def test_each_kind_of_bad_row_is_counted_and_named(tmp_path):
    rows = [BAD["ok"], BAD["no_assistant"], BAD["bad_role"], BAD["no_assistant"], BAD["empty_content"],
            BAD["not_a_list"], BAD["empty_conversation"], BAD["no_assistant"], BAD["no_assistant"]]
    message = failure(tmp_path, rows)
    assert "8 of 9 rows in" in message and "are not usable: 5 problems" in message
    assert ": 4 rows: conversation has no assistant turn (first: row 2, 4, 8)" in message
    assert "fix: add the assistant's reply to those rows, or set data.on_bad_row=skip to drop them" in message
    assert ": 1 row: unknown role 'bot' (known: system, user, assistant) (first: row 3)" in message
    assert ": 1 row: a user message is empty or not text (first: row 5)" in message
    assert ": 1 row: `messages` is not a list of {role, content} messages (first: row 6)" in message
    assert ": 1 row: `messages` is an empty conversation (first: row 7)" in message


def test_missing_and_empty_fields(tmp_path):
    message = failure(tmp_path, [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "  "}, {"instruction": None, "output": "b"}])
    assert "1 row: field `output` is empty (first: row 2)" in message
    assert "1 row: field `instruction` is missing (first: row 3)" in message
    message = failure(tmp_path, [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 3}, {"prompt": [], "completion": "b"}])
    assert "1 row: field `completion` is not text (first: row 2)" in message
    assert "1 row: `prompt` and `completion` are not both lists of messages (first: row 3)" in message


def test_sharegpt_unknown_role(tmp_path):
    row = {"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}
    message = failure(tmp_path, [row])
    assert "1 row: unknown ShareGPT role 'narrator' (known: system, human, user, gpt, assistant) (first: row 1)" in message


def test_on_bad_row_skip_drops_and_counts_by_kind(tmp_path):
    rows = [BAD["ok"], BAD["no_assistant"], BAD["bad_role"], BAD["no_assistant"], BAD["ok"]]
    data, _ = run(tmp_path, rows, "data.on_bad_row=skip")
    assert data.train == [BAD["ok"], BAD["ok"]]
    report = data.report
    assert (report.rows_read, report.rows_kept, report.format) == (5, 2, "messages")
    assert report.skipped == {"conversation has no assistant turn": [2, 4], "unknown role 'bot' (known: system, user, assistant)": [3]}
    assert any("skipped 2 rows: conversation has no assistant turn (first: row 2, 4)" in line for line in report.lines())


def test_on_bad_row_skip_with_nothing_left_is_an_error(tmp_path):
    message = failure(tmp_path, [BAD["no_assistant"]], "data.on_bad_row=skip")
    assert "every row of" in message and "was dropped (data.on_bad_row=skip)" in message


def test_on_bad_row_is_checked_in_the_recipe():
    with pytest.raises(UserError, match="data.on_bad_row = 'drop': must be one of 'error', 'skip'"):
        config.resolve("demo", ["data.on_bad_row=drop"])


def test_convert_raises_bad_row_with_kind():
    with pytest.raises(BadRow) as err:
        convert({"text": ""}, "text")
    assert err.value.kind == "field `text` is empty"


def test_data_format_takes_exactly_the_shapes_fasttune_reads():
    """config.DATA_FORMATS is the one list: the recipe's Literal is built from it, and every name
    is a shape the reader detects and converts."""
    import typing

    from fasttune.data.formats import detect_shape

    assert typing.get_args(typing.get_type_hints(config.DataSection)["format"]) == ("auto", *config.DATA_FORMATS)
    rows = {**TRL_EXAMPLES, "alpaca": {"instruction": "Say hi.", "output": "Hi."},
            "sharegpt": {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hi."}]}}
    assert {detect_shape(row) for row in rows.values()} == set(config.DATA_FORMATS)
    for fmt in config.DATA_FORMATS:
        assert convert(next(row for row in rows.values() if detect_shape(row) == fmt), fmt)
    assert config.resolve("demo", ["data.format=alpaca"]).data.format == "alpaca"
