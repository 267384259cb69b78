"""The engine: fasttune.FastLanguageModel on the hf backend, the auto backend's choice and its
reasons, Unsloth failing to import, and the fast-path check (Unsloth's summary line, the settings
that lose it). Unsloth itself runs in tests/test_unsloth_glue.py (a separate process)."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasttune import config, machine
from fasttune.errors import UserError
from fasttune.families import FAMILIES
from fasttune.families.base import LLAMA_STYLE_TARGETS as FUSED_TARGETS
from fasttune.machine import fast_path_losses
from fasttune.model.fast_path import UNSLOTH_LOGGER, capture_summary, parse_summary, report_from_messages
from fixtures.tiny_models import build_tiny_model
from fixtures.real_tokenizers import load_tokenizer
from fixtures.unsloth_cpu import REPO, env_without_unsloth

MISTRAL = FAMILIES["mistral"]


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory) -> Path:
    return build_tiny_model("mistral", load_tokenizer("mistral"), tmp_path_factory.mktemp("engine") / "mistral")


# -- auto: which backend, and the reason given ------------------------------------------------------

def choose(wanted="auto", cuda=True, installed=True, family=MISTRAL, full=False, on_gpu=None):
    return machine.choose_backend(wanted, "backend", on_gpu=cuda if on_gpu is None else on_gpu, cuda=cuda,
                                  unsloth_installed=installed, family=family, full=full)


def test_auto_takes_unsloth_only_with_cuda_unsloth_and_a_supported_family():
    assert choose() == ("unsloth", "CUDA + Unsloth installed + supported family")
    assert choose(installed=False) == ("hf", "Unsloth is not installed (pip install 'fasttune[unsloth]' -c constraints.txt)")
    assert choose(cuda=False) == ("hf", "no CUDA device")
    assert choose(cuda=True, on_gpu=False) == ("hf", "--cpu was given")
    assert choose(family=FAMILIES["phi3"]) == ("hf", "Unsloth's fused path does not support family phi3")
    assert choose(family=None)[1] == "fasttune has no family for this model type, so Unsloth support is unknown"
    assert choose(full=True) == ("hf", "full fine-tuning runs on the hf backend")
    # The first reason is the one a user can act on first: no GPU beats a missing install.
    assert choose(cuda=False, installed=False) == ("hf", "no CUDA device")


def test_explicit_backends():
    assert choose("hf") == ("hf", "backend=hf")
    assert choose("unsloth", cuda=False) == ("unsloth", "backend=unsloth; no CUDA device, so Unsloth's CPU fallback")
    with pytest.raises(UserError, match="backend = 'unsloth': cannot run here: Unsloth is not installed"):
        choose("unsloth", installed=False)


def test_recipe_plan_carries_the_choice_and_its_reason():
    recipe = config.resolve("mistral_qlora")
    gpu = machine.MachineFacts(True, "NVIDIA A100", 80.0, True, "test", unsloth_installed=True)
    turing = machine.MachineFacts(True, "Tesla T4", 15.0, False, "test", unsloth_installed=False)
    assert machine.plan(recipe, gpu).summary().startswith(
        "backend unsloth (CUDA + Unsloth installed + supported family); dtype bfloat16 (NVIDIA A100 supports bf16)")
    t4 = machine.plan(recipe, turing)
    assert (t4.backend, t4.dtype, t4.dtype_reason) == ("hf", "float16", "Tesla T4 has no bf16 (pre-Ampere)")


FAKE_UNSLOTH = 'raise ImportError("Unsloth: your NVIDIA driver is too old (found 470, need 525)")\n'


@pytest.fixture
def raising_unsloth(tmp_path, monkeypatch) -> Path:
    """An ``unsloth`` package whose import raises, as a broken install does."""
    (tmp_path / "unsloth").mkdir()
    (tmp_path / "unsloth" / "__init__.py").write_text(FAKE_UNSLOTH)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "unsloth", raising=False)
    return tmp_path


def test_auto_falls_back_when_unsloth_raises(raising_unsloth):
    from fasttune.prepare import plan_machine

    recipe = config.resolve("mistral_qlora")
    gpu = machine.MachineFacts(True, "NVIDIA A100", 80.0, True, "test", unsloth_installed=True)
    assert machine.plan(recipe, gpu).backend == "unsloth"
    plan = plan_machine(recipe, gpu, training=True)
    reason = "Unsloth raised ImportError: Unsloth: your NVIDIA driver is too old (found 470, need 525)"
    assert (plan.backend, plan.backend_reason, plan.attention) == ("hf", reason, "sdpa")
    assert any(f"falling back to hf: {reason}" in note for note in plan.notes)


def test_named_unsloth_that_raises_is_refused_with_the_reason(raising_unsloth, tmp_path):
    """From the command line: exit 2, the error named, no traceback, before any weights load."""
    result = subprocess.run([sys.executable, "-m", "fasttune", "recipe", "demo", "model.backend=unsloth",
                             f"train.output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120,
                            env=env_without_unsloth(raising_unsloth), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "model.backend = 'unsloth': cannot be used: Unsloth raised ImportError: Unsloth: your NVIDIA driver is too old" in result.stderr
    assert "fix: use model.backend=auto or model.backend=hf" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# -- the fast-path check --------------------------------------------------------------------------

SUMMARY = "Unsloth 2026.10.9 patched 32 layers with 32 QKV layers, 32 O layers and 32 MLP layers."


def test_summary_line_is_parsed():
    taken = parse_summary(SUMMARY)
    assert (taken.layers, taken.qkv, taken.o, taken.mlp, taken.fused) == (32, 32, 32, 32, True)
    assert taken.describe() == "fast path taken: 32/32 QKV, 32/32 O, 32/32 MLP layers fused"
    skipped = parse_summary("Unsloth 2026.10.9 patched 28 layers with 0 QKV layers, 0 O layers and 0 MLP layers. "
                            "The fused LoRA kernels were skipped because bias = 'all', which is why the counts are zero.")
    assert not skipped.fused
    assert skipped.describe().startswith("SLOW PATH: 0/28 QKV, 0/28 O, 0/28 MLP layers fused (The fused LoRA kernels were skipped because bias = 'all'")
    assert parse_summary("Unsloth: Will map <|im_end|> to EOS") is None


def test_summary_is_captured_from_unsloths_logger():
    with capture_summary() as messages:
        logging.getLogger(UNSLOTH_LOGGER).warning(SUMMARY)
        logging.getLogger("somebody.else").warning("patched 1 layers with 0 QKV layers, 0 O layers and 0 MLP layers")
    assert report_from_messages(messages, cpu_fallback=False).fused
    assert report_from_messages([], cpu_fallback=True).describe() == \
        "fast path not reported (Unsloth's CPU fallback: stock PEFT, no fused kernels)"
    assert report_from_messages([], cpu_fallback=False).layers is None


def test_settings_that_lose_the_fast_path_are_named(monkeypatch):
    assert fast_path_losses(FUSED_TARGETS, 0.0, "none", "bfloat16") == []
    losses = fast_path_losses(["q_proj", "v_proj"], 0.0, "lora_only", "float32")
    assert losses == [
        "lora.target_modules lacks k_proj, o_proj, gate_proj, up_proj, down_proj: the fused kernels need LoRA on all of "
        "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
        "lora.bias=lora_only: the fused kernels need bias none",
        "model.dtype=float32: the fused kernels need a 16-bit base (bfloat16 or float16)",
    ]
    # unsloth 2026.10.9 fuses dropout too, unless told not to.
    assert fast_path_losses(FUSED_TARGETS, 0.05, "none", "float16") == []
    monkeypatch.setenv("UNSLOTH_FUSED_LORA_DROPOUT", "0")
    assert fast_path_losses(FUSED_TARGETS, 0.05, "none", "float16") == [
        "lora.lora_dropout=0.05: with UNSLOTH_FUSED_LORA_DROPOUT=0 the fused kernels need dropout 0"]


def test_recipe_settings_that_lose_the_fast_path_are_noted_before_loading():
    gpu = machine.MachineFacts(True, "NVIDIA A100", 80.0, True, "test", unsloth_installed=True)
    recipe = config.resolve("mistral_qlora", ["lora.bias=all", "lora.target_modules=[q_proj,v_proj]"])
    noted = [n for n in machine.plan(recipe, gpu).notes if n.startswith("Unsloth's fused fast path will be skipped")]
    assert len(noted) == 2 and "lora.target_modules lacks k_proj" in noted[0] and "lora.bias=all" in noted[1]
    assert not [n for n in machine.plan(config.resolve("mistral_qlora"), gpu).notes if "fast path" in n]
    fp32 = config.resolve("mistral_qlora", ["model.dtype=float32"])
    assert any("model.dtype=float32" in n for n in machine.plan(fp32, gpu).notes)


# -- FastLanguageModel on the hf backend ----------------------------------------------------------

def test_fast_language_model_qlora_on_the_hf_backend(tiny_mistral, tmp_path, capsys):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from fasttune import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_mistral), max_seq_length=128)
    said = capsys.readouterr().out
    assert "fasttune: backend hf (no CUDA device); dtype float32 (no CUDA device" in said
    engine = FastLanguageModel.engine(model)
    assert (engine.backend, engine.dtype, engine.attention, engine.fast_path) == ("hf", "float32", "sdpa", None)
    assert model.is_loaded_in_4bit and model.max_seq_length == 128
    four_bit = model.model.layers[0].self_attn.q_proj.weight
    assert four_bit.quant_state.quant_type == "nf4" and four_bit.quant_state.nested  # double quant
    assert tokenizer.pad_token not in (None, tokenizer.eos_token)

    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3407)
    assert FastLanguageModel.engine(model) is engine
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    adapted = {n.split(".")[-4] for n in lora}
    assert adapted == set(FUSED_TARGETS)  # Unsloth's default: all seven projections
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    rows = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(8)]
    trainer = SFTTrainer(model=model, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         args=SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                                        learning_rate=1e-2, use_cpu=True, bf16=False, report_to="none",
                                        save_strategy="no", logging_steps=1, warmup_steps=0))
    trainer.train()
    after = dict(model.named_parameters())
    assert all(not torch.equal(lora[n], after[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in trainer.state.log_history if "loss" in r)

    # Same seed, same adapter initialisation: random_state is honoured.
    again, _ = FastLanguageModel.from_pretrained(str(tiny_mistral), max_seq_length=128)
    again = FastLanguageModel.get_peft_model(again, r=8, lora_alpha=16, random_state=3407)
    initial = {n: p for n, p in again.named_parameters() if p.requires_grad}
    assert all(torch.equal(lora[n], initial[n]) for n in lora)


def test_fast_language_model_refuses_mistakes(tiny_mistral, tmp_path):
    from fasttune import FastLanguageModel

    with pytest.raises(UserError, match="backend = 'turbo': must be one of auto, unsloth, hf"):
        FastLanguageModel.from_pretrained(str(tiny_mistral), backend="turbo")
    with pytest.raises(UserError, match="dtype = 'int8'"):
        FastLanguageModel.from_pretrained(str(tiny_mistral), dtype="int8")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"model_type": "mistral"}')
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match="holds only pickled weights"):
        FastLanguageModel.from_pretrained(str(pickled))
    with pytest.raises(UserError, match="was not loaded by fasttune.FastLanguageModel"):
        FastLanguageModel.get_peft_model(torch.nn.Linear(2, 2))


def test_importing_fasttune_does_not_import_torch():
    code = "import sys, fasttune; assert 'torch' not in sys.modules; fasttune.FastLanguageModel; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    # The class itself is torch-free until from_pretrained runs.
    assert result.stdout.strip() == "False"


def test_liger_is_applied_on_cuda_only_and_only_when_installed(tmp_path, monkeypatch):
    from fasttune.model.backends import hf

    model = torch.nn.Linear(2, 2)
    assert hf.apply_liger(model, "cpu") is None  # Triton needs a GPU driver
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not installed
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    assert hf.apply_liger(model, "cuda") is None
    package = tmp_path / "liger_kernel"
    (package / "transformers").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "transformers" / "__init__.py").write_text(
        "applied = []\ndef _apply_liger_kernel_to_instance(model):\n    applied.append(model)\n")
    monkeypatch.delitem(sys.modules, "liger_kernel")
    monkeypatch.delitem(sys.modules, "liger_kernel.transformers")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert hf.apply_liger(model, "cuda").startswith("Liger (")
    assert sys.modules["liger_kernel.transformers"].applied == [model]


def test_dry_run_names_settings_that_would_cost_the_fast_path_on_the_card(tmp_path):
    """Without a GPU, --dry-run shows what the recipe's card would do, fast-path notes included
    (Unsloth is found, not imported: a dry run imports nothing of it)."""
    (tmp_path / "unsloth").mkdir()
    (tmp_path / "unsloth" / "__init__.py").write_text('raise RuntimeError("a dry run must not import Unsloth")\n')
    result = subprocess.run([sys.executable, "-m", "fasttune", "recipe", "mistral_qlora", "--dry-run", "lora.bias=all"],
                            capture_output=True, text=True, timeout=300, env=env_without_unsloth(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "it would use: backend unsloth (CUDA + Unsloth installed + supported family)" in result.stdout
    assert "note there: Unsloth's fused fast path will be skipped: lora.bias=all: the fused kernels need bias none" in result.stdout
