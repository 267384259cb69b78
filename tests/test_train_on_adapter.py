"""``model.adapter``: a run trains on from an adapter someone already has (a fasttune run folder, a
PEFT adapter folder), with the adapter's own LoRA settings, on both backends and in 4 bit.

The first run is ``demo`` on a tiny real-architecture llama (2 steps); the runs after it start from
its adapter. With ``train.learning_rate=0`` the adapter a run saves is the one it started from.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fasttune import machine, prepare
from fasttune.errors import UserError
from fixtures.real_tokenizers import load_tokenizer
from fixtures.tiny_models import build_tiny_model, write_chat_jsonl
from fixtures.unsloth_cpu import env_with_unsloth

pytestmark = pytest.mark.slow


def fasttune(*argv, cwd: Path, env: dict | None = None, code: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "fasttune", *map(str, argv)], capture_output=True, text=True, timeout=600,
                            cwd=cwd, env=env)
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def common(base: Path, data: Path, run_dir: Path) -> list[str]:
    return [f"model.name={base}", f"data.path={data}", "eval.task=null", "export.merged=false", "export.gguf=[]",
            f"train.output_dir={run_dir}", "train.max_steps=2", "train.logging_steps=1", "train.save_strategy=no",
            "train.warmup_steps=0", "train.per_device_train_batch_size=2"]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A finished LoRA run with LoRA on q_proj and v_proj only (the demo's default: all seven) to train on from."""
    root = tmp_path_factory.mktemp("adapter")
    base = build_tiny_model("llama", load_tokenizer("smollm2"), root / "base")
    data = root / "chat.jsonl"
    write_chat_jsonl(data, 8)
    run_dir = root / "first"
    fasttune("recipe", "demo", *common(base, data, run_dir), "lora.target_modules=[q_proj,v_proj]", "train.learning_rate=1e-2",
             cwd=root)
    return root, base, data, run_dir


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_adapter(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=1e-7, rtol=0), name


def test_learning_rate_zero_saves_the_adapter_it_started_from(first):
    root, base, data, run_dir = first
    run, start = root / "again", root / "start"
    shutil.copytree(run_dir, start)  # named by a relative path, then deleted before the export below
    out = fasttune("recipe", "demo", *common(base, data, run), "model.adapter=start", "train.learning_rate=0", cwd=root)
    started = adapter_tensors(run_dir / "adapter")
    assert any("lora_B" in n and t.abs().sum() > 0 for n, t in started.items())  # it had trained: B is not zero
    assert_same_adapter(adapter_tensors(run / "adapter"), started)
    # The adapter's own targets, not the family's default the demo would take (all seven projections).
    lora = yaml.safe_load((run / "config.yaml").read_text())["lora"]
    assert (lora["r"], lora["lora_alpha"], sorted(lora["target_modules"])) == (16, 32, ["q_proj", "v_proj"])
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], sorted(saved["target_modules"])) == (16, 32, ["q_proj", "v_proj"])
    assert "model.adapter:" not in out.stdout  # same base: no note
    assert "adapter training on from " + str(start) in out.stdout
    assert "train.learning_rate=0: no weight will change" in out.stdout
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["adapter"] == str(start)  # absolute
    assert f"| trained on from | `{start}` |" in (run / "report.md").read_text()
    # The run's own adapter/ is what is exported: the one it started from is not needed any more.
    shutil.rmtree(start)
    fasttune("export", run, "--merged", cwd=root.parent)
    assert (run / "merged" / "config.json").is_file()


def test_training_goes_on_from_the_adapter_weights(first):
    """In one process: the model handed to SFTTrainer holds the adapter's weights, trainable, and
    the base's weights frozen; a run with a learning rate then moves them."""
    from rich.console import Console

    from fasttune.train import runner

    root, base, data, run_dir = first
    recipe = prepare.resolve("demo", [*common(base, data, root / "inproc"), f"model.adapter={run_dir / 'adapter'}",
                                      "train.learning_rate=1e-2"])
    plan = prepare.plan_machine(recipe, machine.detect(), force_cpu=True)
    session = runner.setup(prepare.prepare(recipe, plan, root / "inproc"), Console(quiet=True))
    started = adapter_tensors(run_dir / "adapter")
    model = session.trainer.model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(started) and all("lora_" in n for n in trainable)
    for name, tensor in started.items():
        live = dict(model.named_parameters())[name.replace(".weight", ".default.weight")]
        assert torch.equal(live.detach(), tensor), name
    runner.train(session)
    runner.save(session)
    moved = adapter_tensors(root / "inproc" / "adapter")
    assert any(not torch.equal(moved[n], started[n]) for n in started if "lora_B" in n)


def test_a_peft_folder_on_another_copy_of_the_base_is_a_note_and_trains_in_4_bit(first):
    root, base, data, run_dir = first
    peft_folder, other_base = root / "peft-adapter", root / "base-copy"
    shutil.copytree(run_dir / "adapter", peft_folder)
    shutil.copytree(base, other_base)
    run = root / "qlora"
    out = fasttune("recipe", "demo", *common(other_base, data, run), "method=qlora", f"model.adapter={peft_folder}",
                   "train.learning_rate=0", cwd=root)
    assert f"model.adapter: {peft_folder} was trained on" in out.stdout and f"this run loads {other_base}" in out.stdout
    assert_same_adapter(adapter_tensors(run / "adapter"), adapter_tensors(run_dir / "adapter"))


def test_unsloth_backend_trains_on_from_the_adapter(first):
    root, base, data, run_dir = first
    run = root / "unsloth"
    out = fasttune("recipe", "demo", *common(base, data, run), "model.backend=unsloth", f"model.adapter={run_dir}",
                   "train.learning_rate=0", cwd=root, env=env_with_unsloth())
    assert "engine backend unsloth" in out.stdout
    assert_same_adapter(adapter_tensors(run / "adapter"), adapter_tensors(run_dir / "adapter"))


