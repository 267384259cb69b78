"""Three of Unsloth's own notebooks, ported by changing the import to ``from fasttune import FastLanguageModel``.

The training and saving cells of ``Llama3.2_(1B_and_3B)-Conversational``, ``Mistral_v0.3_(7B)-Alpaca``
and ``Qwen3_(14B)`` (github.com/unslothai/notebooks, python_scripts/), in their order and with their
arguments; only sizes shrink (a tiny model of the architecture with its real tokenizer, a few rows,
2 steps on the CPU, ``.to("cuda")`` becomes the model's device). Cells that call
``unsloth.chat_templates`` use the TRL / transformers way instead, said where. Every number is
checked against an independent implementation: PEFT's ``merge_and_unload`` for the merged model,
``gguf.GGUFReader`` and transformers' GGUF loader for the GGUF files. The last test runs the
saving calls on the unsloth backend (its CPU fallback) in a subprocess and proves that fasttune's
replaced Unsloth's: no llama.cpp is cloned, nothing is downloaded. What the saving calls refuse is
tests/test_unsloth_saving_rules.py.
"""
from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import huggingface_hub
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fasttune.errors import UserError
from fasttune.families.chat_templates import get_template
from fixtures.fake_hub import TOKEN, online
from fixtures.gguf_reads import each_gguf_read_once
from fixtures.real_tokenizers import load_tokenizer
from fixtures.tiny_models import build_tiny_model, chat_rows
from fixtures.unsloth_cpu import env_with_unsloth

pytestmark = pytest.mark.slow

T = gguf.GGMLQuantizationType
PROBE = "What is the capital of France? Paris."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("notebooks")
    return {
        "llama": build_tiny_model("llama", load_tokenizer("llama3"), root / "Llama-3.2-3B-Instruct"),
        "mistral": build_tiny_model("mistral", load_tokenizer("mistral"), root / "mistral-7b-v0.3"),
        "qwen3": build_tiny_model("qwen3", load_tokenizer("qwen", "qwen3"), root / "Qwen3-14B"),
    }


@pytest.fixture(scope="module", autouse=True)
def _read_each_gguf_once():
    """One gguf.GGUFReader per file for this module (parsing a 128k-token vocabulary takes seconds):
    transformers' GGUF loader builds one for every read, the checks here one more (as test_gguf_export.py)."""
    with each_gguf_read_once():
        yield


# -- what the notebooks' outputs are checked against ------------------------------------------

def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        return model(ids, use_cache=False).logits[0].float()


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in get_peft_model_state_dict(model).items()}


def assert_reloaded_adapter_is_the_saved_one(model, folder: Path) -> None:
    saved = load_file(str(folder / "adapter_model.safetensors"))
    reloaded = lora_weights(model)
    assert saved and set(reloaded) == set(saved)
    assert all(torch.equal(reloaded[name].cpu(), saved[name]) for name in saved)


def assert_merged_is_peft_merge(merged: Path, base: Path, adapter: Path, tokenizer) -> None:
    """The merged folder loads with AutoModelForCausalLM, is bfloat16 on disk (a CPU run's 16-bit
    dtype), and gives the logits of PEFT's merge_and_unload of the same adapter, rounded the same."""
    with safe_open(str(merged / "model.safetensors"), framework="pt") as reader:
        assert {reader.get_slice(k).get_dtype() for k in reader.keys()} == {"BF16"}
    ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    reference = reference.merge_and_unload()
    with torch.no_grad():  # the weights rounded as the merged ones were (module.to() would round RoPE's buffers too)
        for weight in reference.parameters():
            weight.copy_(weight.to(torch.bfloat16))
    untrained = logits(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tokenizer)
    merged_logits, reference_logits = logits(ours, tokenizer), logits(reference, tokenizer)
    torch.testing.assert_close(merged_logits, reference_logits, atol=1e-5, rtol=1e-5)
    assert (merged_logits - untrained).abs().max() > 1e-2  # the adapter is in there: training changed it


def gguf_tensor_count(path: Path) -> int:
    """The tensor count in a GGUF v3 header (magic, version, tensor count, key count: ggml's gguf.md),
    read without parsing the vocabulary (gguf.GGUFReader takes ~10 s on a 150k-token one on 2 cores)."""
    magic, version, tensors, _ = struct.unpack("<4sIQQ", path.read_bytes()[:24])
    assert (magic, version) == (b"GGUF", 3)
    return tensors


