"""SFTTrainer's hooks from a recipe (``hooks:``) and from Python (``Hooks``), and several eval sets.

A user's folder holds a tiny llama, instruction/output rows and a hooks module of the user's
(``ft_user_hooks.py``: a formatting_func, compute_metrics with its logits preprocessing, a callback
that records its calls to a file). One real run through ``python -m fasttune`` from that folder
names them all as ``module:function`` and evaluates two named eval sets; one in-process run gives
the objects through ``prepare.prepare(..., hooks=Hooks(...))``. Bad hook strings and a bad eval set
name are refused through ``fasttune.cli.main`` with exit code 2, before anything loads.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from transformers import TrainerCallback

from fasttune import config, machine, prepare
from fasttune.cli import main
from fasttune.errors import UserError
from fasttune.hooks import Hooks
from fasttune.report import read_metrics
from fasttune.train import runner
from fasttune.train.resume import check_unchanged
from fixtures.real_tokenizers import load_tokenizer
from fixtures.tiny_models import build_tiny_model

pytestmark = pytest.mark.slow

HOOKS_MODULE = "ft_user_hooks"
HOOKS_SOURCE = '''
import json
import os

import numpy as np
from transformers import TrainerCallback

CALLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.jsonl")
NOT_A_FUNCTION = 3


def format_row(row):
    return f"Question: {row['instruction']}\\nAnswer: {row['output']}"


def format_as_dict(row):
    return {"text": row["instruction"]}


def format_batched(rows):  # the batched form of older TRL versions
    return [f"Q: {q}" for q in rows["instruction"]]


def logits_to_ids(logits, labels):
    if isinstance(logits, tuple):  # the model's outputs besides the loss; logits first
        logits = logits[0]
    return logits.argmax(dim=-1)


def compute_metrics(prediction):
    # next-token accuracy on the trained tokens (predictions are already argmax ids), row by row:
    # rows of eval batches of different lengths need not stack into one array
    right = trained = 0
    for predicted, target in zip(prediction.predictions, prediction.label_ids):
        predicted, target = np.asarray(predicted).reshape(-1)[:-1], np.asarray(target).reshape(-1)[1:]
        n = min(len(predicted), len(target))
        mask = target[:n] != -100
        right += int((predicted[:n][mask] == target[:n][mask]).sum())
        trained += int(mask.sum())
    # gen_runtime: a key ending in _runtime, as transformers' own eval_<set>_runtime does, names no eval set
    return {"next_token_accuracy": right / trained, "trained_tokens": trained, "gen_runtime": 0.0}


class Recorder(TrainerCallback):
    def _record(self, event, **fields):
        with open(CALLS, "a", encoding="utf-8") as out:
            out.write(json.dumps({"event": event, **fields}) + "\\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self._record("train_begin")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._record("evaluate", keys=sorted(metrics or {}))


class NeedsArguments(TrainerCallback):
    def __init__(self, path):
        self.path = path


def not_a_callback():
    return 42


def format_two(row, extra):  # takes two arguments: TRL calls it with one row
    return row["instruction"] + extra


def format_qa(row):  # written for question/answer rows, given instruction/output rows
    return f"Q: {row['question']}\\nA: {row['answer']}"


def format_empty_for_arithmetic(row):
    return "" if row["instruction"].startswith("Two") else format_row(row)


def metrics_noarg():
    return {}


def logits_only(logits):
    return logits.argmax(dim=-1)


def metrics_float(prediction):
    return 0.5


def metrics_text(prediction):
    return {"verdict": "fine"}


def metrics_raises(prediction):
    return {"ratio": len(prediction.label_ids) / 0}


def logits_raise(logits, labels):
    raise ValueError("no logits today")
'''

QUESTIONS = [("Capital of France?", "Paris."), ("Two plus two?", "Four."), ("Colour of the sky?", "Blue."),
             ("Opposite of hot?", "Cold."), ("Legs on a spider?", "Eight."), ("First letter of the alphabet?", "A."),
             ("Largest planet?", "Jupiter."), ("Water freezes at?", "Zero degrees Celsius.")]


def format_row(row: dict) -> str:
    """The same formatting as the user's module, for the expected tokens (and the Python API run)."""
    return f"Question: {row['instruction']}\nAnswer: {row['output']}"


