"""Every source fasttune reads, without a model: files written here, read back as rows."""
import csv
import json

import pytest

from fasttune import config
from fasttune.data.rows import read_data
from fasttune.data.sources import SourceUnavailable, load_rows, source_paths
from fasttune.errors import UserError

ROWS = [{"prompt": "The sky is", "completion": " blue."}, {"prompt": "Grass is", "completion": " green."}]


def recipe(*overrides):
    return config.resolve("demo", list(overrides))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl(tmp_path):
    assert load_rows(str(write_jsonl(tmp_path / "d.jsonl", ROWS))) == ROWS


def test_json_list_columns_and_json_lines(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    (tmp_path / "columns.json").write_text(json.dumps({"prompt": ["The sky is", "Grass is"], "completion": [" blue.", " green."]}))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": ROWS}))
    write_jsonl(tmp_path / "lines.json", ROWS)  # what datasets' to_json writes
    for name in ("list", "columns", "wrapped", "lines"):
        assert load_rows(str(tmp_path / f"{name}.json")) == ROWS, name


def test_csv(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["prompt", "completion"])
        writer.writeheader()
        writer.writerows(ROWS)
    assert load_rows(str(path)) == ROWS


def test_parquet(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet  # noqa: F811  (the submodule, beside the package importorskip returned)

    path = tmp_path / "d.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(ROWS), path)
    assert load_rows(str(path)) == ROWS


def test_save_to_disk_folder_with_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(folder))
    assert load_rows(str(folder), "test") == ROWS[:1]
    data = read_data(recipe(f"data.path={folder}", "data.split=train"))
    assert data.train == ROWS and data.format == "prompt_completion"
    with pytest.raises(UserError) as err:
        load_rows(str(folder), "validation")
    assert "is not a split of" in str(err.value) and "set data.split to one of train, test" in str(err.value)


def test_several_files_from_a_list_or_commas_are_concatenated_in_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    b = tmp_path / "b.json"
    b.write_text(json.dumps(ROWS[1:]))
    assert source_paths(f"{a}, {b}") == [str(a), str(b)]
    from_cli = read_data(recipe(f"data.path={a},{b}"))
    from_yaml = read_data(recipe(f"data.path=[{a}, {b}]"))
    assert from_cli.train == from_yaml.train == ROWS
    assert from_cli.report.rows_read == 2 and from_cli.source == f"{a}, {b}"


def test_several_files_must_share_a_shape(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "The sky is blue."}])
    with pytest.raises(UserError) as err:
        read_data(recipe(f"data.path={a},{b}"))
    assert f"sources must share one row shape ({a} is prompt_completion, {b} is text)" in str(err.value)


def test_bad_rows_in_several_files_are_located_per_file(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)
    b = write_jsonl(tmp_path / "b.jsonl", [ROWS[0], {"prompt": "x", "completion": ""}])
    with pytest.raises(UserError) as err:
        read_data(recipe(f"data.path={a},{b}"))
    assert f"1 row: field `completion` is empty (first: {b} row 2)" in str(err.value)


