"""data.mapping: any columns → a known shape, declared in the recipe."""
import json

import pytest
import yaml

from fasttune import config
from fasttune import prepare as preparation
from fasttune.data.mapping import compile_mapping, map_row, parse_template
from fasttune.data.rows import read_data
from fasttune.errors import UserError

# Shaped like FreedomIntelligence/medical-o1-reasoning-SFT (columns Question, Complex_CoT, Response).
MEDICAL = [{"Question": "A 45-year-old has {fever} and a rash. Diagnosis?", "Complex_CoT": "Rash + fever {x} suggests...",
            "Response": "Likely measles."},
           {"Question": "Dose of X?", "Complex_CoT": "Weight-based.", "Response": "10 mg/kg."}]
MEDICAL_MAPPING = {"user": "{Question}", "assistant": "<think>{Complex_CoT}</think>{Response}"}


def run(tmp_path, rows, mapping, *overrides):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump({"extends": "demo", "data": {"path": str(path), "mapping": mapping,
                                                                      "max_rows": None, "eval_rows": None}}))
    return read_data(config.resolve(str(recipe_file), list(overrides)))


def test_medical_o1_reasoning_mapping(tmp_path):
    data = run(tmp_path, MEDICAL, MEDICAL_MAPPING)
    assert data.format == "messages"
    assert data.train[0] == {"messages": [
        {"role": "user", "content": "A 45-year-old has {fever} and a rash. Diagnosis?"},  # braces in data are kept
        {"role": "assistant", "content": "<think>Rash + fever {x} suggests...</think>Likely measles."}]}
    assert len(data.train) == 2


def test_system_template_and_default_system_prompt(tmp_path):
    data = run(tmp_path, MEDICAL, {**MEDICAL_MAPPING, "system": "You are a {{careful}} physician."})
    assert data.train[0]["messages"][0] == {"role": "system", "content": "You are a {careful} physician."}
    data = run(tmp_path, MEDICAL, MEDICAL_MAPPING, "data.system_prompt=Answer as a doctor.")
    assert data.train[1]["messages"][0] == {"role": "system", "content": "Answer as a doctor."}


def test_prompt_completion_and_text_mappings(tmp_path):
    rows = [{"q": "2+2", "a": 4}]
    data = run(tmp_path, rows, {"prompt": "Q: {q}\nA:", "completion": " {a}"})
    assert data.format == "prompt_completion" and data.train == [{"prompt": "Q: 2+2\nA:", "completion": " 4"}]
    data = run(tmp_path, rows, {"text": "{q} = {a}"})
    assert data.train == [{"text": "2+2 = 4"}]


def test_plain_rename_keeps_a_list_of_messages(tmp_path):
    dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    data = run(tmp_path, [{"dialog": dialog}], {"messages": "{dialog}"})
    assert data.train == [{"messages": dialog}]


def test_unquoted_yaml_braces_mean_the_column():
    templates, problems = compile_mapping(yaml.safe_load("user: {Question}\nassistant: {Response}"))
    assert not problems
    assert map_row({"Question": "q", "Response": "r"}, templates) == {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}


def test_a_missing_column_names_it_and_the_available_ones(tmp_path):
    with pytest.raises(UserError) as err:
        run(tmp_path, MEDICAL, {"user": "{Questoin}", "assistant": "{Response}"})
    message = str(err.value)
    assert "data.mapping.user = '{Questoin}': column `Questoin` is not in" in message
    assert "(columns: Question, Complex_CoT, Response)" in message and "did you mean `Question`?" in message


def test_a_column_missing_from_some_rows_is_a_bad_row(tmp_path):
    rows = [MEDICAL[0], {"Question": "q", "Complex_CoT": "c"}]
    with pytest.raises(UserError) as err:
        run(tmp_path, rows, MEDICAL_MAPPING)
    assert "1 row: column `Response` is missing (first: row 2)" in str(err.value)
    data = run(tmp_path, rows, MEDICAL_MAPPING, "data.on_bad_row=skip")
    assert len(data.train) == 1 and data.report.skipped == {"column `Response` is missing": [2]}


def test_bad_mappings_are_recipe_errors():
    with pytest.raises(UserError) as err:
        preparation.resolve("demo", ['data.mapping={usr: "{Question}", assistant: "{a:>3}", text: "{b}"}'])
    message = str(err.value)
    assert "data.mapping.usr = '{Question}': is not a column fasttune builds" in message and "did you mean `user`?" in message
    assert "data.mapping.assistant = '{a:>3}': {a:>3} is not a column reference" in message
    assert "mixes conversation turns (system/user/assistant) with other columns" in message
    assert "data.mapping.user = (missing): a conversation mapping needs a user and an assistant template" in message
    with pytest.raises(UserError, match="does not build a known shape"):
        preparation.resolve("demo", ['data.mapping={completion: "{b}"}'])


def test_templates_copy_data_verbatim():
    template = parse_template("<think>{a}</think>{{literal}}{b}")
    assert template.columns == ["a", "b"]
    assert template.render({"a": "{b}", "b": "}{"}) == "<think>{b}</think>{literal}}{"
