"""The run's display and written record: RichProgress, MetricsLog, loss.png and report.md.

One real transformers Trainer run of a tiny random Llama (4 steps, evaluation at steps 2 and 4)
feeds the callbacks; the report tests then use what it wrote.
"""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
)

from fasttune.atomic_io import atomic_replace_dir, atomic_write_text
from fasttune.report import installed_versions, plot_loss, training_summary, write_report
from fasttune.report import eval_set_of, read_metrics
from fasttune.train.metrics_log import MetricsLog, name_the_eval_set
from fasttune.train.progress import RichProgress, use_rich_progress

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # PNG spec, section 5.2 (https://www.w3.org/TR/png-3/)
MAX_STEPS = 4
SEQ_LEN = 16
BATCH = 2


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def _rows(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 64, (SEQ_LEN,), generator=generator)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=80), buffer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Train 4 steps with both callbacks; return the run dir and what the console printed."""
    run_dir = tmp_path_factory.mktemp("run")
    args = TrainingArguments(
        output_dir=str(run_dir / "trainer"),
        use_cpu=True,
        max_steps=MAX_STEPS,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        report_to="none",
        save_strategy="no",
        include_num_input_tokens_seen="all",
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=_tiny_llama(), args=args, train_dataset=_rows(8, seed=1), eval_dataset=_rows(2, seed=2)
    )
    console, buffer = _console()
    trainer.add_callback(MetricsLog(run_dir))
    with use_rich_progress(trainer, console=console):
        trainer.train()
    assert not any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks)
    return run_dir, buffer.getvalue()


# -- metrics.jsonl --


def test_metrics_jsonl_has_one_line_per_log(run):
    run_dir, _ = run
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert len(train) == MAX_STEPS
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [2, 4]
    summary = records[-1]
    assert "train_runtime" in summary and "train_loss" in summary and summary["step"] == MAX_STEPS
    assert len(records) == MAX_STEPS + len(evals) + 1
    for r in records:
        assert {"step", "epoch", "time", "elapsed_s"} <= r.keys()
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    assert all(isinstance(r["loss"], float) and r["learning_rate"] >= 0 and "grad_norm" in r for r in train)
    # The trainer counted tokens (include_num_input_tokens_seen): 2 rows of 16 per step.
    assert train[-1]["num_input_tokens_seen"] == MAX_STEPS * BATCH * SEQ_LEN
    assert [r["elapsed_s"] for r in records] == sorted(r["elapsed_s"] for r in records)


def test_named_eval_sets_are_known_by_their_names():
    """A record is of the named eval set whose ``eval_<name>_`` prefixes its keys, among the names the run
    knows (data.eval_path's keys); a compute_metrics key ``token_loss`` of a single eval set is not a set."""
    metrics = [{"step": 1, "loss": 2.0},
               {"step": 2, "eval_easy_loss": 1.5, "eval_easy_runtime": 0.1},
               {"step": 2, "eval_hard_loss": 1.7, "eval_hard_runtime": 0.1},
               {"step": 4, "eval_easy_loss": 1.25, "eval_easy_runtime": 0.1},
               {"step": 4, "eval_loss": 1.0, "eval_token_loss": 3.0, "eval_runtime": 0.1}]
    summary = training_summary(metrics, ["easy", "hard"])
    assert summary["eval_losses"] == {"easy": 1.25, "hard": 1.7} and summary["eval_loss"] == 1.0
    assert eval_set_of(metrics[2], ["easy", "hard"]) == "hard" and eval_set_of(metrics[4], ["easy", "hard"]) == ""
    assert "eval_losses" not in training_summary(metrics)  # no names known (one eval set): no set is made up


def test_a_compute_metrics_key_ending_in_runtime_names_no_eval_set(tmp_path):
    """A user metric ``gen_runtime`` is logged ``eval_gen_runtime`` (one set) or ``eval_easy_gen_runtime``
    (set easy): neither is a set named ``gen`` or ``easy_gen``, in metrics.jsonl, the summary or on screen."""
    state = TrainerState(global_step=2, max_steps=2, epoch=1.0, is_world_process_zero=True)
    single = {"eval_gen_runtime": 0.5, "eval_loss": 1.0, "eval_runtime": 0.1, "eval_entropy": 9.0}
    easy = {"eval_easy_gen_runtime": 0.5, "eval_easy_loss": 1.5, "eval_easy_runtime": 0.1, "eval_entropy": 10.5}
    MetricsLog(tmp_path).on_log(None, state, None, logs=dict(single))
    (one,) = read_metrics(tmp_path)
    assert {k: v for k, v in one.items() if k.startswith("eval_")} == single  # eval_loss stays eval_loss
    MetricsLog(tmp_path / "named.jsonl", ["easy", "hard"]).on_log(None, state, None, logs=dict(easy))
    (named,) = read_metrics(tmp_path / "named.jsonl")
    assert {k: v for k, v in named.items() if k.startswith("eval_")} == {
        "eval_easy_gen_runtime": 0.5, "eval_easy_loss": 1.5, "eval_easy_runtime": 0.1, "eval_easy_entropy": 10.5}
    assert training_summary([one]) == {"steps": 2, "epochs": 1.0, "eval_loss": 1.0}
    assert training_summary([named], ["easy", "hard"])["eval_losses"] == {"easy": 1.5}
    console, buffer = _console()
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    for names, logs in (((), single), (("easy", "hard"), easy)):
        progress = RichProgress(console=console, eval_sets=names)
        progress.on_train_begin(args, state, None)
        progress.on_log(args, state, None, logs=dict(logs))
    one_line, named_line = [line for line in buffer.getvalue().splitlines() if line.startswith("eval")]
    assert one_line.startswith("eval  step 2/2") and "  loss 1  " in one_line and "  gen_runtime 0.5" in one_line
    assert named_line.startswith("eval easy  step 2/2") and "  entropy 10.5" in named_line and "  gen_runtime 0.5" in named_line


def test_the_eval_set_of_a_record_among_names_that_nest():
    """Sets ``easy`` and ``easy_gen``: ``eval_easy_gen_loss`` is easy_gen's, and set easy's user metric ``gen_loss``
    (``eval_easy_gen_loss`` beside ``eval_easy_loss``) leaves its record easy's; TRL's unnamed ``eval_num_tokens``
    is no set ``num``'s."""
    names = ["easy", "easy_gen", "num"]
    assert eval_set_of({"eval_easy_gen_loss": 1.0, "eval_easy_gen_runtime": 0.1, "eval_num_tokens": 5}, names) == "easy_gen"
    assert eval_set_of({"eval_easy_gen_loss": 9.0, "eval_easy_loss": 1.0, "eval_easy_runtime": 0.1}, names) == "easy"
    assert eval_set_of({"eval_num_tokens": 5, "eval_easy_loss": 1.0}, names) == "easy"
    assert eval_set_of({"eval_num_loss": 2.0, "eval_num_tokens": 5}, names) == "num"
    assert eval_set_of({"loss": 1.0, "eval_runtime": 0.1}, names) == "" and eval_set_of({"eval_easy_loss": 1.0}, []) == ""


def test_use_rich_progress_knows_the_sets_of_a_dict_of_eval_datasets():
    from types import SimpleNamespace

    added = []
    trainer = SimpleNamespace(pop_callback=lambda callback: None, add_callback=added.append,
                              eval_dataset={"easy": [1], "hard": [2]})
    assert use_rich_progress(trainer, Console(file=io.StringIO())).eval_sets == ("easy", "hard") and len(added) == 1
    trainer.eval_dataset = [1, 2]
    assert use_rich_progress(trainer, Console(file=io.StringIO())).eval_sets == ()


def test_a_report_rebuilt_from_summary_json_knows_its_eval_sets(tmp_path):
    """cli's report rebuild passes summary.json as it is: its ``eval_sets`` name the sets of its metrics
    records; a summary without them (an older run, or one eval set) still renders."""
    metrics = [{"step": 2, "eval_easy_gen_loss": 9.0, "eval_easy_gen_runtime": 0.5, "eval_easy_loss": 1.5, "eval_easy_runtime": 0.1},
               {"step": 2, "eval_hard_loss": 1.75, "eval_hard_runtime": 0.1}]
    summary = json.loads(json.dumps({"recipe": "demo", "eval_sets": {"easy": 3, "hard": 2}, "metrics": metrics}))
    text = write_report(tmp_path, summary).read_text()
    assert "| eval loss (easy) | 1.5 |" in text and "| eval loss (hard) | 1.75 |" in text and "easy_gen" not in text
    old = write_report(tmp_path, {"recipe": "demo", "metrics": metrics, "eval_losses": {"easy": 1.5}}).read_text()
    assert "| eval loss (easy) | 1.5 |" in old and "(hard)" not in old


def test_trls_eval_metrics_are_named_after_the_eval_set_in_metrics_jsonl_and_on_screen(tmp_path):
    """TRL 1.14.2 adds eval_entropy, eval_mean_token_accuracy and eval_num_tokens to each named set's
    evaluation without the set's name: metrics.jsonl names them after the set, and the display shows
    them without eval_, as for a single set."""
    log = MetricsLog(tmp_path, ["easy", "hard"])
    state = TrainerState(global_step=2, max_steps=2, epoch=1.0, is_world_process_zero=True)
    easy = {"eval_easy_loss": 1.5, "eval_easy_runtime": 0.1, "eval_easy_score": 7.0, "eval_entropy": 10.5,
            "eval_mean_token_accuracy": 0.25, "eval_num_tokens": 96.0, "epoch": 1.0}
    single = {"eval_loss": 1.0, "eval_runtime": 0.1, "eval_entropy": 9.0, "eval_mean_token_accuracy": 0.5}
    log.on_log(None, state, None, logs=dict(easy))
    log.on_log(None, state, None, logs=dict(single))
    named, one = read_metrics(tmp_path / "metrics.jsonl")
    assert {k: v for k, v in named.items() if k.startswith("eval_")} == {
        "eval_easy_loss": 1.5, "eval_easy_runtime": 0.1, "eval_easy_score": 7.0, "eval_easy_entropy": 10.5,
        "eval_easy_mean_token_accuracy": 0.25, "eval_easy_num_tokens": 96.0}
    assert {k: v for k, v in one.items() if k.startswith("eval_")} == single  # one set: as the trainer named them
    clash = name_the_eval_set({"eval_easy_runtime": 0.1, "eval_easy_entropy": 7.0, "eval_entropy": 10.5}, ["easy"])
    assert clash == {"eval_easy_runtime": 0.1, "eval_easy_entropy": 7.0, "eval_entropy": 10.5}  # the user's own key is kept
    console, buffer = _console()
    progress = RichProgress(console=console, eval_sets=["easy", "hard"])
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    progress.on_train_begin(args, state, None)
    progress.on_log(args, state, None, logs=dict(easy))
    progress.on_log(args, state, None, logs=dict(single))
    named_line, one_line = [line for line in buffer.getvalue().splitlines() if line.startswith("eval")]
    assert named_line.startswith("eval easy  step 2/2") and one_line.startswith("eval  step 2/2")
    for line in (named_line, one_line):
        assert " eval_" not in line and "  mean_token_accuracy " in line and "  loss " in line, line


def test_read_metrics_skips_a_torn_last_line(run, tmp_path):
    run_dir, _ = run
    text = (run_dir / "metrics.jsonl").read_text()
    torn = tmp_path / "metrics.jsonl"
    torn.write_text(text + '{"step": 5, "loss": 1.2')
    assert read_metrics(tmp_path) == read_metrics(run_dir)
    assert len(read_metrics(torn)) == len(text.splitlines())


def test_read_metrics_rejects_damage_before_the_end(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)


def test_appending_after_a_kill_cuts_the_fragment(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    MetricsLog(path).append({"step": 2, "loss": 1.5})
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


def test_metrics_log_writes_strict_json_and_only_on_the_main_process(tmp_path):
    log = MetricsLog(tmp_path)
    state = TrainerState(global_step=3, epoch=0.5, is_world_process_zero=True)
    log.on_log(None, state, None, logs={"loss": float("nan"), "grad_norm": torch.tensor(0.25)})
    other = TrainerState(global_step=3, is_world_process_zero=False)
    log.on_log(None, other, None, logs={"loss": 1.0})
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    record = json.loads(line, parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))
    assert record["loss"] is None and record["grad_norm"] == 0.25 and record["step"] == 3


# -- progress display --


def test_progress_prints_plain_lines_without_a_terminal(run):
    _, printed = run
    assert "\x1b[" not in printed, "escape codes in a non-terminal log"
    lines = printed.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/4", "2/4", "3/4", "4/4"]
    assert all("loss " in line and "lr " in line and "tok/s" in line and "elapsed " in line for line in steps)
    assert "remaining " in steps[0]
    assert "peak mem" not in printed  # no CUDA here
    assert sum(line.startswith("eval ") and "loss " in line for line in lines) == 2
    assert lines[-1].startswith("done ") and "train_runtime" in lines[-1]


def test_progress_uses_the_callers_token_count():
    console, buffer = _console()
    progress = RichProgress(console=console, tokens_per_step=1000)
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    state = TrainerState(max_steps=10, is_world_process_zero=True)
    progress.on_train_begin(args, state, None)
    state.global_step, state.epoch = 2, 0.2
    progress.on_log(args, state, None, logs={"loss": 1.0, "learning_rate": 1e-4})
    assert "tok/s" in buffer.getvalue() and "step 2/10" in buffer.getvalue()


def test_progress_shows_peak_gpu_memory_when_cuda_is_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 3 * 2**30)
    console, buffer = _console()
    progress = RichProgress(console=console)
    state = TrainerState(max_steps=4, is_world_process_zero=True)
    progress.on_train_begin(None, state, None)
    state.global_step = 1
    progress.on_log(None, state, None, logs={"loss": 1.0})
    assert "peak mem 3.0 GiB" in buffer.getvalue()


