"""bench/gpu_check.py --smoke: the GPU proof's code paths on a tiny random Mistral, on the CPU.

The second test runs the unsloth backend (its CPU fallback) from the copy of Unsloth the tests use
(tests/fixtures/unsloth_cpu.py), prepended to the children's PYTHONPATH; skipped without it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.unsloth_cpu import UNSLOTH_ENV, unsloth_path

REPO = Path(__file__).resolve().parents[1]
RESULT = re.compile(r"^\s*\[(\w+)\] GPU_CHECK_RESULT (\{.*\})\s*$")


def run_smoke(*extra: str, pythonpath: list[str] = ()) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([*pythonpath, str(REPO)]))
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", *extra], cwd=REPO, env=env, check=False,
                          capture_output=True, text=True, timeout=240)
    results = {}
    for line in proc.stdout.splitlines():
        found = RESULT.match(line)
        if found:
            results[found.group(1)] = json.loads(found.group(2))
    return proc, results


@pytest.mark.slow
def test_smoke_trains_on_the_hf_backend():
    proc, results = run_smoke()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    hf = results["hf"]
    assert hf["backend"] == "hf"
    assert hf["steps"] == 3
    assert hf["loss_finite"] and hf["final_loss"] is not None
    assert hf["tokens_per_s"] > 0
    assert hf["loss_tokens_per_row"] == hf["seq_len"] == 64
    assert "verdict: PASS" in proc.stdout


@pytest.mark.slow
def test_smoke_runs_the_unsloth_backend():
    folder = unsloth_path()
    if not (folder / "unsloth" / "__init__.py").is_file():
        pytest.skip(f"Unsloth is not installed at {folder} (make test installs it; or set {UNSLOTH_ENV})")
    proc, results = run_smoke("--backends", "unsloth", pythonpath=[str(folder)])
    result = results.get("unsloth")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result["backend"] == "unsloth", result
    assert result["steps"] == 3 and result["loss_finite"]
