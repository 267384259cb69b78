"""`fasttune data inspect` and fasttune.data.tokenize: masks equal TRL's, stats count right.

Uses a tiny local model folder (real SmolLM2 tokenizer, random weights) so no GGUF is imported.
"""
from __future__ import annotations

import json

import pytest

from fasttune.cli import main
from fasttune.families.chat_templates import get_template
from fasttune.data.tokenize import IGNORE, MaskRules, tokenize
from fixtures.spans import decoded_runs
from fixtures.tiny_models import build_tiny_model
from fixtures.real_tokenizers import DEFAULT_TEMPLATE, load_tokenizer

# TRL's own example records (TRL docs, "Dataset formats and types").
TEXT = {"text": "The sky is blue."}
MESSAGES = {"messages": [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "It is blue."}]}
PROMPT_COMPLETION = {"prompt": "The sky is", "completion": " blue."}
CONVERSATIONAL_PC = {"prompt": [{"role": "user", "content": "What color is the sky?"}],
                     "completion": [{"role": "assistant", "content": "It is blue."}]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model("llama", load_tokenizer("smollm2"), tmp_path_factory.mktemp("tiny") / "model")


def inspect_json(capsys, source, model_dir, *extra) -> dict:
    assert main(["data", "inspect", str(source), "--json", "-n", "5", f"model.name={model_dir}", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def write(tmp_path, name, *rows):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(("row", "overrides", "shape", "trained"), [
    (MESSAGES, (), "messages", "It is blue.<|im_end|>"),
    (CONVERSATIONAL_PC, (), "conversational_prompt_completion", "It is blue.<|im_end|>"),
    (PROMPT_COMPLETION, ("train.assistant_only_loss=false",), "prompt_completion", " blue.<|im_end|>"),
    (TEXT, ("train.assistant_only_loss=false",), "text", "The sky is blue.<|im_end|>"),
], ids=["messages", "conversational_prompt_completion", "prompt_completion", "text"])
def test_trained_text_per_trl_shape(tmp_path, capsys, model_dir, row, overrides, shape, trained):
    doc = inspect_json(capsys, write(tmp_path, shape, row), model_dir, *overrides)
    assert doc["shape"] == shape and doc["rows"] == 1
    (example,) = doc["examples"]
    assert example["trained_text"] == trained
    assert len(example["input_ids"]) == len(example["labels"]) == doc["stats"]["tokens"]["max"]
    # chatml ends each turn with "\n" after <|im_end|>: rendered, but outside the assistant mask.
    assert example["text"].endswith(trained + "\n" if shape in ("messages", "conversational_prompt_completion") else trained)


@pytest.mark.parametrize(("row", "shape", "trained", "said"), [
    (PROMPT_COMPLETION, "prompt_completion", " blue.<|im_end|>", "the completion and its EOS"),
    (TEXT, "text", "The sky is blue.<|im_end|>", "every token"),
], ids=["prompt_completion", "text"])
def test_assistant_only_loss_means_what_the_model_should_say_in_every_shape(tmp_path, capsys, model_dir, row, shape, trained, said):
    """The recipes' train.assistant_only_loss=true (TRL refuses it on these shapes) trains the
    completion of prompt-completion rows and every token of text rows, and says which."""
    doc = inspect_json(capsys, write(tmp_path, shape, row), model_dir)
    (example,) = doc["examples"]
    assert example["trained_text"] == trained
    assert doc["stats"]["trains"].startswith(f"{shape} rows: {said}") and "train.assistant_only_loss" in doc["stats"]["trains"]


def test_assistant_only_loss_with_completion_only_loss_false_is_a_user_error(tmp_path, capsys, model_dir):
    path = write(tmp_path, "prompt_completion", PROMPT_COMPLETION)
    assert main(["data", "inspect", str(path), f"model.name={model_dir}", "train.completion_only_loss=false"]) == 2
    assert "train.completion_only_loss = False" in capsys.readouterr().err


def test_demo_data(capsys, model_dir):
    doc = inspect_json(capsys, "builtin:json_extract", model_dir, "data.max_rows=20")
    assert doc["format"] == "messages" and doc["rows"] == 20 and len(doc["examples"]) == 5
    for example in doc["examples"]:
        reply = example["trained_text"]
        assert reply.endswith("<|im_end|>") and json.loads(reply[: -len("<|im_end|>")])
        assert example["text"].startswith("<|im_start|>system")
    stats = doc["stats"]
    assert stats["fully_masked"]["count"] == 0 and stats["truncation"]["rows"] == 0
    assert 0 < stats["packing"]["efficiency_unpacked"] <= stats["packing"]["efficiency_packed"] <= 1


def test_truncation_and_fully_masked_rows_are_counted(tmp_path, capsys, model_dir):
    long_text = {"text": " ".join(["blue"] * 40)}
    long_prompt = {"prompt": " ".join(["sky"] * 40), "completion": " blue."}
    path = write(tmp_path, "mixed", PROMPT_COMPLETION, long_prompt)
    doc = inspect_json(capsys, path, model_dir, "train.assistant_only_loss=false", "train.max_length=16")
    cut = doc["stats"]["truncation"]
    full = doc["stats"]["tokens"]["max"]
    assert cut["rows"] == 1 and cut["tokens_cut"] == full - 16 and cut["trained_tokens_cut"] == 3
    assert doc["stats"]["fully_masked"] == {"count": 1, "rows": [1]}
    assert len(doc["examples"][1]["input_ids"]) == 16 and doc["examples"][1]["trained_text"] == ""

    doc = inspect_json(capsys, write(tmp_path, "long", long_text), model_dir, "train.assistant_only_loss=false", "train.max_length=16")
    assert doc["stats"]["truncation"]["rows"] == 1 and doc["stats"]["fully_masked"]["count"] == 0


@pytest.mark.parametrize("family", list(DEFAULT_TEMPLATE))
def test_golden_masks_per_family(family):
    tokenizer = load_tokenizer(family)
    conversation = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
                    {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]
    row = tokenize([{"messages": conversation}], tokenizer, MaskRules(assistant_only_loss=True)).dataset[0]
    eot = get_template(DEFAULT_TEMPLATE[family]).end_of_turn
    assert decoded_runs(row["input_ids"], [label != IGNORE for label in row["labels"]], tokenizer) == [f"Paris.{eot}", f"Rome.{eot}"]
    assert [label for label in row["labels"] if label != IGNORE] == [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]


def test_labels_equal_sft_trainer(tmp_path, model_dir):
    """The pre-tokenized rows equal what TRL's SFTTrainer builds from the raw rows."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer("smollm2")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for rows, aol in (([MESSAGES, MESSAGES], True), ([CONVERSATIONAL_PC], True), ([PROMPT_COMPLETION], False), ([TEXT], False)):
        args = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none",
                         assistant_only_loss=aol, max_length=48)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        ours = tokenize(rows, tokenizer, MaskRules.from_sft(args)).dataset
        theirs = trainer.train_dataset
        # TRL truncates to max_length and then drops rows left with nothing to train (SFTTrainer._prepare_dataset).
        kept = [(ids[:48], labels[:48]) for ids, labels in zip(ours["input_ids"], ours["labels"]) if set(labels[:48]) != {IGNORE}]
        assert kept and [ids for ids, _ in kept] == theirs["input_ids"]
        assert [labels for _, labels in kept] == theirs["labels"]


def test_assistant_only_loss_per_shape_equals_trls_own_rule_for_that_shape(tmp_path, model_dir):
    """With train.assistant_only_loss on non-conversational rows, fasttune's labels are TRL's own for
    the rule it applies instead (completion_only_loss for prompt-completion, every token for text)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer("smollm2")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for rows, trl_rule in (([PROMPT_COMPLETION], {"completion_only_loss": True}), ([TEXT], {})):
        ours = tokenize(rows, tokenizer, MaskRules(assistant_only_loss=True, max_length=48))
        assert not ours.rules.assistant_only_loss
        args = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", max_length=48, **trl_rule)
        theirs = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer).train_dataset
        assert ours.dataset["input_ids"] == theirs["input_ids"] and ours.dataset["labels"] == theirs["labels"]
