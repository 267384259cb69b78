"""json_extract: deterministic held-out data, a strict schema, and a metric that means what it says.

No model is needed (generation is tested in test_generation.py).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fasttune.tasks import get_task, task_names
from fasttune.tasks.json_extract import KEYS, SYSTEM_PROMPT, dump, generate, gold, score

GOLD = {"customer": "Ingrid Shah", "age": 33, "city": None, "order_id": "QK-40213", "qty": 18,
        "email": None}


def _row(record: dict) -> dict:
    return {"messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "Visit from Ingrid Shah, aged 33, order QK-40213, 18 pcs."},
        {"role": "assistant", "content": dump(record)},
    ]}


ROW = _row(GOLD)


@pytest.fixture(scope="module")
def train_rows():
    return generate(1000, seed=0, split="train")


@pytest.fixture(scope="module")
def eval_rows():
    return generate(200, seed=1, split="eval")


def test_generation_is_deterministic_per_seed_and_split():
    assert generate(50, seed=3) == generate(50, seed=3)
    assert generate(50, seed=3) != generate(50, seed=4)
    assert generate(50, seed=3, split="eval") != generate(50, seed=3, split="train")
    with pytest.raises(ValueError, match="split 'test'"):
        generate(1, seed=0, split="test")


def test_train_and_eval_are_disjoint(train_rows, eval_rows):
    def names(rows, index):
        return {gold(r)["customer"].split()[index] for r in rows}

    assert not names(train_rows, 0) & names(eval_rows, 0)  # first names
    assert not names(train_rows, 1) & names(eval_rows, 1)  # surnames
    notes = {r["messages"][1]["content"] for r in train_rows}
    assert not notes & {r["messages"][1]["content"] for r in eval_rows}


def test_rows_are_conversations_with_a_schema_answer_copied_from_the_note(train_rows, eval_rows):
    for row in train_rows + eval_rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == SYSTEM_PROMPT
        answer = row["messages"][2]["content"]
        assert score([answer], [row]) == {"valid_json": 1.0, "schema_ok": 1.0,
                                          "exact_match": 1.0, "field_accuracy": 1.0}
        record = json.loads(answer)
        assert answer == dump(record)  # compact, keys in schema order
        note = row["messages"][1]["content"]
        for key in KEYS:
            if record[key] is not None:
                assert str(record[key]) in note, (key, note)


def test_rows_vary(train_rows):
    notes = [r["messages"][1]["content"] for r in train_rows]
    assert len(set(notes)) == len(notes)
    assert any("\n- " in n for n in notes) and any(";" in n for n in notes)
    records = [gold(r) for r in train_rows]
    for key in KEYS[1:]:  # every optional field is both present and null somewhere
        present = sum(r[key] is not None for r in records)
        assert 0.2 * len(records) < present < 0.8 * len(records), key
    # The name opens most notes but not all (the longest opening before a name is 15 characters).
    late = sum(n.find(gold(r)["customer"]) > 20 for n, r in zip(notes, train_rows))
    assert 0.1 * len(notes) < late < 0.5 * len(notes)


def _with(**changes) -> str:
    return json.dumps({**GOLD, **changes})


@pytest.mark.parametrize("prediction, expected", [
    (dump(GOLD), (1, 1, 1, 1)),
    (" " + json.dumps(GOLD, indent=2) + "\n", (1, 1, 1, 1)),  # whitespace is not a mistake
    (_with(age="33"), (1, 0, 0, 5 / 6)),  # wrong type
    (_with(qty=True), (1, 0, 0, 5 / 6)),  # bool is not an int
    (_with(age=33.0), (1, 0, 0, 5 / 6)),  # float is not an int
    (_with(city="Leeds"), (1, 1, 0, 5 / 6)),  # right schema, wrong value
    (json.dumps({k: GOLD[k] for k in reversed(KEYS)}), (1, 0, 0, 1)),  # wrong key order
    (json.dumps({k: GOLD[k] for k in KEYS if k != "email"}), (1, 0, 0, 5 / 6)),  # missing key
    (json.dumps({**GOLD, "note": "x"}), (1, 0, 0, 1)),  # extra key
    ("Sure! Here is the JSON: " + dump(GOLD), (0, 0, 0, 0)),  # extra text
    (dump(GOLD) + "\nHope this helps.", (0, 0, 0, 0)),
    ("[1, 2]", (0, 0, 0, 0)),  # JSON, but not an object
    ('{"customer": "Ingrid Shah", "age": 33,', (0, 0, 0, 0)),  # cut off
])
def test_score_on_hand_written_predictions(prediction, expected):
    got = score([prediction], [ROW])
    assert set(got) == {"valid_json", "schema_ok", "exact_match", "field_accuracy"}
    assert (got["valid_json"], got["schema_ok"], got["exact_match"]) == expected[:3]
    assert got["field_accuracy"] == pytest.approx(expected[3])


def test_score_averages_over_rows():
    other = _row({**GOLD, "age": None})
    got = score([dump(GOLD), "no json"], [ROW, other])
    assert got == {"valid_json": 0.5, "schema_ok": 0.5, "exact_match": 0.5, "field_accuracy": 0.5}
    with pytest.raises(ValueError, match="1 predictions for 2 rows"):
        score(["{}"], [ROW, other])


def test_registry():
    task = get_task("json_extract")
    assert task.headline == "exact_match"
    assert task.headline in score([dump(GOLD)], [ROW])
    assert task.generate(2, task.eval_seed, split="eval") == generate(2, 1, split="eval")
    assert "json_extract" in task_names()
    with pytest.raises(KeyError, match="json_extract"):
        get_task("no_such_task")


def test_task_modules_import_without_torch():
    code = ("import sys, fasttune.tasks as t; t.get_task('json_extract'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)