def _rows(pairs) -> list[dict]:
    return [{"instruction": q, "output": a} for q, a in pairs]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hooks")
    model = build_tiny_model("llama", load_tokenizer("smollm2"), root / "model")
    _jsonl(root / "train.jsonl", _rows(QUESTIONS))
    _jsonl(root / "easy.jsonl", _rows(QUESTIONS[:3]))
    _jsonl(root / "hard.jsonl", _rows(QUESTIONS[3:5]))
    (root / f"{HOOKS_MODULE}.py").write_text(textwrap.dedent(HOOKS_SOURCE), encoding="utf-8")
    return root, model


def _base(root: Path, model: Path, run_dir: Path) -> list[str]:
    return [f"model.name={model}", "data.path=train.jsonl", "eval.task=null", f"train.output_dir={run_dir}", "train.max_steps=2",
            "train.logging_steps=1", "train.save_strategy=no", "train.eval_strategy=steps", "train.eval_steps=2",
            "train.per_device_eval_batch_size=2", "export.merged=false", "export.gguf=[]"]


HOOK_OVERRIDES = [f"hooks.formatting_func={HOOKS_MODULE}:format_row", f"hooks.compute_metrics={HOOKS_MODULE}:compute_metrics",
                  f"hooks.preprocess_logits_for_metrics={HOOKS_MODULE}:logits_to_ids", f"hooks.callbacks=[{HOOKS_MODULE}:Recorder]"]
EVAL_SETS = ["data.eval_path.easy=easy.jsonl", "data.eval_path.hard=hard.jsonl"]


