"""What ``fasttune.FastLanguageModel``'s saving calls refuse, and how they save a model without LoRA.

Unsloth's ``save_pretrained_merged`` / ``save_pretrained_gguf`` / ``push_to_hub_*`` names
(fasttune/unsloth_api/): each refusal names the value before anything is written; a save never
replaces what it did not write; Unsloth's loading arguments fasttune cannot honour are refused by
name; a chat template of no known format gets no Modelfile; full fine-tuning saves the whole model.
The notebooks these calls come from are ported in tests/test_unsloth_notebooks.py.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import gguf
import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hub_constants
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GPT2Config

from fasttune.errors import UserError
from fixtures.fake_hub import TOKEN, online
from fixtures.real_tokenizers import load_tokenizer
from fixtures.tiny_models import build_tiny_model

pytestmark = pytest.mark.slow

PROBE = "What is the capital of France? Paris."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return {"mistral": build_tiny_model("mistral", load_tokenizer("mistral"), tmp_path_factory.mktemp("saving") / "mistral-7b-v0.3")}


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        return model(ids, use_cache=False).logits[0].float()


def test_refusals_name_the_value_before_anything_is_written(tiny, tmp_path, monkeypatch, fake_hub):
    monkeypatch.chdir(tmp_path)
    from fasttune import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny["mistral"]), max_seq_length=128)
    model = FastLanguageModel.get_peft_model(model, r=8)
    refusals = [  # (call, what the message says, literally)
        (lambda: model.save_pretrained_merged("out", tokenizer, save_method="nvfp4"), "save_method = 'nvfp4': is one of Unsloth's compressed"),
        (lambda: model.save_pretrained_merged("out", tokenizer, save_method="merged16"), "did you mean `merged_16bit`?"),
        (lambda: model.save_pretrained_merged("out"), "tokenizer = (missing): save_pretrained_merged writes the tokenizer"),
        (lambda: model.save_pretrained_merged("out", tokenizer, maximum_memory_usage=0.5, imatrix_file=True),
         "save_pretrained_merged = ['imatrix_file']: are arguments fasttune does not take"),
        (lambda: model.save_pretrained_gguf("out", tokenizer, quantization_method="iq2_xxs"), "'iq2_xxs': is a llama.cpp quantization"),
        (lambda: model.save_pretrained_gguf("out", tokenizer, quantization_method="q8"), "did you mean `q8_0`?"),
        (lambda: model.save_pretrained_gguf("out", None), "tokenizer = (missing): save_pretrained_gguf writes"),
        (lambda: model.push_to_hub_merged("me/out", tokenizer), "token = (missing): push_to_hub_merged uploads"),
    ]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no `hf auth login` token either
    for call, said in refusals:
        with online(), pytest.raises(UserError, match=re.escape(said)):
            call()
    trainer_output = tmp_path / "outputs"
    (trainer_output / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(UserError, match=r"holds checkpoint-2/, which no fasttune save wrote"):
        model.save_pretrained_merged(trainer_output, tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"] and fake_hub == []
    assert [p.name for p in trainer_output.iterdir()] == ["checkpoint-2"]

    assert hub_constants.HF_HUB_OFFLINE  # the tests' offline mode: nothing is even tried
    with pytest.raises(UserError, match=re.escape("push_to_hub_gguf = 'HF_HUB_OFFLINE': offline mode is on")):
        model.push_to_hub_gguf("me/out", tokenizer, token=TOKEN)
    assert fake_hub == []


def test_a_save_never_deletes_what_it_did_not_write(tiny, tmp_path, monkeypatch):
    """A save replaces its folder whole: only a folder a save wrote (its record lists every file),
    never one with other files in it, never the base or the adapter the model was loaded from."""
    monkeypatch.chdir(tmp_path)
    from fasttune import FastLanguageModel

    base = tmp_path / "base"
    shutil.copytree(tiny["mistral"], base)
    model, tokenizer = FastLanguageModel.from_pretrained(str(base), max_seq_length=128, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=8)
    model.save_pretrained_merged("lora_model", tokenizer, save_method="lora")
    model.save_pretrained_merged("lora_model", tokenizer, save_method="lora")  # a notebook cell run again
    assert (tmp_path / "lora_model" / "adapter_model.safetensors").is_file()

    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "config.json").write_text("{}")
    (notes / "notes.txt").write_text("my notes")
    with pytest.raises(UserError, match=r"holds config.json, notes.txt, which no fasttune save wrote"):
        model.save_pretrained_merged(notes, tokenizer, save_method="lora")
    assert sorted(p.name for p in notes.iterdir()) == ["config.json", "notes.txt"]

    before = sorted(p.name for p in base.iterdir())
    with pytest.raises(UserError, match="is the folder this model was loaded from"):
        model.save_pretrained_merged(str(base), tokenizer)
    assert sorted(p.name for p in base.iterdir()) == before

    reloaded, tokenizer = FastLanguageModel.from_pretrained("lora_model", max_seq_length=128, load_in_4bit=False)
    with pytest.raises(UserError, match="is the folder this model was loaded from"):
        reloaded.save_pretrained_merged("lora_model", tokenizer)
    assert (tmp_path / "lora_model" / "adapter_model.safetensors").is_file()


def test_unsloth_only_loading_arguments_are_refused_by_name_where_fasttune_cannot_honour_them(tiny):
    from fasttune import FastLanguageModel

    with pytest.raises(UserError) as caught:
        FastLanguageModel.from_pretrained(str(tiny["mistral"]), load_in_8bit=True, fast_inference=True, max_lora_rank=32)
    text = str(caught.value)
    assert "from_pretrained(load_in_8bit=...) = True: is not supported: 8-bit LoRA" in text
    assert "from_pretrained(fast_inference=...) = True: is not supported: vLLM" in text and "max_lora_rank" not in text
    with pytest.raises(UserError, match=r"from_pretrained = \['load_in_3bit'\]: are not arguments fasttune understands"):
        FastLanguageModel.from_pretrained(str(tiny["mistral"]), load_in_3bit=True)


def test_a_chat_template_in_no_known_format_gets_no_modelfile(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    from fasttune import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny["mistral"]), max_seq_length=128)
    model = FastLanguageModel.get_peft_model(model, r=8)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    written = model.save_pretrained_gguf("plain", tokenizer, quantization_method="quantized")
    assert written["modelfile_location"] is None and written["gguf_files"] == ["plain_gguf/mistral-7b-v0.3.Q4_K_M.gguf"]
    assert sorted(p.name for p in Path("plain_gguf").iterdir()) == ["mistral-7b-v0.3.Q4_K_M.gguf"]
    assert "no Modelfile written: the tokenizer's chat template speaks none of fasttune's formats (chatml, gemma" in capsys.readouterr().out
    reader = gguf.GGUFReader(Path(written["gguf_files"][0]))
    assert reader.get_field("tokenizer.chat_template").contents() == tokenizer.chat_template  # the GGUF still carries it
    # A publisher's own template in a format fasttune knows ([INST] turns): the Modelfile is Mistral's.
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                               "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    written = model.save_pretrained_gguf("publisher", tokenizer, quantization_method="q8_0")
    modelfile = Path(written["modelfile_location"]).read_text()
    assert "[INST]" in modelfile and 'PARAMETER stop "</s>"' in modelfile


def test_models_without_lora(tiny, tmp_path, monkeypatch):
    """Full fine-tuning: merged_16bit writes the model itself in 16 bits; lora has nothing to save.
    A 4-bit model without LoRA has nothing trained to merge; a GPT-2 has no GGUF export in fasttune."""
    monkeypatch.chdir(tmp_path)
    from fasttune import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny["mistral"]), max_seq_length=128, full_finetuning=True)
    model.save_pretrained_merged("full", tokenizer)
    saved = AutoModelForCausalLM.from_pretrained("full", dtype=torch.float32)
    with safe_open("full/model.safetensors", framework="pt") as reader:
        assert {reader.get_slice(k).get_dtype() for k in reader.keys()} == {"BF16"}
    torch.testing.assert_close(logits(saved, tokenizer), logits(model.to(torch.bfloat16).float(), tokenizer))
    with pytest.raises(UserError, match="save_method = 'lora': this model has no LoRA adapter"):
        model.save_pretrained_merged("adapter", tokenizer, save_method="lora")

    quantized, tokenizer = FastLanguageModel.from_pretrained(str(tiny["mistral"]), max_seq_length=128)
    with pytest.raises(UserError, match="is quantized and has no LoRA"):
        quantized.save_pretrained_gguf("gguf", tokenizer)

    gpt2 = tmp_path / "gpt2"
    tokenizer = load_tokenizer("smollm2")
    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=1, n_head=2)).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    model, tokenizer = FastLanguageModel.from_pretrained(str(gpt2), load_in_4bit=False)
    with pytest.raises(UserError, match="model = 'gpt2': fasttune writes GGUF for the families gemma2, llama"):
        model.save_pretrained_gguf("gguf", tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "gpt2"]
