"""A run stopped at any instant keeps its work and resumes to the same result.

Killed with SIGKILL between checkpoints or inside one (tests/fixtures/stop_points.py pauses the
process at an exact instant), stopped with Ctrl-C, or with SIGTERM during the final save or the
export, a run resumes (from its newest complete checkpoint, or by redoing only the export) and
ends with the same adapter as an uninterrupted run. A full disk, a second writer and a changed or
foreign recipe are refused in fasttune's words.
"""
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures.tiny_models import build_tiny_model, write_chat_jsonl
from fixtures.real_tokenizers import load_tokenizer
from safetensors.torch import load_file

from fasttune import cli
from fasttune.train.checkpoints import checkpoint_problems

STEPS = 6
STOP_POINTS = Path(__file__).resolve().parent / "fixtures" / "stop_points.py"


@pytest.fixture(scope="module")
def setup_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = build_tiny_model("llama", load_tokenizer("smollm2"), root / "model")
    data = root / "chat.jsonl"
    write_chat_jsonl(data, 24)
    return root, model, data


def overrides(model: Path, data: Path, run_dir: Path) -> list[str]:
    # export.adapter=false: a run keeps its adapter anyway (every test below compares it).
    return [f"model.name={model}", f"data.path={data}", "data.eval_rows=0", "eval.task=null", "export.merged=false",
            "export.gguf=[]", "export.adapter=false", f"train.output_dir={run_dir}", f"train.max_steps={STEPS}", "train.save_steps=2", "train.logging_steps=1",
            "train.per_device_train_batch_size=2", "train.warmup_steps=0", "train.save_total_limit=null"]


def fasttune(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "fasttune", "recipe", "demo", *args], capture_output=True, text=True,
                          timeout=300, **kwargs)


def adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def pause_at(point: str, args: list[str], marker: Path) -> subprocess.Popen:
    """Start a run that pauses at ``point`` (tests/fixtures/stop_points.py); returns once it is there."""
    process = subprocess.Popen([sys.executable, str(STOP_POINTS), point, str(marker), "recipe", "demo", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"the run never reached {point}: {process.communicate(timeout=60)}"
    return process


def finish(process: subprocess.Popen, sig: int) -> subprocess.CompletedProcess:
    process.send_signal(sig)
    out, err = process.communicate(timeout=240)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def start_and_stop(args: list[str], run_dir: Path, after_checkpoint: int, sig: int) -> subprocess.CompletedProcess:
    process = subprocess.Popen([sys.executable, "-m", "fasttune", "recipe", "demo", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = run_dir / "checkpoints" / f"checkpoint-{after_checkpoint}" / "trainer_state.json"
    deadline = time.time() + 240
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run ended or hung before its checkpoint"
    process.send_signal(sig)
    out, err = process.communicate(timeout=240)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.fixture(scope="module")
def uninterrupted(setup_files):
    root, model, data = setup_files
    run_dir = root / "whole"
    result = fasttune(*overrides(model, data, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "export.adapter=false: the adapter is kept anyway" in result.stdout
    return adapter(run_dir)


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    """``python -m fasttune recipe demo ARGS`` in this process (for refusals: no subprocess start-up)."""
    code = cli.main(["recipe", "demo", *args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_same_adapter(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)


def test_sigkill_then_resume_ends_with_the_same_adapter(setup_files, uninterrupted):
    root, model, data = setup_files
    run_dir = root / "killed"
    args = overrides(model, data, run_dir)
    killed = start_and_stop(args, run_dir, after_checkpoint=4, sig=signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert not (run_dir / "adapter").exists()
    resumed = fasttune(*args, "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-4" in resumed.stdout
    assert_same_adapter(uninterrupted, adapter(run_dir))


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(setup_files, uninterrupted):
    root, model, data = setup_files
    run_dir = root / "interrupted"
    args = overrides(model, data, run_dir)
    stopped = start_and_stop(args, run_dir, after_checkpoint=2, sig=signal.SIGINT)
    assert stopped.returncode == 130, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert "--resume" in stopped.stdout and "Traceback" not in stopped.stderr
    saved = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    assert saved and saved[-1] >= 2 and saved[-1] < STEPS
    resumed = fasttune(*args, "--resume")  # the run folder comes from train.output_dir
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_adapter(uninterrupted, adapter(run_dir))


def test_resume_refuses_a_changed_recipe_unless_forced(setup_files, uninterrupted, capsys):
    root, model, data = setup_files
    run_dir = root / "whole"
    args = overrides(model, data, run_dir)
    code, _, err = in_process(capsys, *[a.replace("train.logging_steps=1", "train.logging_steps=3") for a in args], "--resume")
    assert code == 2 and "the recipe changed since this run started: train.logging_steps: 1 -> 3" in err
    code, _, err = in_process(capsys, f"model.name={model}", f"data.path={data}", f"train.output_dir={root / 'never'}", "--resume")
    assert code == 2 and "holds no earlier run" in err


def test_sigkill_inside_a_checkpoint_save_resumes_from_the_last_complete_one(setup_files, uninterrupted, capsys):
    """Killed while the Trainer writes checkpoint-4 (model and optimizer written, state not), with
    save_total_limit 1: checkpoint-2 survives, a second writer is refused with the pid, and the
    resume sets the half-written folders aside (never deletes them) and ends equal."""
    root, model, data = setup_files
    run_dir = root / "killed-inside"
    args = [*overrides(model, data, run_dir)[:-1], "train.save_total_limit=1"]
    process = pause_at("pause-in-checkpoint:4", args, root / "inside.marker")
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == [".partial-checkpoint-4", "checkpoint-2"]
    for second in (args, [*args, "--resume"]):
        code, _, err = in_process(capsys, *second)
        assert code == 2 and f"is in use by another fasttune process (pid {process.pid})" in err
    killed = finish(process, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert checkpoint_problems(checkpoints / "checkpoint-2") == []
    # A half-written checkpoint-4 as an older fasttune or another tool leaves one: the adapter cut off.
    shutil.copytree(checkpoints / "checkpoint-2", checkpoints / "checkpoint-4")
    weights = checkpoints / "checkpoint-4" / "adapter_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    resumed = fasttune(*args, "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"took over the lock of a run that is no longer running (pid {process.pid}" in resumed.stdout
    assert ".partial-checkpoint-4: a save that never finished" in resumed.stdout
    assert "checkpoint-4: adapter_model.safetensors is" in resumed.stdout and "written only in part" in resumed.stdout
    assert f"from {checkpoints / 'checkpoint-2'}" in resumed.stdout
    assert_same_adapter(uninterrupted, adapter(run_dir))
    kept = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())
    assert kept == ["checkpoint-6", "incomplete-checkpoint-4", "incomplete-checkpoint-4.2"], kept


def test_checkpoint_problems_name_what_a_resume_would_trip_over(setup_files, uninterrupted, tmp_path):
    root, model, data = setup_files
    complete = next((root / "whole" / "checkpoints").glob("checkpoint-*"))
    assert checkpoint_problems(complete) == []

    def broken(change) -> list[str]:
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        shutil.copytree(complete, folder)
        change(folder)
        return checkpoint_problems(folder)

    assert broken(lambda f: (f / "trainer_state.json").unlink()) == ["trainer_state.json is missing (the Trainer writes it last)"]
    assert broken(lambda f: (f / "trainer_state.json").write_text('{"global_step": 4,')) == ["trainer_state.json does not parse"]
    assert broken(lambda f: os.truncate(f / "optimizer.pt", 100)) == ["optimizer.pt is not a whole torch file (cut off while it was written?)"]
    assert broken(lambda f: (f / "scheduler.pt").unlink()) == ["scheduler.pt is missing"]
    cut = broken(lambda f: os.truncate(f / "adapter_model.safetensors", 4))
    assert cut == ["adapter_model.safetensors is 4 bytes, shorter than a safetensors header"]
    grown = broken(lambda f: open(f / "adapter_model.safetensors", "ab").write(b"\0" * 8))
    assert len(grown) == 1 and "written only in part" in grown[0]


def test_a_full_disk_inside_a_checkpoint_stops_cleanly_and_resume_ends_equal(setup_files, uninterrupted):
    root, model, data = setup_files
    run_dir = root / "full-disk"
    args = overrides(model, data, run_dir)
    full = subprocess.run([sys.executable, str(STOP_POINTS), "full-in-checkpoint:4", str(root / "full.marker"), "recipe", "demo",
                           *args], capture_output=True, text=True, timeout=300)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert "the disk is full" in full.stderr and f"filled up while writing checkpoint-4 into {run_dir / 'checkpoints'}" in full.stderr
    assert f"--resume {run_dir}" in full.stderr
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["checkpoint-2"], "nothing half-written is left"
    assert checkpoint_problems(checkpoints / "checkpoint-2") == []
    resumed = fasttune(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_adapter(uninterrupted, adapter(run_dir))


def test_too_little_disk_is_refused_before_training(setup_files, tmp_path, monkeypatch, capsys):
    root, model, data = setup_files
    run_dir = tmp_path / "small-disk"
    monkeypatch.setattr("fasttune.disk.free_bytes", lambda folder: 10_000)
    code = cli.main(["recipe", "demo", *overrides(model, data, run_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"train.output_dir = '{run_dir}': needs about" in err and "2 checkpoints of about" in err and "short)" in err
    assert not list(run_dir.glob("checkpoints/checkpoint-*")) and not (run_dir / "metrics.jsonl").exists(), "nothing trained"


def test_sigterm_during_the_final_save_leaves_nothing_half_written_and_resume_ends_equal(setup_files, uninterrupted):
    root, model, data = setup_files
    run_dir = root / "final-save"
    args = overrides(model, data, run_dir)
    stopped = finish(pause_at("pause-in-final-save", args, root / "final.marker"), signal.SIGTERM)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert f"--resume {run_dir}" in stopped.stdout
    assert not (run_dir / "adapter").exists() and not list(run_dir.glob(".adapter.tmp*"))
    hint = next(line for line in stopped.stdout.splitlines() if line.strip().startswith("resume: "))
    command = shlex.split(hint.split("resume: ", 1)[1])
    assert command[:4] == ["python", "-m", "fasttune", "recipe"]
    resumed = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=300)  # as printed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_adapter(uninterrupted, adapter(run_dir))


def test_sigterm_or_a_full_disk_during_the_export_then_resume_redoes_only_the_export(setup_files):
    """One trained run, stopped in turn inside the merge (SIGTERM), inside the GGUF file (SIGTERM, on
    --resume) and by a full disk there (on --resume): each time what was written is whole and no
    temporary is left; the last --resume finishes the export without training again."""
    root, model, data = setup_files
    run_dir = root / "export-stops"
    args = [a for a in overrides(model, data, run_dir) if a not in ("export.merged=false", "export.gguf=[]")] + ["export.gguf=[q8_0]"]

    def nothing_half_written() -> None:
        assert not list(run_dir.glob(".*.tmp*")) and not list(run_dir.glob("gguf/.*.tmp*")), "no temporary is left behind"
        assert not (run_dir / "gguf" / "demo-q8_0.gguf").exists() and not (run_dir / "report.md").exists()

    stopped = finish(pause_at("pause-in-merge", args, root / "merge.marker"), signal.SIGTERM)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert f"--resume {run_dir}" in stopped.stdout
    assert (run_dir / "summary.json").is_file() and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run_dir / "merged").exists(), "merged/ exists only once whole"
    nothing_half_written()
    trained, metrics = adapter(run_dir), (run_dir / "metrics.jsonl").read_bytes()

    stopped = finish(pause_at("pause-in-gguf", [*args, "--resume"], root / "gguf.marker"), signal.SIGTERM)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert "training finished; redoing the export only (merged/, gguf q8_0)" in stopped.stdout
    assert (run_dir / "merged" / "config.json").is_file()
    nothing_half_written()

    full = subprocess.run([sys.executable, str(STOP_POINTS), "full-in-gguf", str(root / "full.marker"), "recipe", "demo", *args,
                           "--resume"], capture_output=True, text=True, timeout=300)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert "filled up while writing the export (merged/, gguf/)" in full.stderr and f"--resume {run_dir}" in full.stderr
    nothing_half_written()

    resumed = fasttune(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "training finished; redoing the export only (gguf q8_0)" in resumed.stdout
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics, "training was not run again"
    assert_same_adapter(trained, adapter(run_dir))
    assert (run_dir / "gguf" / "demo-q8_0.gguf").is_file() and (run_dir / "gguf" / "Modelfile").is_file()
    assert "gguf/" in (run_dir / "report.md").read_text()
    again = fasttune(*args, "--resume")
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_a_run_folder_belongs_to_one_run(setup_files, tmp_path, capsys):
    root, model, data = setup_files
    finished = root / "whole"
    before = {p: p.stat().st_mtime_ns for p in finished.rglob("*")}
    code, _, err = in_process(capsys, *overrides(model, data, finished))
    assert code == 2 and "already holds a run (recipe demo, finished)" in err and f"--resume {finished}" in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, err = in_process(capsys, *overrides(model, data, mine))
    assert code == 2 and "is not empty and was not made by fasttune (it holds notes.txt)" in err
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("*")} == before
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_resume_names_a_foreign_or_unreadable_run(setup_files, tmp_path, capsys):
    root, model, data = setup_files
    other = tmp_path / "other"
    shutil.copytree(root / "whole", other, ignore=shutil.ignore_patterns("checkpoints", "adapter", "merged", "gguf"))
    config = other / "config.yaml"
    config.write_text(config.read_text().replace("name: demo", "name: my_recipe", 1))
    code, _, err = in_process(capsys, *overrides(model, data, other), "--resume", str(other))
    assert code == 2 and "is a run of recipe 'my_recipe', not 'demo'" in err
    assert err.count("->") == 0, "not a list of every setting that differs"
    config.write_text("name: [unclosed\n")
    code, _, err = in_process(capsys, *overrides(model, data, other), "--resume", str(other))
    assert code == 2 and "cannot be read back" in err


def test_the_space_estimate_counts_checkpoints_optimizer_and_exports():
    from types import SimpleNamespace

    from transformers.training_args import OptimizerNames

    from fasttune import config
    from fasttune.train import space

    weights = torch.nn.Linear(10, 10)  # 110 trainable float32 weights
    recipe = config.resolve("demo", ["export.merged=true", "export.gguf=[q8_0]"])
    adam = space.estimate(weights, recipe, SimpleNamespace(optim=OptimizerNames.ADAMW_TORCH, save_strategy="steps"))
    assert adam.checkpoint == 110 * 4 + 110 * 8 and adam.checkpoints == 2
    assert adam.finals == 110 * 4 + 110 * 2 + int(110 * 8.5 / 8)
    eight_bit = space.estimate(weights, recipe, SimpleNamespace(optim=OptimizerNames.ADAMW_8BIT, save_strategy="no"))
    assert eight_bit.checkpoint == 110 * 4 + 110 * 2 and eight_bit.checkpoints == 0 and eight_bit.total == eight_bit.finals
