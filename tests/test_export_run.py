"""Exporting a finished run, at the end of training and with ``python -m fasttune export``.

A tiny real-architecture run trains 2 steps; its export writes merged/ (with a model card) and
gguf/<recipe>-<type>.gguf with a Modelfile; the GGUF loads back through transformers' own GGUF
reader and answers like the merged model; a short disk is refused before anything is written.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fasttune import config
from fasttune.errors import UserError
from fasttune.export import exporter
from fixtures.tiny_models import build_tiny_model, write_chat_jsonl
from fixtures.real_tokenizers import load_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished demo-recipe run on a tiny llama, exporting merged + q8_0 GGUF at the end."""
    root = tmp_path_factory.mktemp("export")
    model = build_tiny_model("llama", load_tokenizer("smollm2"), root / "model")
    data = root / "chat.jsonl"
    write_chat_jsonl(data, 8)
    run_dir = root / "run"
    result = subprocess.run([sys.executable, "-m", "fasttune", "recipe", "demo", f"model.name={model}", f"data.path={data}",
                             "eval.task=null", f"train.output_dir={run_dir}", "train.max_steps=2", "train.logging_steps=1", "export.merged=true",
                             "export.gguf=[q8_0]", "data.system_prompt=Answer briefly."],
                            capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return run_dir


def test_training_ends_with_merged_gguf_and_modelfile(run):
    assert (run / "merged" / "config.json").is_file()
    card = (run / "merged" / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "| final train loss |" in card
    gguf = run / "gguf" / "demo-q8_0.gguf"
    assert gguf.is_file()
    modelfile = (run / "gguf" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./demo-q8_0.gguf") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "Answer briefly." in modelfile
    report = (run / "report.md").read_text()
    assert "gguf/" in report and "merged/" in report
    leftovers = [p.name for p in run.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]
    assert leftovers == []


def test_the_gguf_answers_like_the_merged_model(run):
    """An independent reader (transformers' GGUF loader) gets the same next tokens as the merged model."""
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    reread = AutoModelForCausalLM.from_pretrained(run / "gguf", gguf_file="demo-q8_0.gguf", dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = merged(ids).logits[0], reread(ids).logits[0]
    assert (a - b).abs().max().item() < 5e-2 * max(1.0, a.abs().max().item())
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9


def test_export_cli_writes_elsewhere_and_other_types(run, tmp_path):
    out = tmp_path / "exported"
    result = subprocess.run([sys.executable, "-m", "fasttune", "export", str(run), "--adapter", "--gguf", "f16,q8_0", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (out / "gguf").iterdir()) == ["Modelfile", "Modelfile.q8_0", "demo-f16.gguf", "demo-q8_0.gguf"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "merged" / "README.md").is_file()


def test_a_short_disk_is_refused_before_anything_is_written(run, tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9, 1000))
    recipe = config.resolve(str(run / "config.yaml"))
    request = exporter.ExportRequest(merged=True, gguf=["q8_0"], out=tmp_path / "out")
    with pytest.raises(UserError, match=r"needs about .* MiB free for the export; 1.0 KiB are free \(.* MiB short\)"):
        exporter.export_run(run, recipe, request, console=None)
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_folder_that_is_not_a_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fasttune", "export", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "has no config.yaml: not a fasttune run folder" in result.stderr
    assert "Traceback" not in result.stderr