def assert_gguf(path: Path, preset: str, merged: Path, tokenizer=None) -> None:
    """One GGUF tensor per checkpoint tensor, typed as the preset says; with ``tokenizer``, transformers'
    GGUF reader loads it and its logits are the merged model's within Q8_0's rounding."""
    with safe_open(str(merged / "model.safetensors"), framework="pt") as checkpoint:
        assert gguf_tensor_count(path) == len(list(checkpoint.keys()))
    reader = gguf.GGUFReader(path)
    assert len(reader.tensors) == gguf_tensor_count(path)
    types = {t.name: T(t.tensor_type) for t in reader.tensors}
    assert {types[t.name] for t in reader.tensors if len(t.shape) == 1} == {T.F32}  # norms stay float32
    matrices = {types[t.name] for t in reader.tensors if len(t.shape) == 2}
    if preset == "q8_0":
        assert matrices == {T.Q8_0}
    else:  # q4_k_m: K-quants need rows of 256; the tiny model's 64 fall back as llama.cpp's do
        assert reader.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
        assert matrices <= {T.Q4_K, T.Q6_K, T.Q5_0, T.Q8_0} and T.Q5_0 in matrices
    if tokenizer is not None:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        merged_logits = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), tokenizer)
        gguf_logits = logits(loaded, tokenizer)
        torch.testing.assert_close(gguf_logits, merged_logits, atol=0.05 * merged_logits.abs().max().item(), rtol=0)


def assert_modelfile(gguf_dir: Path, gguf_name: str, template: str) -> None:
    text = (gguf_dir / "Modelfile").read_text(encoding="utf-8")
    assert text.startswith(f"FROM ./{gguf_name}\n") and "TEMPLATE" in text
    assert all(stop in text for stop in get_template(template).stop)


def sharegpt(rows: list[dict]) -> list[dict]:
    """chat_rows in FineTome-100k's ShareGPT shape (from human/gpt, value)."""
    who = {"user": "human", "assistant": "gpt", "system": "system"}
    return [{"conversations": [{"from": who[m["role"]], "value": m["content"]} for m in row["messages"]]} for row in rows]


def standardize_sharegpt(example: dict) -> dict:
    """What unsloth.chat_templates.standardize_sharegpt does, the TRL way: TRL's maybe_convert_to_chatml
    renames the keys (from/value -> role/content, conversations -> messages); the roles are renamed here."""
    from trl.data_utils import maybe_convert_to_chatml

    example = maybe_convert_to_chatml(example)
    roles = {"human": "user", "gpt": "assistant"}
    return {"messages": [{**m, "role": roles.get(m["role"], m["role"])} for m in example["messages"]]}


# -- Llama3.2_(1B_and_3B)-Conversational --------------------------------------------------------

