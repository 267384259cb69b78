"""Packing is correct where fasttune turns it on: packed rows never see each other, and only the
assistant's tokens are trained in a packed batch."""
import pytest
import torch
from fixtures.spans import decoded_runs
from fixtures.tiny_models import build_tiny_model, write_chat_jsonl
from fixtures.real_tokenizers import load_tokenizer

from fasttune import config, machine
from fasttune.binding import bind
from fasttune.prepare import prepare

CPU = machine.MachineFacts(False, "CPU", None, False, "test", False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tokenizer = load_tokenizer("llama3")
    folder = build_tiny_model("llama", tokenizer, tmp_path_factory.mktemp("llama"))
    return folder, tokenizer


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_do_not_attend_to_each_other(tiny, attention):
    """A packed forward (position_ids restart, no mask, no cache) equals each row on its own."""
    from transformers import AutoModelForCausalLM

    folder, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attention).eval()
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randint(10, 1000, (1, 23), generator=generator), torch.randint(10, 1000, (1, 17), generator=generator)
    packed_ids = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(23), torch.arange(17)]).unsqueeze(0)
    with torch.no_grad():
        packed = model(input_ids=packed_ids, position_ids=positions, use_cache=False).logits
        alone = torch.cat([model(input_ids=first, use_cache=False).logits, model(input_ids=second, use_cache=False).logits], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)


def test_packing_is_the_default_with_its_reason(tmp_path):
    recipe = config.resolve("mistral_qlora")
    plan = machine.plan(recipe, CPU, force_cpu=True)
    bound = bind(recipe, plan, tmp_path)
    assert bound.sft.packing
    assert any(note.startswith("packing on: sdpa") for note in bound.notes)
    demo = config.resolve("demo")
    demo_plan = machine.plan(demo, CPU)
    demo_bound = bind(demo, demo_plan, tmp_path)
    assert not demo_bound.sft.packing
    assert not any(note.startswith("packing") for note in demo_bound.notes)  # the recipe decided


def test_packed_batches_train_only_assistant_replies(tiny, tmp_path):
    from fasttune.train import runner

    folder, tokenizer = tiny
    data = tmp_path / "chat.jsonl"
    rows = write_chat_jsonl(data, 8)
    recipe = config.resolve("llama3_qlora", [f"model.name={folder}", f"data.path={data}", "data.eval_fraction=0",
                                             "train.per_device_train_batch_size=4", "train.max_length=512", "train.max_steps=1",
                                             "train.eval_strategy=no", "train.save_strategy=no", "train.warmup_steps=0"])
    plan = machine.plan(recipe, CPU, force_cpu=True)
    prepared = prepare(recipe, plan, tmp_path / "run")
    assert prepared.configs.sft.packing and prepared.configs.sft.assistant_only_loss
    session = runner.setup(prepared, __import__("rich.console").console.Console(quiet=True))
    batch = next(iter(session.trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1, "eight short rows fit in one packed row of 512"
    assert "position_ids" in batch and int((batch["position_ids"][0] == 0).sum()) == len(rows)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    trained = decoded_runs(ids, [label != -100 for label in labels], session.tokenizer)
    replies = [m["content"] + "<|eot_id|>" for row in rows for m in row["messages"] if m["role"] == "assistant"]
    assert sorted(trained) == sorted(replies)


@pytest.mark.parametrize("packing", [False, True])
def test_sfttrainer_trains_the_tokens_fasttune_made(tiny, tmp_path, packing):
    """Tokenized once: the rows SFTTrainer trains on are fasttune's own tokens and labels (what
    `data inspect` shows), and equal what TRL makes of the raw rows itself (truncation, packing,
    assistant-only labels), so nothing is tokenized twice and nothing changes by it."""
    from datasets import Dataset
    from rich.console import Console
    from trl import SFTTrainer

    from fasttune.train import runner

    folder, _ = tiny
    data = tmp_path / "chat.jsonl"
    write_chat_jsonl(data, 12)
    recipe = config.resolve("llama3_qlora", [f"model.name={folder}", f"data.path={data}", "data.eval_fraction=0.25",
                                             f"train.packing={str(packing).lower()}", "train.max_length=48", "train.max_steps=1",
                                             "train.eval_strategy=no", "train.save_strategy=no", "train.warmup_steps=0"])
    prepared = prepare(recipe, machine.plan(recipe, CPU, force_cpu=True), tmp_path / "run")
    session = runner.setup(prepared, Console(quiet=True))
    ours = session.trainer.train_dataset
    assert len(session.inputs.train.dataset) == len(session.data.train)
    assert any(length > 48 for length in session.inputs.train.facts["length"]), "some rows are cut by max_length"
    theirs = SFTTrainer(model=session.trainer.model, args=prepared.configs.sft, train_dataset=Dataset.from_list(session.data.train),
                        eval_dataset=Dataset.from_list(session.data.eval), processing_class=session.tokenizer)
    if not packing:  # fasttune's rows, as it cut them (and as inspect shows them)
        from fasttune.data.tokenize import truncate

        kept = [row for row in session.inputs.train.dataset if any(label != -100 for label in truncate(row["labels"], 48))]
        assert ours["input_ids"] == [truncate(row["input_ids"], 48) for row in kept]
    for column in ("input_ids", "labels"):
        assert ours[column] == theirs.train_dataset[column]
        assert session.trainer.eval_dataset[column] == theirs.eval_dataset[column]
