"""A run killed with SIGKILL, or stopped with Ctrl-C, resumes from its last checkpoint and ends
with the same adapter as an uninterrupted run; a changed recipe is refused unless forced."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures.tiny_models import build_tiny_model, write_chat_jsonl
from fixtures.tokenizers import load_tokenizer
from safetensors.torch import load_file

STEPS = 6


@pytest.fixture(scope="module")
def setup_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = build_tiny_model("llama", load_tokenizer("smollm2"), root / "model")
    data = root / "chat.jsonl"
    write_chat_jsonl(data, 24)
    return root, model, data


def overrides(model: Path, data: Path, run_dir: Path) -> list[str]:
    return [f"model.name={model}", f"data.path={data}", "data.eval_rows=0", "eval.task=null", "export.merged=false",
            f"train.output_dir={run_dir}", f"train.max_steps={STEPS}", "train.save_steps=2", "train.logging_steps=1",
            "train.per_device_train_batch_size=2", "train.warmup_steps=0", "train.save_total_limit=null"]


def fasttune(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "fasttune", "recipe", "demo", *args], capture_output=True, text=True,
                          timeout=300, **kwargs)


def adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


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
    return adapter(run_dir)


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


def test_resume_refuses_a_changed_recipe_unless_forced(setup_files, uninterrupted):
    root, model, data = setup_files
    run_dir = root / "whole"
    args = overrides(model, data, run_dir)
    changed = fasttune(*[a.replace("train.logging_steps=1", "train.logging_steps=3") for a in args], "--resume")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "the recipe changed since this run started: train.logging_steps: 1 -> 3" in changed.stderr
    nothing = fasttune(f"model.name={model}", f"data.path={data}", f"train.output_dir={root / 'never'}", "--resume")
    assert nothing.returncode == 2 and "holds no earlier run" in nothing.stderr
