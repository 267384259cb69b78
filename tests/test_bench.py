"""The bench harness's plumbing on a tiny model: both sides run in their own processes on the same
examples, tokens are counted from what the model was fed, and the three report files appear.
(Speed figures come from bench/cpu.sh and bench/gpu.sh runs, never from a test.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fasttune import config
from fasttune.side_by_side import harness, random_model
from fasttune.side_by_side.side import Meter
from fasttune.errors import UserError
from fixtures.tiny_models import build_tiny_model
from fixtures.real_tokenizers import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_tokens_are_counted_from_what_the_model_receives():
    meter = Meter(cuda=False)
    meter.training = True
    ids = torch.ones(2, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 7, 7], [-100, 7, -100, -100, -100]])
    meter.hook(None, (), {"input_ids": ids, "attention_mask": mask, "labels": labels})
    meter.hook(None, (), {"input_ids": torch.ones(1, 6, dtype=torch.long), "labels": torch.full((1, 6), 3)})  # padding-free row
    meter.training = False
    meter.hook(None, (), {"input_ids": ids, "attention_mask": mask, "labels": labels})  # evaluation: not counted
    assert meter._batch == [4 + 6, 7 + 6, 10 + 6]  # trained, real (non-padding), total


def test_steps_cap_the_examples_and_warmup_must_leave_steps():
    recipe = config.resolve("demo")  # batch 4, accumulation 1
    assert harness.examples_to_train(recipe, harness.BenchRequest("demo", examples=100, steps=5)) == 20
    assert harness.examples_to_train(recipe, harness.BenchRequest("demo", examples=100)) == 100
    with pytest.raises(UserError, match="not more than the 2 warm-up steps"):
        harness.examples_to_train(recipe, harness.BenchRequest("demo", examples=8, warmup=2))


def test_random_init_architectures_and_byte_level_tokenizer():
    recipe = config.resolve("mistral_qlora")
    assert random_model.architecture(recipe)["hidden_size"] == 4096
    with pytest.raises(UserError, match="has no architecture config shipped with fasttune"):
        random_model.architecture(config.resolve("mistral_qlora", ["model.name=someone/unknown-7b"]))
    tokenizer = random_model.byte_level_tokenizer(recipe)
    chat = [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "hi"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids("[INST]") in ids and tokenizer.convert_tokens_to_ids("</s>") in ids


def bench_tiny(tmp_path: Path, rows: int, examples: int, packing: bool) -> dict:
    """The demo recipe's bench on a tiny llama and generated chat data."""
    model = build_tiny_model("llama", load_tokenizer("smollm2"), tmp_path / "model")
    data = tmp_path / "chat.jsonl"
    subprocess.run([sys.executable, str(REPO / "bench" / "chat_data.py"), str(data), "--rows", str(rows)], check=True, capture_output=True)
    request = harness.BenchRequest("demo", examples=examples, warmup=1, out=tmp_path / "out",
                                   overrides=[f"model.name={model}", f"data.path={data}", "data.eval_fraction=0.1",
                                              "train.max_length=128", f"train.packing={str(packing).lower()}"])
    return harness.run_bench(request, Console(quiet=True))


@pytest.mark.slow
def test_both_sides_run_and_the_report_is_written(tmp_path):
    results = bench_tiny(tmp_path, rows=80, examples=24, packing=True)
    out = tmp_path / "out"
    assert {"results.json", "report.md", "bench.png"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "results.json").read_text())
    vanilla, fast = saved["vanilla"], saved["fasttune"]
    assert vanilla["settings"]["packing"] is False and fast["settings"]["packing"] is True
    assert vanilla["settings"]["examples"] == fast["settings"]["examples"] == 24
    # Same examples: the same tokens are trained on both sides, packed or not.
    assert sum(vanilla["trained_tokens"]) == sum(fast["trained_tokens"])
    # Packed bins leave a little padding at row ends; padding each batch to its longest row leaves more.
    padding = {side: 1 - sum(d["real_tokens"]) / sum(d["total_tokens"]) for side, d in (("f", fast), ("v", vanilla))}
    assert padding["f"] < padding["v"]
    assert saved["loss_agreement"]["mode"] == "eval loss"
    assert results["ratios"] and "trained" in (out / "report.md").read_text().lower()


@pytest.mark.slow
def test_without_packing_both_sides_lose_the_same_on_the_same_batches(tmp_path):
    results = bench_tiny(tmp_path, rows=40, examples=16, packing=False)
    agreement = results["loss_agreement"]
    assert agreement["mode"] == "same batches" and agreement["ok"], agreement
    assert agreement["max_rel_diff"] < 1e-5  # the same pipeline on a CPU: equal to float32 rounding
    losses = [results[side]["losses"] for side in ("fasttune", "vanilla")]
    assert len(losses[0]) == len(losses[1]) == 4


def test_random_model_is_reused_rebuilt_or_refused_by_what_built_it(tmp_path):
    recipe = config.resolve("mistral_qlora")
    tiny = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "intermediate_size": 64, "vocab_size": 300}
    folder = random_model.build_random_model(recipe, tmp_path / "model", force_cpu=True, shapes=tiny)
    weights = next(folder.glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    assert random_model.build_random_model(recipe, folder, force_cpu=True, shapes=tiny) == folder
    assert weights.stat().st_mtime_ns == stamp, "the same model is reused, not rebuilt"
    random_model.build_random_model(recipe, folder, force_cpu=True, shapes={**tiny, "intermediate_size": 96})
    assert json.loads((folder / "config.json").read_text())["intermediate_size"] == 96
    assert not (tmp_path / "model.partial").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="was not written by fasttune's random-model builder"):
        random_model.build_random_model(recipe, foreign, force_cpu=True, shapes=tiny)
    assert (foreign / "notes.txt").read_text() == "keep me"