def test_llama32_conversational_notebook(tiny, tmp_path, monkeypatch, fake_hub, capsys):
    monkeypatch.chdir(tmp_path)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from fasttune import FastLanguageModel

    max_seq_length = 256  # notebook: 2048
    dtype = None
    load_in_4bit = True
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(tiny["llama"]), max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit)
    model = FastLanguageModel.get_peft_model(
        model, r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth", random_state=3407,
        use_rslora=False, loftq_config=None)

    # get_chat_template(tokenizer, chat_template="llama-3.1"): the transformers way is to set the
    # template; fasttune's Llama 3 template marks the assistant turns ({% generation %}) for TRL.
    tokenizer.chat_template = get_template("llama3").source()

    def formatting_prompts_func(examples):
        convos = examples["messages"]
        texts = [tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=False) for convo in convos]
        return {"text": texts}

    dataset = Dataset.from_list(sharegpt(chat_rows(8)))  # notebook: mlabonne/FineTome-100k
    dataset = dataset.map(standardize_sharegpt, remove_columns=["conversations"])
    assert dataset.map(formatting_prompts_func, batched=True)[5]["text"].startswith("<|begin_of_text|><|start_header_id|>")

    # The notebook trains on "text" with DataCollatorForSeq2Seq, then train_on_responses_only masks
    # the user turns; the TRL way is the conversations themselves with assistant_only_loss=True.
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=dataset,  # Unsloth's SFTTrainer takes tokenizer=
        args=SFTConfig(per_device_train_batch_size=2, gradient_accumulation_steps=1, warmup_steps=0, max_steps=2,
                       learning_rate=1e-2,  # notebook: 2e-4 over 60 steps; 2 steps must move the weights visibly
                       logging_steps=1, optim="adamw_8bit", weight_decay=0.001, lr_scheduler_type="linear", seed=3407,
                       output_dir="outputs", report_to="none", max_length=max_seq_length, packing=False,
                       assistant_only_loss=True, use_cpu=True, bf16=False))  # (the notebook's T4 trains in 16 bit)
    # "We verify masking is actually done": only the assistant replies (and their <|eot_id|>) are trained.
    space = tokenizer(" ", add_special_tokens=False).input_ids[0]
    trained = tokenizer.decode([space if x == -100 else x for x in trainer.train_dataset[5]["labels"]])
    assert trained.split() == ["Tuesday.<|eot_id|>", "Wednesday.<|eot_id|>"]  # chat_rows(8)[5], its replies only
    before = lora_weights(model)
    trainer_stats = trainer.train()
    after = lora_weights(model)
    assert trainer_stats.training_loss > 0
    assert all(not torch.equal(before[n].cpu(), after[n].cpu()) for n in before if "lora_B" in n)

    FastLanguageModel.for_inference(model)
    messages = [{"role": "user", "content": "Continue the fibonacci sequence: 1, 1, 2, 3, 5, 8,"}]
    inputs = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                           return_tensors="pt").to(model.device)
    # transformers 5 returns a BatchEncoding where the notebook's 4.56 returned the ids: **inputs.
    outputs = model.generate(**inputs, max_new_tokens=8, use_cache=True, temperature=1.5, min_p=0.1)
    assert outputs.shape[1] > inputs["input_ids"].shape[1]

    model.save_pretrained("llama_lora")
    tokenizer.save_pretrained("llama_lora")
    model, tokenizer = FastLanguageModel.from_pretrained(model_name="llama_lora", max_seq_length=max_seq_length,
                                                         dtype=dtype, load_in_4bit=load_in_4bit)
    FastLanguageModel.for_inference(model)
    assert_reloaded_adapter_is_the_saved_one(model, Path("llama_lora"))

    model.save_pretrained_merged("llama_finetune_16bit", tokenizer, save_method="merged_16bit")
    assert_merged_is_peft_merge(Path("llama_finetune_16bit"), tiny["llama"], Path("llama_lora"), tokenizer)
    with pytest.raises(UserError, match="save_method = 'merged_4bit': a LoRA merged into 4-bit weights") as refused:
        model.save_pretrained_merged("llama_finetune_4bit", tokenizer, save_method="merged_4bit")
    assert "merged_16bit" in str(refused.value) and not Path("llama_finetune_4bit").exists()

    with online():
        model.push_to_hub_merged("HF_USERNAME/llama_finetune_16bit", tokenizer, save_method="merged_16bit", token=TOKEN)
    made, uploaded = fake_hub
    assert made == {"token": TOKEN, "repo_id": "HF_USERNAME/llama_finetune_16bit", "private": None, "exist_ok": True,
                    "repo_type": "model"}
    assert uploaded["commit_message"] == "Upload model trained with fasttune" and uploaded["create_pr"] is False
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(uploaded["uploaded"])
    assert TOKEN not in capsys.readouterr().out

    model.save_pretrained_gguf("llama_finetune", tokenizer)  # Unsloth's default: fast_quantized, q8_0
    model.save_pretrained_gguf("llama_finetune", tokenizer, quantization_method="q4_k_m")
    gguf_dir = Path("llama_finetune_gguf")
    assert sorted(p.name for p in gguf_dir.iterdir()) == ["Llama-3.2-3B-Instruct.Q4_K_M.gguf",
                                                          "Llama-3.2-3B-Instruct.Q8_0.gguf", "Modelfile"]
    # Q8_0 is read back in the Mistral and Qwen3 ports; here its header (a 128k vocabulary takes long to parse).
    assert gguf_tensor_count(gguf_dir / "Llama-3.2-3B-Instruct.Q8_0.gguf") == 2 * 9 + 3
    assert_gguf(gguf_dir / "Llama-3.2-3B-Instruct.Q4_K_M.gguf", "q4_k_m", Path("llama_finetune"))
    assert_modelfile(gguf_dir, "Llama-3.2-3B-Instruct.Q4_K_M.gguf", "llama3")  # the last save wrote it


# -- Mistral_v0.3_(7B)-Alpaca ---------------------------------------------------------------------

ALPACA = [
    {"instruction": "Give the capital of the country.", "input": "France", "output": "Paris."},
    {"instruction": "Add the numbers.", "input": "2 and 2", "output": "Four."},
    {"instruction": "Name a primary colour.", "input": "", "output": "Blue."},
    {"instruction": "Translate to Spanish.", "input": "hello", "output": "Hola."},
]


