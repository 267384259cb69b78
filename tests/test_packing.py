"""Packing is correct where fasttune turns it on: packed rows never see each other, and only the
assistant's tokens are trained in a packed batch."""
import pytest
import torch
from fixtures.spans import decoded_runs
from fixtures.tiny_models import build_tiny_model, write_chat_jsonl
from fixtures.tokenizers import load_tokenizer

from fasttune import config, machine
from fasttune.binding import bind

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
    assert any(note.startswith("packing on: sdpa") for note in plan.notes)
    demo = config.resolve("demo")
    demo_plan = machine.plan(demo, CPU)
    assert not bind(demo, demo_plan, tmp_path).sft.packing
    assert not any(note.startswith("packing") for note in demo_plan.notes)  # the recipe decided


def test_packed_batches_train_only_assistant_replies(tiny, tmp_path):
    from fasttune.train import runner

    folder, tokenizer = tiny
    data = tmp_path / "chat.jsonl"
    rows = write_chat_jsonl(data, 8)
    recipe = config.resolve("llama3_qlora", [f"model.name={folder}", f"data.path={data}", "data.eval_fraction=0",
                                             "train.per_device_train_batch_size=4", "train.max_length=512", "train.max_steps=1",
                                             "train.eval_strategy=no", "train.save_strategy=no", "train.warmup_steps=0"])
    plan = machine.plan(recipe, CPU, force_cpu=True)
    bound = bind(recipe, plan, tmp_path / "run")
    assert bound.sft.packing and bound.sft.assistant_only_loss
    session = runner.setup(recipe, plan, bound, tmp_path / "run", __import__("rich.console").console.Console(quiet=True))
    batch = next(iter(session.trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1, "eight short rows fit in one packed row of 512"
    assert "position_ids" in batch and int((batch["position_ids"][0] == 0).sum()) == len(rows)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    trained = decoded_runs(ids, [label != -100 for label in labels], session.tokenizer)
    replies = [m["content"] + "<|eot_id|>" for row in rows for m in row["messages"] if m["role"] == "assistant"]
    assert sorted(trained) == sorted(replies)