def test_live_display_stops_when_training_raises():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, force_interactive=True, width=120)
    progress = RichProgress(console=console)
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    state = TrainerState(max_steps=4, is_world_process_zero=True)
    with pytest.raises(RuntimeError, match="boom"), progress:
        progress.on_train_begin(args, state, None)
        assert progress._progress is not None and progress._progress.live.is_started
        live = progress._progress.live
        state.global_step = 1
        progress.on_step_end(args, state, None)
        raise RuntimeError("boom")
    assert progress._progress is None and not live.is_started
    assert "1/4" in buffer.getvalue()


def test_progress_draws_nothing_off_the_main_process():
    console, buffer = _console()
    progress = RichProgress(console=console)
    state = TrainerState(max_steps=4, global_step=1, is_world_process_zero=False)
    progress.on_train_begin(None, state, None)
    progress.on_log(None, state, None, logs={"loss": 1.0})
    progress.on_train_end(None, state, None)
    assert buffer.getvalue() == ""


def test_progress_stops_through_a_failing_trainer(tmp_path):
    class Fail(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("boom")

    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, max_steps=2, report_to="none", save_strategy="no"
    )
    trainer = Trainer(model=_tiny_llama(), args=args, train_dataset=_rows(4, seed=3))
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, force_interactive=True, width=120)
    trainer.add_callback(Fail())
    with pytest.raises(RuntimeError, match="boom"), use_rich_progress(trainer, console=console) as progress:
        trainer.train()
    assert progress._progress is None