@pytest.fixture(scope="module")
def cli_run(world):
    """``python -m fasttune recipe demo`` from the user's folder, every hook named in the recipe, two eval sets."""
    root, model = world
    run_dir = root / "run"
    overrides = [*_base(root, model, run_dir), *HOOK_OVERRIDES, *EVAL_SETS]
    result = subprocess.run([sys.executable, "-m", "fasttune", "recipe", "demo", *overrides], capture_output=True, text=True,
                            timeout=600, cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, run_dir, overrides, result.stdout


def test_the_formatting_funcs_text_is_what_is_tokenized(world, monkeypatch):
    """The recipe's formatting_func (imported from the current folder) makes every row, train and
    each eval set: its text plus EOS, as TRL appends it, every token trained."""
    root, model = world
    monkeypatch.chdir(root)
    recipe = prepare.resolve("demo", [*_base(root, model, root / "unused"), *HOOK_OVERRIDES[:1], *EVAL_SETS])
    prepared = prepare.prepare_elsewhere(recipe, machine.plan(recipe, machine.detect(), force_cpu=True))
    made = prepare.inputs(prepared, str(model))
    tokenizer = made.tokenizer
    assert made.data.format == "text" and list(made.eval_sets) == ["easy", "hard"]
    for tokenized, rows in ((made.train, _rows(QUESTIONS)), (made.eval_sets["easy"], _rows(QUESTIONS[:3])),
                            (made.eval_sets["hard"], _rows(QUESTIONS[3:5]))):
        assert len(tokenized.dataset) == len(rows)
        for row, raw in zip(tokenized.dataset, rows):
            expected = tokenizer(format_row(raw) + tokenizer.eos_token)["input_ids"]
            assert row["input_ids"] == expected
            assert row["labels"] == expected


def test_the_dry_run_shows_the_formatting_funcs_first_row_as_it_trains(world, monkeypatch):
    """The dry run tokenizes the first formatted row as a run does (fasttune.data.tokenize): its text and
    EOS, every token trained, and what train.max_length keeps of it."""
    from fasttune.dry_run import dry_run

    root, model = world
    monkeypatch.chdir(root)
    recipe = prepare.resolve("demo", [*_base(root, model, root / "unused"), *HOOK_OVERRIDES[:1], "train.max_length=8",
                                      "train.eval_strategy=no"])
    prepared = prepare.prepare_elsewhere(recipe, machine.plan(recipe, machine.detect(), force_cpu=True))
    tokenizer = prepare.inputs(prepared, str(model)).tokenizer
    expected = tokenizer(format_row(_rows(QUESTIONS)[0]) + tokenizer.eos_token)["input_ids"]
    (line,) = [line for line in dry_run(prepared).checked if line.startswith("hooks.formatting_func")]
    assert line.startswith(f"hooks.formatting_func: first row -> {len(expected)} tokens, every one trained; "
                           "train.max_length 8 keeps 8 of them (keep_start): 'Question: Capital of France?"), line


def test_compute_metrics_and_both_eval_sets_reach_metrics_jsonl(cli_run):
    _, run_dir, _, stdout = cli_run
    metrics = read_metrics(run_dir / "metrics.jsonl")
    for name in ("easy", "hard"):
        evals = [r for r in metrics if r.get(f"eval_{name}_loss") is not None]
        assert len(evals) == 2, (name, evals)  # at step 2 (eval_steps) and the final trainer.evaluate()
        assert all(0 <= r[f"eval_{name}_next_token_accuracy"] <= 1 and r[f"eval_{name}_trained_tokens"] > 0 for r in evals)
    assert not any("eval_loss" in r for r in metrics)
    # TRL logs its own eval metrics without the set's name: each row names them after the set it is of
    assert not any(key in r for r in metrics for key in ("eval_entropy", "eval_mean_token_accuracy", "eval_num_tokens"))
    for name, other in (("easy", "hard"), ("hard", "easy")):
        for r in (r for r in metrics if f"eval_{name}_loss" in r):
            assert f"eval_{name}_mean_token_accuracy" in r and f"eval_{name}_entropy" in r and f"eval_{other}_entropy" not in r
    assert "eval easy  step 2/2" in stdout and "eval hard  step 2/2" in stdout  # the progress display names the set
    shown = [line for line in stdout.splitlines() if line.startswith("eval ")]
    assert all(" loss " in line and " mean_token_accuracy " in line and " eval_" not in line for line in shown), shown
    assert "eval sets easy 3, hard 2 rows" in stdout


def test_summary_and_report_hold_each_sets_loss(cli_run):
    _, run_dir, _, _ = cli_run
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = read_metrics(run_dir / "metrics.jsonl")
    last = {name: [r[f"eval_{name}_loss"] for r in metrics if f"eval_{name}_loss" in r][-1] for name in ("easy", "hard")}
    assert summary["eval_losses"] == last
    assert summary["eval_sets"] == {"easy": 3, "hard": 2} and summary["eval_rows"] == 5
    assert summary["eval_loss"] is None and summary["data_format"] == "text"
    # the final evaluation, each set on its own: its metrics under its name, TRL's own ones too
    final = {name: [r for r in metrics if f"eval_{name}_loss" in r][-1] for name in ("easy", "hard")}
    assert sorted(summary["eval_metrics"]) == ["easy", "hard"]
    for name, record in final.items():
        got = summary["eval_metrics"][name]
        for key in ("loss", "next_token_accuracy", "mean_token_accuracy", "entropy"):
            assert got[key] == pytest.approx(record[f"eval_{name}_{key}"]), (name, key)
    assert summary["eval_metrics"]["easy"]["entropy"] != summary["eval_metrics"]["hard"]["entropy"]
    report = (run_dir / "report.md").read_text()
    assert "| eval loss (easy) |" in report and "| eval loss (hard) |" in report and "| eval rows (hard) | 2 |" in report


def test_the_users_callback_was_called(cli_run):
    root, _, _, _ = cli_run
    calls = [json.loads(line) for line in (root / "calls.jsonl").read_text().splitlines()]
    assert [c["event"] for c in calls].count("train_begin") == 1
    evaluated = [c["keys"] for c in calls if c["event"] == "evaluate"]
    assert any("eval_easy_loss" in keys for keys in evaluated) and any("eval_hard_loss" in keys for keys in evaluated)


def test_hooks_and_eval_sets_survive_config_yaml(cli_run, monkeypatch):
    """--resume reads config.yaml back as the recipe: the hooks and the eval sets are still there,
    and the recipe that started the run is found unchanged."""
    root, run_dir, overrides, _ = cli_run
    monkeypatch.chdir(root)
    saved = prepare.resolve(str(run_dir / "config.yaml"))
    assert saved.hooks == config.HooksSection(f"{HOOKS_MODULE}:format_row", f"{HOOKS_MODULE}:compute_metrics",
                                              f"{HOOKS_MODULE}:logits_to_ids", [f"{HOOKS_MODULE}:Recorder"])
    assert saved.data.eval_path == {"easy": "easy.jsonl", "hard": "hard.jsonl"}
    assert check_unchanged(run_dir, prepare.resolve("demo", overrides), force=False) == []


class InMemory(TrainerCallback):
    """A callback given as an object through the Python API: it records its calls in this process."""

    def __init__(self):
        self.events = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append("train_begin")

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.events.append(sorted(logs or {}))


def test_python_api_hooks_are_objects(world, tmp_path):
    """``prepare.prepare(..., hooks=Hooks(...))`` with objects: the formatting_func makes the rows, the
    callback instance is called, compute_metrics' keys are logged (the recipe names no hooks)."""
    root, model = world
    run_dir = tmp_path / "run"
    recipe = config.resolve("demo", [*_base(root, model, run_dir), f"data.path={root / 'train.jsonl'}",
                                     f"data.eval_path={root / 'easy.jsonl'}"])
    recorder = InMemory()

    def metrics(prediction):
        return {"rows_seen": len(prediction.label_ids), "gen_runtime": 0.0}  # one eval set: no set "gen"

    hooks = Hooks(formatting_func=format_row, compute_metrics=metrics, callbacks=(recorder,))
    prepared = prepare.prepare(recipe, machine.plan(recipe, machine.detect(), force_cpu=True), run_dir, hooks=hooks)
    assert prepared.hooks.callbacks == (recorder,)
    session = runner.setup(prepared, Console(quiet=True))
    first = session.inputs.train.dataset[0]["input_ids"]
    assert first == session.tokenizer(format_row(_rows(QUESTIONS)[0]) + session.tokenizer.eos_token)["input_ids"]
    runner.train(session)
    runner.save(session)
    assert recorder.events[0] == "train_begin"
    logged = recorder.events[1:]
    assert sum("loss" in keys for keys in logged) == 2 and any("eval_rows_seen" in keys for keys in logged)  # 2 logging steps, evals
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["eval_rows_seen"] for r in records if "eval_rows_seen" in r] == [3, 3]
    assert json.loads((run_dir / "summary.json").read_text())["eval_loss"] is not None  # one eval set: eval_loss as before
    # config.yaml names the hooks it was given; a resume from the command line cannot have them, and says so.
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["python_hooks"]
    assert saved["formatting_func"].endswith(":format_row") and saved["callbacks"] == [f"{__name__}:InMemory"]
    with pytest.raises(UserError, match="the recipe changed since this run started: python_hooks"):
        check_unchanged(run_dir, config.resolve(str(run_dir / "config.yaml")), force=False)


