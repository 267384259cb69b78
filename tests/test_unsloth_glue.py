"""fasttune's Unsloth glue, through Unsloth's CPU fallback, each case in its own process.

Importing Unsloth patches transformers, TRL and PEFT for the whole process, so every case here
runs in a subprocess with Unsloth on its path (tests/fixtures/unsloth_cpu.py); the tests skip,
saying why, where Unsloth is not installed. The CPU fallback is stock transformers + PEFT: this
proves the calls, the import order, the reporting and the fallbacks, not the fused kernels (those
need CUDA: bench/gpu_check.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from fixtures.tiny_models import build_tiny_model, write_chat_jsonl
from fixtures.real_tokenizers import load_tokenizer
from fixtures.unsloth_cpu import env_with_unsloth

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("unsloth")
    mistral = build_tiny_model("mistral", load_tokenizer("mistral"), root / "mistral")
    llama = build_tiny_model("llama", load_tokenizer("smollm2"), root / "llama")
    data = root / "chat.jsonl"
    write_chat_jsonl(data, 16)
    return root, mistral, llama, data


def run_python(code: str, env: dict, cwd: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                            cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


API = """
    import json, sys
    import torch
    from fasttune import FastLanguageModel
    imported_first = "transformers" not in sys.modules and "peft" not in sys.modules
    model, tokenizer = FastLanguageModel.from_pretrained({model!r}, max_seq_length=128, backend={backend!r})
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    engine = FastLanguageModel.engine(model)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    rows = [{{"messages": [{{"role": "user", "content": f"question {{i}}"}}, {{"role": "assistant", "content": f"answer {{i}}"}}]}}
            for i in range(8)]
    lora = {{n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}
    frozen = {{n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}}
    trainer = SFTTrainer(model=model, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         args=SFTConfig(output_dir="out", max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                                        use_cpu=True, bf16=False, report_to="none", save_strategy="no", warmup_steps=0))
    trainer.train()
    now = dict(model.named_parameters())
    print(json.dumps({{
        "backend": engine.backend, "reason": engine.reason, "fast_path": engine.fast_path.describe() if engine.fast_path else None,
        "unsloth_imported": "unsloth" in sys.modules, "imported_first": imported_first,
        "lora_b_moved": all(not torch.equal(lora[n], now[n]) for n in lora if "lora_B" in n),
        "lora_count": len(lora), "frozen_kept": all(torch.equal(frozen[n], now[n]) for n in frozen),
    }}))
"""


def test_named_unsloth_backend_loads_attaches_and_trains_through_unsloth(files):
    root, mistral, _, _ = files
    out = run_python(API.format(model=str(mistral), backend="unsloth"), env_with_unsloth(), root)
    assert out["backend"] == "unsloth" and out["unsloth_imported"] and out["imported_first"]
    assert out["reason"] == "backend=unsloth; no CUDA device, so Unsloth's CPU fallback"
    assert out["fast_path"] == "fast path not reported (Unsloth's CPU fallback: stock PEFT, no fused kernels)"
    assert out["lora_count"] == 2 * 7 * 2  # A and B, seven projections, two layers
    assert out["lora_b_moved"] and out["frozen_kept"]


def test_auto_without_cuda_takes_hf_and_never_imports_unsloth(files):
    root, mistral, _, _ = files
    out = run_python(API.format(model=str(mistral), backend="auto"), env_with_unsloth(), root)
    assert (out["backend"], out["reason"], out["fast_path"]) == ("hf", "no CUDA device", None)
    assert not out["unsloth_imported"]
    assert out["lora_b_moved"] and out["frozen_kept"]


def recipe_args(llama: Path, data: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "fasttune", "recipe", "demo", f"model.name={llama}", f"data.path={data}",
            "eval.task=null", "export.merged=false", f"train.output_dir={run_dir}", "train.max_steps=3",
            "train.per_device_train_batch_size=2", "train.logging_steps=1", "train.warmup_steps=0"]


def test_recipe_on_the_unsloth_backend_reports_what_ran(files):
    root, _, llama, data = files
    run_dir = root / "recipe-run"
    result = subprocess.run([*recipe_args(llama, data, run_dir), "model.backend=unsloth"], capture_output=True,
                            text=True, env=env_with_unsloth(), cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no GPU found, training on CPU" in result.stdout  # Unsloth's own banner: it was imported
    assert "engine backend unsloth (model.backend=unsloth; no CUDA device, so Unsloth's CPU fallback)" in result.stdout
    machine = yaml.safe_load((run_dir / "config.yaml").read_text())["machine"]
    assert machine["backend"] == "unsloth" and machine["fast_path"].startswith("fast path not reported")
    report = (run_dir / "report.md").read_text()
    assert "| backend | unsloth (model.backend=unsloth; no CUDA device, so Unsloth's CPU fallback) |" in report
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in adapter.items())


def test_unsloth_that_raises_on_import_is_named(files):
    """A real Unsloth import failure: its CPU fallback switched off, as on a machine it cannot run on."""
    root, _, llama, data = files
    env = {**env_with_unsloth(), "UNSLOTH_DISABLE_CPU_FALLBACK": "1"}
    result = subprocess.run([*recipe_args(llama, data, root / "refused"), "model.backend=unsloth"], capture_output=True,
                            text=True, env=env, cwd=root, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "model.backend = 'unsloth': cannot be used: Unsloth raised " in result.stderr
    assert "Traceback" not in result.stderr and not (root / "refused").exists()