def test_offline_hub_name_is_unavailable_not_a_user_error(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SourceUnavailable) as err:
        load_rows("someone/not-cached-anywhere")
    message = str(err.value)
    assert "hub dataset 'someone/not-cached-anywhere' could not be loaded" in message
    assert "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set and it is not cached" in message
    assert "point data.path at a local file" in message


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "x",\n')
    with pytest.raises(UserError) as err:
        load_rows(str(path))
    assert f"{path}:2" in str(err.value) and "is not valid JSON" in str(err.value)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.txt").write_text("hi")
    with pytest.raises(UserError, match="is not a file or folder fasttune reads"):
        load_rows(str(tmp_path / "d.txt"))


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json", "empty.csv"])
def test_an_empty_file_is_reported(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n" if name.endswith(".jsonl") else "")
    with pytest.raises(UserError) as err:
        read_data(recipe(f"data.path={path}"))
    assert f"data.path = '{path}': holds no rows" in str(err.value)


def test_eval_path_and_eval_fraction_and_max_rows(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    held = write_jsonl(tmp_path / "held.jsonl", rows[:3])
    split = read_data(recipe(f"data.path={path}", "data.eval_fraction=0.25", "data.eval_rows=null", "data.max_rows=null"))
    again = read_data(recipe(f"data.path={path}", "data.eval_fraction=0.25", "data.eval_rows=null", "data.max_rows=null"))
    assert len(split.eval) == 5 and len(split.train) == 15 and split.eval == again.eval  # fixed seed
    assert not {r["text"] for r in split.eval} & {r["text"] for r in split.train}
    limited = read_data(recipe(f"data.path={path}", f"data.eval_path={held}", "data.max_rows=4", "data.eval_rows=null"))
    assert limited.train == rows[:4] and limited.eval == rows[:3] and limited.eval_report.rows_read == 3


def test_named_eval_sets_are_read_each_and_cut_each(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(6)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    easy = write_jsonl(tmp_path / "easy.jsonl", rows[:3])
    hard = write_jsonl(tmp_path / "hard.jsonl", rows[3:])
    sets = [f"data.path={path}", f"data.eval_path.easy={easy}", f"data.eval_path.hard={hard},{easy}", "data.max_rows=null"]
    data = read_data(recipe(*sets, "data.eval_rows=4"))
    assert list(data.eval_sets) == ["easy", "hard"] and data.eval == data.eval_sets["easy"] == rows[:3]
    assert data.eval_sets["hard"] == rows[3:] + rows[:1]  # hard.jsonl then easy.jsonl, cut to data.eval_rows=4
    assert data.eval_summary() == "eval sets easy 3, hard 4 rows" and data.train == rows
    assert data.eval_reports["hard"].notes == ["data.eval_rows=4: using 4 of 6 eval (hard) rows"]
    none = read_data(recipe(*sets, "data.eval_rows=0"))
    assert none.eval_sets == {} and none.eval == []


def test_an_eval_path_mapping_survives_the_recipe_round_trip(tmp_path):
    resolved = recipe("data.path=d.jsonl", "data.eval_path.easy=e.jsonl", "data.eval_path.hard=[h1.jsonl, h2.jsonl]")
    assert resolved.data.eval_path == {"easy": "e.jsonl", "hard": ["h1.jsonl", "h2.jsonl"]}
    saved = tmp_path / "config.yaml"
    import yaml

    saved.write_text(yaml.safe_dump(resolved.to_dict()))
    assert config.resolve(str(saved)).to_dict() == resolved.to_dict()
    assert "hooks" not in resolved.to_dict()  # no hooks: config.yaml as before the section existed


def test_the_users_files_are_never_modified(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "Say hi", "output": "hi"}\n{"instruction": "x", "output": ""}\n')
    before = path.read_bytes()
    read_data(recipe(f"data.path={path}", "data.on_bad_row=skip", "data.system_prompt=Be brief."))
    assert path.read_bytes() == before


def test_builtin_cannot_be_mixed_with_files():
    with pytest.raises(UserError, match="a builtin: task cannot be combined with other sources"):
        recipe("data.path=builtin:json_extract,extra.jsonl")


def test_the_task_metric_is_measured_on_the_datas_first_eval_set(tmp_path, monkeypatch):
    """The task metric is measured on ``data.eval``, the data's own first eval set, and the set it names is
    that one, not the recipe's first (a set read with no rows is not among the data's sets);
    ``eval_rows`` counts every set's rows."""
    from types import SimpleNamespace

    from rich.console import Console

    from fasttune.data.rows import PreparedData
    from fasttune.train import runner

    rows = [{"text": f"row {i}"} for i in range(5)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    sets = [f"data.eval_path.{name}={write_jsonl(tmp_path / f'{name}.jsonl', part)}"
            for name, part in (("easy", rows[:2]), ("hard", rows[2:]))]
    data = read_data(recipe(f"data.path={path}", *sets, "data.max_rows=null"))
    assert list(data.eval_sets) == ["easy", "hard"] and data.eval == rows[:2] and data.eval_rows == 5
    resolved = recipe(f"data.path={path}", "data.eval_path.gone=gone.jsonl", *sets)  # a first set the data does not hold
    data = PreparedData(data.train, data.eval_sets["hard"], "text", str(path), eval_sets={"hard": data.eval_sets["hard"]})
    measured = []
    task = SimpleNamespace(name="fake")
    monkeypatch.setattr(runner, "get_task", lambda name: task)
    monkeypatch.setattr(runner, "training_template", lambda tokenizer, recipe: SimpleNamespace(stop=()))
    monkeypatch.setattr(runner, "evaluate_task", lambda task, model, tokenizer, rows, max_new_tokens, stops:
                        measured.append(rows) or {"metrics": {"score": 1.0}, "samples": []})
    console = Console(record=True, width=200)
    runner._task_eval(resolved, None, None, data, console, "before")
    assert measured == [rows[2:]] and "(eval set hard, the first)" in console.export_text() and data.eval_rows == 3
    single = read_data(recipe(f"data.path={path}", f"data.eval_path={tmp_path / 'easy.jsonl'}", "data.max_rows=null"))
    assert single.eval_rows == 2 and single.eval_sets == {}