BAD = [
    (["show", "demo", "hooks.formatting_func=format_row"], ["hooks.formatting_func", "module:attribute"]),
    (["show", "demo", "hooks.compute_metrics=no_such_module:compute_metrics"], ["hooks.compute_metrics", "no_such_module",
                                                                                "current folder"]),
    (["recipe", "demo", "--dry-run", "eval.task=null", f"hooks.compute_metrics={HOOKS_MODULE}:compute_metrix"], ["hooks.compute_metrics", "compute_metrix",
                                                                                "did you mean `compute_metrics`?"]),
    (["recipe", "demo", "--dry-run", "eval.task=null", f"hooks.preprocess_logits_for_metrics={HOOKS_MODULE}:NOT_A_FUNCTION"],
     ["hooks.preprocess_logits_for_metrics", "is a value of type int, not a function"]),
    (["recipe", "demo", "--dry-run", "eval.task=null", f"hooks.callbacks=[{HOOKS_MODULE}:Recorder, {HOOKS_MODULE}:Recordr]"], ["hooks.callbacks[1]", "did you mean `Recorder`?"]),
    (["show", "demo", "data.eval_path.bad-name=easy.jsonl"], ["data.eval_path.bad-name", "eval_<name>_loss", "bad_name"]),
    (["show", "demo", "data.eval_path.easy=easy.jsonl", "data.eval_fraction=0.1"], ["data.eval_fraction", "eval sets"]),
    (["show", "demo", f"hooks.formatting_func={HOOKS_MODULE}:format_row"], ["eval.task", "hooks.formatting_func"]),
    (["recipe", "demo", "--dry-run", "eval.task=null", f"hooks.callbacks={HOOKS_MODULE}:NeedsArguments"],
     ["hooks.callbacks[0]", "no arguments"]),
    (["recipe", "demo", "--dry-run", "eval.task=null", f"hooks.callbacks={HOOKS_MODULE}:not_a_callback"],
     ["hooks.callbacks[0]", "got a value of type int"]),
    (["recipe", "demo", "--dry-run", "eval.task=null", f"hooks.formatting_func={HOOKS_MODULE}:format_as_dict"],
     ["hooks.formatting_func", "returned a dict for train.jsonl row 1", "one string"]),
    (["recipe", "demo", "--dry-run", "eval.task=null", f"hooks.formatting_func={HOOKS_MODULE}:format_batched"],
     ["returned a list", "batched form of older TRL"]),
    (["recipe", "demo", "--dry-run", "eval.task=null", f"hooks.formatting_func={HOOKS_MODULE}:format_two"],
     ["hooks.formatting_func", f"{HOOKS_MODULE}:format_two", "called with one row", "missing a required argument: 'extra'"]),
    (["recipe", "demo", "--dry-run", "eval.task=null", f"hooks.compute_metrics={HOOKS_MODULE}:metrics_noarg"],
     ["hooks.compute_metrics", f"{HOOKS_MODULE}:metrics_noarg", "EvalPrediction", "too many positional arguments"]),
    (["recipe", "demo", "--dry-run", "eval.task=null", f"hooks.preprocess_logits_for_metrics={HOOKS_MODULE}:logits_only"],
     ["hooks.preprocess_logits_for_metrics", f"{HOOKS_MODULE}:logits_only", "(logits, labels)", "def logits_only(logits, labels)"]),
    (["recipe", "demo", "--dry-run", "eval.task=null", f"hooks.compute_metrics={HOOKS_MODULE}:compute_metrics", "train.batch_eval_metrics=true"],
     ["hooks.compute_metrics", "compute_result", "train.batch_eval_metrics"]),
    (["recipe", "demo", "--dry-run", "eval.task=null", f"hooks.formatting_func={HOOKS_MODULE}:format_qa"],
     ["hooks.formatting_func", f"{HOOKS_MODULE}:format_qa", "KeyError: 'question'", "called with train.jsonl row 1",
      f"{HOOKS_MODULE}.py line", "instruction, output"]),
    (["recipe", "demo", "--dry-run", "eval.task=null", f"hooks.formatting_func={HOOKS_MODULE}:format_empty_for_arithmetic"],
     ["train.jsonl: 1 row: hooks.formatting_func returned an empty string (first: row 2)",
      f"{HOOKS_MODULE}:format_empty_for_arithmetic", "data.on_bad_row=skip"]),
    (["show", "demo", "data.eval_path=easy.jsonl", "data.eval_path.hard=hard.jsonl"],
     ["data.eval_path.hard=hard.jsonl", "'easy.jsonl'", "data.eval_path.easy=easy.jsonl data.eval_path.hard=hard.jsonl"]),
    (["show", "demo", "data.eval_path.1st=easy.jsonl"], ["data.eval_path.1st", "set_1st"]),
]


