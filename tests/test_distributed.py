"""Data-parallel runs: the hf backend runs unchanged under torchrun and accelerate launch.

Two CPU processes over gloo (the launchers' ``--nproc_per_node 2`` / ``--multi_gpu
--num_processes 2``; ``accelerate launch --cpu`` would silently run one). Checked: both
processes train (each takes half of every global batch), they agree on one run directory, only
rank 0 writes, the adapter equals the one a single process trains with the same global batch, and
the evaluation after training runs in both processes (each takes half of the eval rows).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fixtures.tiny_models import build_tiny_model, write_chat_jsonl
from fixtures.real_tokenizers import load_tokenizer

pytestmark = pytest.mark.slow

ROWS, EVAL, STEPS = 24, 6, 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    model = build_tiny_model("llama", load_tokenizer("smollm2"), root / "model")
    data = root / "chat.jsonl"
    write_chat_jsonl(data, ROWS)
    return root, model, data


def recipe(model: Path, data: Path, batch: int) -> list[str]:
    return ["-m", "fasttune", "recipe", "demo", f"model.name={model}", f"data.path={data}", f"data.eval_fraction={EVAL / ROWS}", "eval.task=null",
            "export.merged=false", f"train.max_steps={STEPS}", f"train.per_device_train_batch_size={batch}",
            "train.logging_steps=1", "train.warmup_steps=0", "train.save_steps=2"]


def launch(launcher: list[str], args: list[str], cwd: Path) -> Path:
    """Run in ``cwd`` without train.output_dir (rank 0 names the run); the one run directory made."""
    result = subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    runs = list((cwd / "runs").iterdir())
    assert len(runs) == 1, runs
    assert result.stdout.count("done everything is in") == 1  # rank 1 kept quiet
    return runs[0]


@pytest.fixture(scope="module")
def single(files):
    root, model, data = files
    (root / "single").mkdir()
    return launch([], recipe(model, data, batch=4), root / "single")


TORCHRUN = ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
ACCELERATE = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]


@pytest.mark.parametrize("launcher", [TORCHRUN, ACCELERATE], ids=["torchrun", "accelerate"])
def test_two_processes_train_like_one_with_the_same_global_batch(files, single, launcher):
    root, model, data = files
    cwd = root / launcher[1].split(".")[0]
    cwd.mkdir()
    run_dir = launch(launcher, recipe(model, data, batch=2), cwd)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3]  # each step logged once: only rank 0 writes
    # Two processes x 2 rows = 4 rows per step: an epoch of 18 rows takes 5 steps (9 each, 2 at a time),
    # as with one process x 4; a process that took every row itself would need 9.
    assert records[0]["epoch"] == pytest.approx(1 / 5)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["machine"]["processes"] == 2
    assert "| processes | 2 |" in (run_dir / "report.md").read_text()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]

    ddp = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    one = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    assert ddp.keys() == one.keys()
    assert any(t.abs().sum() > 0 for name, t in ddp.items() if "lora_B" in name)
    for name in ddp:  # DDP averages the two halves' gradients: the same update as one process on the whole batch
        torch.testing.assert_close(ddp[name], one[name], atol=1e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    # The final evaluation ran in both processes (one alone would wait for the other forever): the
    # loss of the same 6 rows, averaged per process batch (3 rows each) rather than over one batch of 6.
    ddp_summary, one_summary = (json.loads((d / "summary.json").read_text()) for d in (run_dir, single))
    assert ddp_summary["eval_rows"] == one_summary["eval_rows"] == EVAL
    assert ddp_summary["eval_loss"] == pytest.approx(one_summary["eval_loss"], rel=0.05)