def problems_of(*overrides: str) -> list[str]:
    with pytest.raises(UserError) as caught:
        prepare.resolve("demo", list(overrides))
    return [p.render() for p in caught.value.problems]


def test_lora_settings_that_contradict_the_adapter_are_listed(first):
    root, base, data, run_dir = first
    found = problems_of(*common(base, data, root / "x"), f"model.adapter={run_dir}", "lora.r=4", "lora.lora_alpha=8",
                        "lora.target_modules=[k_proj,q_proj]")
    text = "\n".join(found)
    assert len(found) == 3, text
    assert "lora.r = 4: contradicts the adapter, whose adapter_config.json says 16" in text and "set lora.r=16," in text
    assert "lora.lora_alpha = 8: contradicts the adapter" in text and "set lora.lora_alpha=32," in text
    assert "lora.target_modules = ['k_proj', 'q_proj']: contradicts the adapter" in text
    # null takes the adapter's value; the same targets in another order agree.
    recipe = prepare.resolve("demo", [*common(base, data, root / "x"), f"model.adapter={run_dir}", "lora.r=null",
                                      "lora.target_modules=[v_proj,q_proj]"])
    assert recipe.lora["r"] == 16 and sorted(recipe.lora["target_modules"]) == ["q_proj", "v_proj"]


def test_bad_adapters_are_refused_before_anything_loads(first, tmp_path):
    root, base, data, run_dir = first
    args = common(base, data, tmp_path / "x")
    assert "model.adapter = '/nowhere/adapter': no such folder" in problems_of(*args, "model.adapter=/nowhere/adapter")[0]
    hub = problems_of(*args, "model.adapter=nobody/no-such-adapter")[0]  # HF_HUB_OFFLINE=1 in the tests
    assert "model.adapter = 'nobody/no-such-adapter': is no local folder, and its adapter_config.json cannot be read" in hub
    typo = problems_of(*args, f"model.adapter={run_dir.parent / 'frist'}")[0]
    assert "no such folder" in typo and f"did you mean `{run_dir}`?" in typo
    assert "is a file, not an adapter folder" in problems_of(*args, f"model.adapter={data}")[0]
    (tmp_path / "empty").mkdir()
    assert "has no adapter_config.json" in problems_of(*args, f"model.adapter={tmp_path / 'empty'}")[0]
    full = [p for p in problems_of(*args, "method=full", f"model.adapter={run_dir}") if p.startswith("model.adapter")]
    assert full and "method full trains every parameter" in full[0]
    result = fasttune("recipe", "demo", *args, f"model.adapter={tmp_path / 'empty'}", cwd=root, code=2)
    assert "Traceback" not in result.stderr and "model.adapter" in result.stderr


def test_a_run_from_an_adapter_resumes_from_its_checkpoint_to_the_same_adapter(first):
    """Stopped after checkpoint-2 (its folder as a kill leaves it), a run that trains on from an
    adapter resumes to the adapter the uninterrupted run saved."""
    root, base, data, run_dir = first
    whole, stopped = root / "whole", root / "stopped"
    args = [*common(base, data, whole)[:-5], "train.max_steps=4", "train.save_steps=2", "train.save_total_limit=3",
            "train.logging_steps=1", "train.learning_rate=1e-2", "train.warmup_steps=0", f"model.adapter={run_dir}"]
    fasttune("recipe", "demo", *args, f"train.output_dir={whole}", cwd=root)
    shutil.copytree(whole, stopped, ignore=shutil.ignore_patterns("checkpoint-4", "adapter", "summary.json", "report.md", "loss.png"))
    (stopped / "config.yaml").write_text((whole / "config.yaml").read_text().replace(str(whole), str(stopped)))
    result = fasttune("recipe", "demo", *args, f"train.output_dir={stopped}", "--resume", stopped, cwd=root)
    assert "checkpoint-2" in result.stdout
    ours, theirs = adapter_tensors(stopped / "adapter"), adapter_tensors(whole / "adapter")
    assert any(not torch.equal(theirs[n], adapter_tensors(run_dir / "adapter")[n]) for n in theirs)  # it trained
    assert_same_adapter(ours, theirs)
    # The stopped folder's metrics.jsonl still held steps 3 and 4 (and the final rows) of the
    # session thrown away: the record keeps each step once.
    rows = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert len([r for r in rows if "train_runtime" in r]) == 1


def test_a_shipped_recipes_lora_settings_give_way_to_the_adapters_and_the_users_own_are_checked(first, tmp_path):
    """demo ships r 16, alpha 32: an adapter of r 8 takes its own; a user's recipe file that says
    r 4 contradicts it, as the command line does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root, base, data, _ = first
    peft_folder = tmp_path / "r8"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "o_proj"], lora_dropout=0.1))
    model.save_pretrained(peft_folder)
    args = [*common(base, data, tmp_path / "x"), f"model.adapter={peft_folder}"]
    recipe = prepare.resolve("demo", args)
    assert (recipe.lora["r"], recipe.lora["lora_alpha"], recipe.lora["lora_dropout"]) == (8, 8, 0.1)
    assert sorted(recipe.lora["target_modules"]) == ["o_proj", "q_proj"]
    mine = tmp_path / "mine.yaml"
    mine.write_text("extends: demo\nlora:\n  r: 4\n")
    with pytest.raises(UserError) as caught:
        prepare.resolve(str(mine), args)
    found = [p.render() for p in caught.value.problems]
    assert len(found) == 1 and "lora.r = 4: contradicts the adapter, whose adapter_config.json says 8" in found[0]