def test_mistral_alpaca_notebook(tiny, tmp_path, monkeypatch, fake_hub):
    monkeypatch.chdir(tmp_path)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from fasttune import FastLanguageModel

    max_seq_length = 256  # notebook: 2048
    dtype = None
    load_in_4bit = True
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(tiny["mistral"]), max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit)
    model = FastLanguageModel.get_peft_model(
        model, r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth", random_state=3407,
        use_rslora=False, loftq_config=None)

    alpaca_prompt = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n{}")
    EOS_TOKEN = tokenizer.eos_token

    def formatting_prompts_func(examples):
        texts = [alpaca_prompt.format(instruction, input, output) + EOS_TOKEN
                 for instruction, input, output in zip(examples["instruction"], examples["input"], examples["output"])]
        return {"text": texts}

    dataset = Dataset.from_list(ALPACA)  # notebook: yahma/alpaca-cleaned
    dataset = dataset.map(formatting_prompts_func, batched=True)
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=dataset,
        args=SFTConfig(dataset_text_field="text", max_length=max_seq_length, packing=False,  # SFTTrainer's, in TRL 0.x
                       per_device_train_batch_size=2, gradient_accumulation_steps=1, warmup_steps=0, max_steps=2,
                       learning_rate=1e-2, logging_steps=1, optim="adamw_8bit", weight_decay=0.001,
                       lr_scheduler_type="linear", seed=3407, output_dir="outputs", report_to="none",
                       use_cpu=True, bf16=False))
    before = lora_weights(model)
    trainer.train()
    after = lora_weights(model)
    assert all(not torch.equal(before[n].cpu(), after[n].cpu()) for n in before if "lora_B" in n)

    FastLanguageModel.for_inference(model)
    inputs = tokenizer([alpaca_prompt.format("Continue the fibonnaci sequence.", "1, 1, 2, 3, 5, 8", "")],
                       return_tensors="pt").to(model.device)
    outputs = model.generate(**inputs, max_new_tokens=8, use_cache=True)
    assert tokenizer.batch_decode(outputs)[0].count("### Response:") == 1

    model.save_pretrained("lora_model")
    tokenizer.save_pretrained("lora_model")
    model, tokenizer = FastLanguageModel.from_pretrained(model_name="lora_model", max_seq_length=max_seq_length,
                                                         dtype=dtype, load_in_4bit=load_in_4bit)
    FastLanguageModel.for_inference(model)
    assert_reloaded_adapter_is_the_saved_one(model, Path("lora_model"))

    model.save_pretrained_merged("model", tokenizer, save_method="merged_16bit")
    assert_merged_is_peft_merge(Path("model"), tiny["mistral"], Path("lora_model"), tokenizer)
    model.save_pretrained_merged("lora_again", tokenizer, save_method="lora")
    assert load_file("lora_again/adapter_model.safetensors").keys() == load_file("lora_model/adapter_model.safetensors").keys()
    assert (Path("lora_again") / "tokenizer.json").is_file()

    model.save_pretrained_gguf("model", tokenizer)
    assert_gguf(Path("model_gguf/mistral-7b-v0.3.Q8_0.gguf"), "q8_0", Path("model"), tokenizer)
    assert_modelfile(Path("model_gguf"), "mistral-7b-v0.3.Q8_0.gguf", "mistral")
    model.save_pretrained_gguf("model", tokenizer, quantization_method="q4_k_m")
    assert_gguf(Path("model_gguf/mistral-7b-v0.3.Q4_K_M.gguf"), "q4_k_m", Path("model"))

    # The notebook's push cells pass token = "": refused before any work, with where a token comes from.
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # nor an `hf auth login` token
    with online(), pytest.raises(UserError, match=re.escape("token = (missing): push_to_hub_gguf uploads to the Hugging Face Hub")):
        model.push_to_hub_gguf("hf/model", tokenizer, quantization_method="q5_k_m", token="")
    assert fake_hub == []


# -- Qwen3_(14B) ------------------------------------------------------------------------------------

