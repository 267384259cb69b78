"""``method: full`` end to end: every parameter trains, ``model/`` holds the 16-bit trained model
(safetensors, the tokenizer with its training template, a model card), and GGUF files are written
straight from it, at the end of training, by ``export``, and by ``--resume`` of a finished run.

The run is ``demo_full`` on a tiny real-architecture llama (2 steps).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fasttune.families.chat_templates import get_template
from fixtures.real_tokenizers import load_tokenizer
from fixtures.tiny_models import build_tiny_model, write_chat_jsonl

pytestmark = pytest.mark.slow


def fasttune(*argv, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "fasttune", *map(str, argv)], capture_output=True, text=True, timeout=600, cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    base = build_tiny_model("llama", load_tokenizer("smollm2"), root / "base")
    data = root / "chat.jsonl"
    write_chat_jsonl(data, 8)
    run_dir = root / "run"
    overrides = [f"model.name={base}", f"data.path={data}", "eval.task=null", f"train.output_dir={run_dir}", "train.max_steps=2",
                 "train.logging_steps=1", "train.save_strategy=no", "train.learning_rate=1e-3"]
    result = fasttune("recipe", "demo_full", *overrides, cwd=root)
    return root, base, run_dir, overrides, result.stdout


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_every_parameter_trains_and_model_holds_the_16_bit_result(run):
    root, base, run_dir, _, stdout = run
    assert "trainable" in stdout and "(100.00%)" in stdout
    model_dir = run_dir / "model"
    assert not (run_dir / "adapter").exists() and not (run_dir / "merged").exists()
    trained, original = _weights(model_dir), _weights(base)
    assert trained.keys() == original.keys()
    assert {t.dtype for t in trained.values()} == {torch.bfloat16}
    layers = {name.split(".")[2] for name in trained if name.startswith("model.layers.")}
    for layer in sorted(layers):
        changed = [name for name in trained if name.startswith(f"model.layers.{layer}.")
                   and not torch.equal(trained[name], original[name].to(torch.bfloat16))]
        assert changed, f"layer {layer} did not change"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template == get_template("chatml").source()
    card = (model_dir / "README.md").read_text()
    assert "Every parameter fine-tuned" in card and "| method | full" in card and "lora" not in card.split("---")[1]


def test_the_gguf_is_written_from_model_with_nothing_to_merge(run):
    _, _, run_dir, _, stdout = run
    assert (run_dir / "gguf" / "demo_full-q8_0.gguf").is_file() and (run_dir / "gguf" / "Modelfile").is_file()
    assert "merge adapter" not in stdout
    from gguf import GGUFReader

    reader = GGUFReader(str(run_dir / "gguf" / "demo_full-q8_0.gguf"))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"


def test_export_and_resume_work_from_model(run):
    root, _, run_dir, overrides, _ = run
    fasttune("export", run_dir, "--gguf", "f16", cwd=root)
    assert (run_dir / "gguf" / "demo_full-f16.gguf").is_file()
    (run_dir / "gguf" / "demo_full-q8_0.gguf").unlink()
    result = fasttune("recipe", "demo_full", *overrides, "--resume", run_dir, cwd=root)
    assert "redoing the export only (gguf q8_0)" in result.stdout
    assert (run_dir / "gguf" / "demo_full-q8_0.gguf").is_file()


def test_resume_from_a_checkpoint_ends_with_the_same_model(tmp_path):
    """A full fine-tune stopped after checkpoint-2 (its folder as a kill leaves it: checkpoint-2 and
    nothing after) resumes to the model the uninterrupted run saved."""
    import shutil

    base = build_tiny_model("llama", load_tokenizer("smollm2"), tmp_path / "base")
    data = tmp_path / "chat.jsonl"
    write_chat_jsonl(data, 16)
    whole = tmp_path / "whole"
    args = [f"model.name={base}", f"data.path={data}", "eval.task=null", "train.max_steps=4", "train.save_steps=2",
            "train.save_total_limit=3", "train.logging_steps=1", "train.learning_rate=1e-3", "export.gguf=[]"]
    fasttune("recipe", "demo_full", *args, f"train.output_dir={whole}", cwd=tmp_path)
    stopped = tmp_path / "stopped"
    shutil.copytree(whole, stopped, ignore=shutil.ignore_patterns("checkpoint-4", "model", "summary.json", "report.md", "loss.png"))
    (stopped / "config.yaml").write_text((whole / "config.yaml").read_text().replace(str(whole), str(stopped)))
    result = fasttune("recipe", "demo_full", *args, f"train.output_dir={stopped}", "--resume", stopped, cwd=tmp_path)
    assert "from " in result.stdout and "checkpoint-2" in result.stdout
    ours, theirs = _weights(stopped / "model"), _weights(whole / "model")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=0, rtol=0, msg=name)  # bf16 copies of the same fp32 weights


def test_tied_embeddings_are_saved_once_and_the_model_in_memory_is_untouched(tmp_path):
    """SmolLM2 ties lm_head to the embeddings: the 16-bit copy keeps them one tensor (as the base's
    files have them), and the float32 model that goes on to evaluate stays float32."""
    from fasttune.train.runner import save_16bit
    from fixtures.tiny_models import tiny_config

    config = tiny_config("llama", load_tokenizer("smollm2"))
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    save_16bit(model, tmp_path, "bfloat16")
    saved = _weights(tmp_path)
    assert "lm_head.weight" not in saved and "model.embed_tokens.weight" in saved
    assert next(model.parameters()).dtype == torch.float32
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.dtype == torch.bfloat16 and reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
