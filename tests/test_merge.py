"""The streaming merge: merged logits equal the adapter model's (PEFT's), shard by shard.

Tiny models with several checkpoint shards; adapters with random (non-zero) B so every merged
weight really changes. LoRA and rsLoRA, a module trained in full (modules_to_save), a QLoRA
adapter merged into the 16-bit base, refusals, and an interrupted merge leaving nothing behind.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from fasttune.errors import UserError
from fasttune.export import merge
from fixtures.tiny_models import build_tiny_model
from fixtures.real_tokenizers import load_tokenizer

TEXT = "The merged model must answer exactly as the adapter did."


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Mistral saved in several shards (the merge works shard by shard)."""
    root = tmp_path_factory.mktemp("merge")
    single = build_tiny_model("mistral", load_tokenizer("mistral"), root / "single")
    model = AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32)
    sharded = root / "sharded"
    model.save_pretrained(sharded, max_shard_size="1MB")
    AutoTokenizer.from_pretrained(single).save_pretrained(sharded)
    assert len(list(sharded.glob("*.safetensors"))) >= 3 and (sharded / "model.safetensors.index.json").is_file()
    return sharded


def make_adapter(base: Path, out: Path, quantized: bool = False, **lora) -> Path:
    torch.manual_seed(0)
    kwargs = {"dtype": torch.float32}
    if quantized:
        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
                      device_map={"": "cpu"})
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM", **lora)  # random B: the merge must matter
    peft_model = get_peft_model(model, config)
    if lora.get("modules_to_save"):
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "modules_to_save" in name:
                    param.add_(torch.randn_like(param) * 0.1)
    peft_model.save_pretrained(out)
    return out


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits[0]


def adapter_logits(base: Path, adapter: Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    return logits(model.eval(), AutoTokenizer.from_pretrained(base))


def merged_logits(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return logits(model.eval(), AutoTokenizer.from_pretrained(path))


@pytest.mark.parametrize("lora", [{}, {"use_rslora": True}, {"modules_to_save": ["lm_head"]}], ids=["lora", "rslora", "modules_to_save"])
def test_merged_logits_equal_the_adapter_models(base, tmp_path, lora):
    adapter = make_adapter(base, tmp_path / "adapter", **lora)
    tokenizer = AutoTokenizer.from_pretrained(base)
    result = merge.merge_adapter(str(base), adapter, tmp_path / "merged", tokenizer, save_dtype="float32")
    assert result.merged_modules == 2 * 7 and result.shards == len(list(base.glob("*.safetensors")))
    assert result.replaced_tensors == (1 if lora.get("modules_to_save") else 0)
    expected = adapter_logits(base, adapter)
    torch.testing.assert_close(merged_logits(result.path), expected, atol=1e-5, rtol=0)
    # ...and the merge really changed the model.
    assert (merged_logits(base) - expected).abs().max() > 1e-2
    index = json.loads((result.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in result.path.glob("*.safetensors")}


def test_bf16_merge_is_16_bit_and_close(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "adapter")
    result = merge.merge_adapter(str(base), adapter, tmp_path / "merged", AutoTokenizer.from_pretrained(base))
    config = json.loads((result.path / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(next(result.path.glob("*.safetensors"))), framework="pt") as reader:
        assert {reader.get_tensor(k).dtype for k in reader.keys()} == {torch.bfloat16}
    expected = adapter_logits(base, adapter)
    diff = (merged_logits(result.path) - expected).abs().max().item()
    assert diff < 0.02 * expected.abs().max().item(), diff  # bf16 rounding of the weights


def test_qlora_adapter_merges_into_the_16_bit_base(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "adapter", quantized=True)
    result = merge.merge_adapter(str(base), adapter, tmp_path / "merged", AutoTokenizer.from_pretrained(base), save_dtype="float32")
    torch.testing.assert_close(merged_logits(result.path), adapter_logits(base, adapter), atol=1e-5, rtol=0)


def test_refusals(base, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(base)
    with pytest.raises(UserError, match="holds no adapter_config.json"):
        merge.merge_adapter(str(base), tmp_path, tmp_path / "out", tokenizer)
    dora = make_adapter(base, tmp_path / "dora", use_dora=True)
    with pytest.raises(UserError, match=r"is not a plain LoRA adapter \(use_dora\)"):
        merge.merge_adapter(str(base), dora, tmp_path / "out", tokenizer)
    quantized = tmp_path / "prequantized"
    quantized.mkdir()
    for f in base.iterdir():
        (quantized / f.name).write_bytes(f.read_bytes())
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "bitsandbytes"}}))
    with pytest.raises(UserError, match=r"is a pre-quantized checkpoint \(bitsandbytes\)"):
        merge.merge_adapter(str(quantized), make_adapter(base, tmp_path / "a"), tmp_path / "out", tokenizer)
    assert not (tmp_path / "out").exists()


def test_an_interrupted_merge_leaves_the_old_output_and_no_debris(base, tmp_path, monkeypatch):
    adapter = make_adapter(base, tmp_path / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "previous.txt").write_text("an earlier, complete merge")
    from safetensors import torch as st

    real, calls = st.save_file, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the second shard
        return real(*args, **kwargs)

    monkeypatch.setattr(st, "save_file", failing)
    with pytest.raises(KeyboardInterrupt):
        merge.merge_adapter(str(base), adapter, out, AutoTokenizer.from_pretrained(base))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]
    assert [p.name for p in out.iterdir()] == ["previous.txt"]