@pytest.mark.parametrize("argv, needles", BAD, ids=[" ".join(a[2:] if a[0] == "show" else a[3:]) for a, _ in BAD])
def test_bad_hooks_and_eval_set_names_are_refused_before_anything_loads(world, monkeypatch, capsys, argv, needles):
    root, model = world
    monkeypatch.chdir(root)
    run_dir = root / "refused"
    code = main([*argv, f"model.name={model}", "data.path=train.jsonl", f"train.output_dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "fix:" in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "fill in `text`" not in err  # the user's data has no text column: a formatting_func's empty text is its own
    assert not run_dir.exists()


def test_rows_a_formatting_func_leaves_empty_are_skipped_with_on_bad_row_skip(world, monkeypatch):
    """An empty text is the hook's, said as such; ``data.on_bad_row=skip`` leaves those rows out, as any bad row."""
    from fasttune.data.rows import read_data

    root, model = world
    monkeypatch.chdir(root)

    def empty_for_arithmetic(row):
        return "" if row["instruction"].startswith("Two") else format_row(row)

    recipe = config.resolve("demo", [f"model.name={model}", "data.path=train.jsonl", "eval.task=null", "data.on_bad_row=skip",
                                     "data.eval_path.easy=easy.jsonl"])
    data = read_data(recipe, empty_for_arithmetic)
    assert len(data.train) == len(QUESTIONS) - 1 and len(data.eval_sets["easy"]) == 2
    assert data.report.lines() == ["train.jsonl: skipped 1 row: hooks.formatting_func returned an empty string (first: row 2)"]


def test_the_metric_hooks_sftrainer_gets_are_the_users_functions_guarded():
    """The guarded hooks take the same arguments and return the same values (transformers reads
    compute_metrics' signature for ``compute_result``); a bad return or an exception is a UserError
    naming the hook and the step."""
    import inspect
    from types import SimpleNamespace

    from fasttune.errors import UserError
    from fasttune.hooks import guard_metric_hooks

    seen = []

    def metrics(prediction, compute_result=True):
        seen.append((prediction, compute_result))
        return None if not compute_result else {"accuracy": 0.5, "count": 3}

    def logits(logits, labels):
        return logits * 2

    trainer = SimpleNamespace(compute_metrics=metrics, preprocess_logits_for_metrics=logits, state=SimpleNamespace(global_step=7))
    guard_metric_hooks(trainer)
    assert trainer.compute_metrics is not metrics and inspect.signature(trainer.compute_metrics) == inspect.signature(metrics)
    assert trainer.compute_metrics("p", compute_result=False) is None  # a batch that is not the last returns what it likes
    assert trainer.compute_metrics("p") == {"accuracy": 0.5, "count": 3} and seen == [("p", False), ("p", True)]
    assert trainer.preprocess_logits_for_metrics(3, None) == 6
    trainer.compute_metrics = lambda prediction: 0.5
    trainer.preprocess_logits_for_metrics = lambda logits, labels: logits[5]
    guard_metric_hooks(trainer)
    with pytest.raises(UserError, match=r"hooks.compute_metrics = .*returned a float \(0.5\) at step 7"):
        trainer.compute_metrics("p")
    with pytest.raises(UserError, match=r"hooks.preprocess_logits_for_metrics = .*raised TypeError: .* at step 7"):
        trainer.preprocess_logits_for_metrics(3, None)
    guard_metric_hooks(SimpleNamespace(compute_metrics=None, preprocess_logits_for_metrics=None))  # no hooks: nothing to guard


EVAL_FAILURES = [
    ([f"hooks.compute_metrics={HOOKS_MODULE}:metrics_float"],
     ["hooks.compute_metrics", f"{HOOKS_MODULE}:metrics_float", "returned a float (0.5) at step 1", "{name: number}"]),
    ([f"hooks.compute_metrics={HOOKS_MODULE}:metrics_text"], [f"{HOOKS_MODULE}:metrics_text", "'verdict'", "str"]),
    ([f"hooks.compute_metrics={HOOKS_MODULE}:metrics_raises"],
     [f"{HOOKS_MODULE}:metrics_raises", "raised ZeroDivisionError: division by zero", f"{HOOKS_MODULE}.py line", "at step 1"]),
    ([f"hooks.compute_metrics={HOOKS_MODULE}:compute_metrics", f"hooks.preprocess_logits_for_metrics={HOOKS_MODULE}:logits_raise"],
     ["hooks.preprocess_logits_for_metrics", f"{HOOKS_MODULE}:logits_raise", "raised ValueError: no logits today"]),
]


@pytest.mark.parametrize("hooks, needles", EVAL_FAILURES, ids=[h[-1].rpartition(":")[2] for h, _ in EVAL_FAILURES])
def test_a_metric_hook_that_fails_at_an_evaluation_is_the_users_error(world, monkeypatch, capsys, hooks, needles):
    """Exit 2 with the hook, the step and what went wrong, no traceback; the run folder keeps what was
    written before the evaluation (config.yaml, metrics.jsonl) and no summary, and it is not held."""
    root, model = world
    monkeypatch.chdir(root)
    run_dir = root / f"failed-{hooks[-1].rpartition(':')[2]}"
    code = main(["recipe", "demo", *_base(root, model, run_dir), "train.max_steps=1", "train.eval_steps=1",
                 "data.eval_path=easy.jsonl", *hooks])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err and "fix:" in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert (run_dir / "config.yaml").exists() and (run_dir / "metrics.jsonl").exists()
    assert not (run_dir / "summary.json").exists() and not (run_dir / "adapter").exists()
    assert not (run_dir / ".fasttune.lock").exists()