def test_qwen3_notebook(tiny, tmp_path, monkeypatch, fake_hub):
    monkeypatch.chdir(tmp_path)
    import pandas as pd
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from fasttune import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(tiny["qwen3"]), max_seq_length=2048, load_in_4bit=True, load_in_8bit=False, full_finetuning=False)
    model = FastLanguageModel.get_peft_model(
        model, r=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=32, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth", random_state=3407,
        use_rslora=False, loftq_config=None)

    reasoning_dataset = Dataset.from_list([  # notebook: unsloth/OpenMathReasoning-mini, split "cot"
        {"problem": "Solve x + 2 = 5.", "generated_solution": "<think>Subtract 2.</think>x = 3."},
        {"problem": "What is 3 times 4?", "generated_solution": "<think>Three fours.</think>12."}])
    non_reasoning_dataset = Dataset.from_list(sharegpt(chat_rows(8)))  # notebook: mlabonne/FineTome-100k

    def generate_conversation(examples):
        conversations = [[{"role": "user", "content": problem}, {"role": "assistant", "content": solution}]
                         for problem, solution in zip(examples["problem"], examples["generated_solution"])]
        return {"conversations": conversations}

    # list(...): datasets 4 returns a lazy Column where the notebook's datasets 3 returned the list
    # apply_chat_template takes as a batch.
    reasoning_conversations = tokenizer.apply_chat_template(
        list(reasoning_dataset.map(generate_conversation, batched=True)["conversations"]), tokenize=False)
    dataset = non_reasoning_dataset.map(standardize_sharegpt, remove_columns=["conversations"])
    non_reasoning_conversations = tokenizer.apply_chat_template(list(dataset["messages"]), tokenize=False)
    assert reasoning_conversations[0].startswith("<|im_start|>user\nSolve x + 2 = 5.<|im_end|>")

    chat_percentage = 0.5  # notebook: 0.75 of a much longer chat set
    non_reasoning_subset = pd.Series(non_reasoning_conversations)
    non_reasoning_subset = non_reasoning_subset.sample(int(len(reasoning_conversations) * (1.0 - chat_percentage)),
                                                       random_state=2407)
    data = pd.concat([pd.Series(reasoning_conversations), pd.Series(non_reasoning_subset)])
    data.name = "text"
    combined_dataset = Dataset.from_pandas(pd.DataFrame(data)).shuffle(seed=3407)

    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=combined_dataset, eval_dataset=None,
        args=SFTConfig(dataset_text_field="text", per_device_train_batch_size=2, gradient_accumulation_steps=1,
                       warmup_steps=0, max_steps=2, learning_rate=1e-2, logging_steps=1, optim="adamw_8bit",
                       weight_decay=0.01, lr_scheduler_type="linear", seed=3407, report_to="none",
                       output_dir="outputs", use_cpu=True, bf16=False))
    before = lora_weights(model)
    trainer.train()
    after = lora_weights(model)
    assert all(not torch.equal(before[n].cpu(), after[n].cpu()) for n in before if "lora_B" in n)

    messages = [{"role": "user", "content": "Solve (x + 2)^2 = 0."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    outputs = model.generate(**tokenizer(text, return_tensors="pt").to(model.device), max_new_tokens=8,
                             temperature=0.7, top_p=0.8, top_k=20)
    assert outputs.shape[1] > len(tokenizer(text)["input_ids"])

    model.save_pretrained("lora_model")
    tokenizer.save_pretrained("lora_model")
    model, tokenizer = FastLanguageModel.from_pretrained(model_name="lora_model", max_seq_length=2048, load_in_4bit=True)
    assert_reloaded_adapter_is_the_saved_one(model, Path("lora_model"))

    model.save_pretrained_merged("model", tokenizer, save_method="merged_16bit")
    assert_merged_is_peft_merge(Path("model"), tiny["qwen3"], Path("lora_model"), tokenizer)
    model.save_pretrained_gguf("model", tokenizer)  # "Save to 8bit Q8_0"
    assert sorted(p.name for p in Path("model_gguf").iterdir()) == ["Modelfile", "Qwen3-14B.Q8_0.gguf"]
    assert_gguf(Path("model_gguf/Qwen3-14B.Q8_0.gguf"), "q8_0", Path("model"), tokenizer)
    assert_modelfile(Path("model_gguf"), "Qwen3-14B.Q8_0.gguf", "qwen3")

    # "Save to multiple GGUF options": q5_k_m is fasttune's too; q2_k is llama.cpp's alone, named with the list.
    with pytest.raises(UserError, match=r"quantization_method = 'q2_k': is a llama.cpp quantization .* writes f32, f16"):
        model.push_to_hub_gguf("hf/model", tokenizer, quantization_method=["q4_k_m", "q2_k"], token=TOKEN)
    assert fake_hub == []  # refused before anything was written or sent
    with online():
        model.push_to_hub_gguf("hf/model", tokenizer, quantization_method=["q4_k_m", "q8_0", "q5_k_m"], token=TOKEN)
    made, uploaded = fake_hub
    assert made["repo_id"] == uploaded["repo_id"] == "hf/model" and made["token"] == TOKEN
    assert uploaded["uploaded"] == ["Modelfile", "Modelfile.q5_k_m", "Modelfile.q8_0", "Qwen3-14B.Q4_K_M.gguf",
                                    "Qwen3-14B.Q5_K_M.gguf", "Qwen3-14B.Q8_0.gguf"]
    # The upload's files are the ones written: its Q8_0 is the one read back above, byte for byte.
    assert (uploaded["folder"] / "Qwen3-14B.Q8_0.gguf").read_bytes() == Path("model_gguf/Qwen3-14B.Q8_0.gguf").read_bytes()
    assert gguf_tensor_count(uploaded["folder"] / "Qwen3-14B.Q4_K_M.gguf") == gguf_tensor_count(uploaded["folder"] / "Qwen3-14B.Q8_0.gguf")


# -- the unsloth backend: Unsloth's CPU fallback attaches its own saving calls; fasttune's replace them --

UNSLOTH = """
    import json, os, sys
    from fasttune import FastLanguageModel
    from fasttune.unsloth_api.saving import detach_saving_calls
    import torch
    model, tokenizer = FastLanguageModel.from_pretrained({model!r}, max_seq_length=128, backend="unsloth")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    calls = ("save_pretrained_merged", "save_pretrained_gguf", "push_to_hub_merged", "push_to_hub_gguf")
    ours = {{name: getattr(model, name).__func__.__module__ for name in calls}}
    import unsloth_zoo.llama_cpp as llama_cpp
    def refuse(*args, **kwargs):
        raise SystemExit("Unsloth's llama.cpp path was taken")
    for name in ("install_llama_cpp", "convert_to_gguf", "quantize_gguf"):
        setattr(llama_cpp, name, refuse)
    with torch.no_grad():  # a trained adapter's B is not zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    model.save_pretrained("adapter")
    model.save_pretrained_merged("merged", tokenizer)
    gguf = model.save_pretrained_gguf("merged", tokenizer, quantization_method=["not_quantized", "quantized"])
    detach_saving_calls(model)
    print(json.dumps({{"ours": ours, "gguf": gguf, "engine": FastLanguageModel.engine(model).backend,
                      "restored": {{name: vars(model)[name].__func__.__module__ for name in calls if name in vars(model)}},
                      "folders": sorted(os.listdir("."))}}))
"""


def test_unsloth_backend_saves_with_fasttune_not_llama_cpp(tiny, tmp_path):
    root = tmp_path / "cwd"
    root.mkdir()
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(UNSLOTH.format(model=str(tiny["mistral"])))],
                            capture_output=True, text=True, env=env_with_unsloth(), cwd=root, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["engine"] == "unsloth"
    assert set(out["ours"].values()) == {"fasttune.unsloth_api.saving"}
    # Unsloth's (its CPU fallback has no push_to_hub_gguf), back after detach_saving_calls
    assert out["restored"] == dict.fromkeys(["save_pretrained_merged", "save_pretrained_gguf", "push_to_hub_merged"],
                                            "unsloth_zoo.cpu.loader")
    assert {"adapter", "merged", "merged_gguf"} <= set(out["folders"]) and "llama.cpp" not in out["folders"]
    assert "Unsloth: Installing llama.cpp" not in result.stdout

    tokenizer = load_tokenizer("mistral")
    assert_merged_is_peft_merge(root / "merged", tiny["mistral"], root / "adapter", tokenizer)
    assert out["gguf"]["gguf_files"] == ["merged_gguf/mistral-7b-v0.3.BF16.gguf", "merged_gguf/mistral-7b-v0.3.Q4_K_M.gguf"]
    bf16 = gguf.GGUFReader(root / "merged_gguf" / "mistral-7b-v0.3.BF16.gguf")
    assert {T(t.tensor_type) for t in bf16.tensors if len(t.shape) == 2} == {T.BF16}
    assert_gguf(root / "merged_gguf" / "mistral-7b-v0.3.Q4_K_M.gguf", "q4_k_m", root / "merged")
    assert_modelfile(root / "merged_gguf", "mistral-7b-v0.3.BF16.gguf", "mistral")