# -- loss.png and report.md --


def test_plot_loss_writes_a_png(run):
    run_dir, _ = run
    metrics = read_metrics(run_dir)
    png = plot_loss(metrics, run_dir / "loss.png")
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])  # IHDR follows the signature
    assert width > 0 and height > 0
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".loss.png")], "temporary left behind"


def test_plot_loss_with_no_loss_writes_nothing(tmp_path):
    assert plot_loss([{"step": 1, "grad_norm": 1.0}], tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()


def test_report_holds_the_given_numbers(run, tmp_path):
    run_dir, _ = run
    metrics = read_metrics(run_dir)
    plot_loss(metrics, tmp_path / "loss.png")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "config.yaml").write_text("recipe: llama_qlora\n")
    summary = training_summary(metrics)
    assert summary["steps"] == MAX_STEPS
    assert summary["final_train_loss"] == [r["loss"] for r in metrics if "loss" in r][-1]
    info = {
        "recipe": "llama_qlora",
        "base_model": "tiny-llama",
        "method": "qlora",
        "backend": "hf",
        "backend_reason": "unsloth needs CUDA",
        "dtype": "float32",
        "attention": "sdpa",
        "device": "cpu",
        "versions": installed_versions(),
        "data_format": "messages",
        "train_rows": 8,
        "eval_rows": 2,
        "trainable_params": 1234,
        "total_params": 56789,
        "metrics": metrics,
        "wall_time_s": 3725.0,  # set by the caller: wins over the metrics' train_runtime
        "task": {"name": "exact match", "before": {"accuracy": 0.25}, "after": {"accuracy": 0.75}},
        "samples": [
            {"prompt": "What is 2+2?", "before": "fish", "after": "4", "reference": "```4```"},
        ],
    }
    text = write_report(tmp_path, info).read_text()
    assert text.startswith("# fasttune run: llama_qlora")
    headings = [line.removeprefix("## ") for line in text.splitlines() if line.startswith("## ")]
    assert headings == [
        "What ran", "Data", "Training", "Final metrics", "Task: exact match", "Sample outputs", "Files"
    ]
    assert "| train rows | 8 |" in text and "| eval rows | 2 |" in text
    assert "| hf (unsloth needs CUDA) |" in text
    assert "| wall time | 1 h 02 min 05 s |" in text
    assert f"| mean train loss | {summary['mean_train_loss']:.4g} |" in text
    assert "1,234 / 56,789" in text
    assert f"| {summary['final_train_loss']:.4g} |" in text
    assert "| accuracy | 0.25 | 0.75 | +0.5 |" in text
    assert f"torch {torch.__version__.split('+')[0]}" in text
    assert "````text\n```4```\n````" in text  # a longer fence around a sample holding backticks
    assert "- `adapter/`" in text and "- `config.yaml`" in text and "- `report.md`" in text
    assert "![loss by step](loss.png)" in text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.md")]


def test_report_omits_missing_sections(tmp_path):
    text = write_report(tmp_path, {"final_train_loss": 1.5}).read_text()
    assert text.startswith(f"# fasttune run: {tmp_path.name}\n")
    assert "## Final metrics" in text and "| 1.5 |" in text
    for absent in ("What ran", "## Data", "## Training", "Task", "Sample", "eval loss", "None", "n/a"):
        assert absent not in text
    assert "loss.png" not in text


def test_report_imports_without_torch():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import fasttune.report, fasttune.atomic_io\n"
        "assert 'matplotlib' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# -- atomic_io --


def test_atomic_replace_dir_swaps_a_whole_directory(tmp_path):
    final = tmp_path / "merged"
    final.mkdir()
    (final / "old.bin").write_text("old")
    new = tmp_path / "merged.partial"
    new.mkdir()
    atomic_write_text(new / "model.safetensors", "new")
    atomic_replace_dir(new, final)
    assert [p.name for p in final.iterdir()] == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
