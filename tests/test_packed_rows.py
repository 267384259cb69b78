"""Packed rows kept apart (SDPA/eager) compute exactly what TRL's one flattened row computes."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from fasttune.side_by_side.side import Meter
from fasttune.train.packed_rows import PackedRowsApart
from fixtures.tiny_models import build_tiny_model
from fixtures.real_tokenizers import load_tokenizer


def packed_examples(vocab: int) -> list[dict]:
    """Three packed bins as TRL's BFD packing writes them (seq_lengths marks the sequences)."""
    generator = torch.Generator().manual_seed(0)
    examples = []
    for lengths in ([5, 9, 2], [11, 4], [7]):
        ids = torch.randint(3, vocab, (sum(lengths),), generator=generator).tolist()
        labels = [t if i % 3 else -100 for i, t in enumerate(ids)]  # some prompt tokens masked
        examples.append({"input_ids": ids, "labels": labels, "seq_lengths": lengths})
    return examples


def test_rows_apart_give_the_same_loss_and_logits_as_one_flattened_row(tmp_path):
    tokenizer = load_tokenizer("smollm2")
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model("llama", tokenizer, tmp_path / "m"), dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    trl = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id or 0, padding_free=True)
    examples = packed_examples(len(tokenizer))
    flat, apart = trl(examples), PackedRowsApart(trl)(examples)
    assert flat["input_ids"].shape == (1, 38) and apart["input_ids"].shape == (3, 16)
    assert "attention_mask" not in apart
    with torch.no_grad():  # use_cache=False, as the trainer runs it: with a cache, transformers ignores the packing
        one, rows = model(**flat, use_cache=False), model(**apart, use_cache=False)
    torch.testing.assert_close(rows.loss, one.loss, atol=1e-5, rtol=0)
    # Every real token's logits agree: row r's tokens are the flattened row's next stretch.
    real = apart["labels"] != -100
    assert int(real.sum()) == int((flat["labels"] != -100).sum())
    start = 0
    for r, length in enumerate((16, 15, 7)):
        torch.testing.assert_close(rows.logits[r, :length], one.logits[0, start:start + length], atol=1e-4, rtol=0)
        start += length
    # ...and both are what each sequence gives alone (the packing is really honoured).
    alone = []
    for example in examples:
        offset = 0
        for length in example["seq_lengths"]:
            with torch.no_grad():
                alone.append(model(torch.tensor([example["input_ids"][offset:offset + length]])).logits[0])
            offset += length
    torch.testing.assert_close(one.logits[0], torch.cat(alone), atol=1e-4, rtol=0)


def test_the_meter_does_not_count_row_end_padding_as_real_tokens():
    trl = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = PackedRowsApart(trl)(packed_examples(100))
    meter = Meter(cuda=False)
    meter.training = True
    meter.hook(None, (), batch)
    assert meter._batch[1:] == [16 + 15 + 7, 3 * 16]


# --- TRL's packing warning, silenced only where fasttune keeps the rows apart ------------------

def trl_warned(caplog) -> bool:
    from fasttune.train.packed_rows import CROSS_CONTAMINATION

    return any(CROSS_CONTAMINATION in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("packing, strategy, attention, silenced", [
    (True, "bfd", "sdpa", True), (True, "bfd", "eager", True),
    (True, "bfd", "flex_attention", False),  # not an attention fasttune keeps packed rows apart for
    (True, "wrapped", "sdpa", False),  # not padding-free: no PackedRowsApart
    (False, "bfd", "sdpa", False),
])
def test_the_filter_drops_only_trls_message_and_only_where_rows_are_kept_apart(caplog, packing, strategy, attention, silenced):
    from fasttune.train.packed_rows import CROSS_CONTAMINATION, TRL_LOGGER, packing_made_safe, quiet_cross_contamination_warning

    args = SimpleNamespace(packing=packing, packing_strategy=strategy, padding_free=False)
    assert packing_made_safe(args, attention) is silenced
    trl_logger = logging.getLogger(TRL_LOGGER)
    with caplog.at_level(logging.WARNING), quiet_cross_contamination_warning(args, attention):
        trl_logger.warning(f"[RANK 0] You are using packing ... {CROSS_CONTAMINATION}. To avoid this, ...")
        trl_logger.warning("[RANK 0] another TRL warning")
    assert trl_warned(caplog) is not silenced
    assert any("another TRL warning" in record.getMessage() for record in caplog.records)
    assert not trl_logger.filters, "the filter is removed when the trainer is built"


def test_a_packed_run_no_longer_shows_trls_cross_contamination_warning(tmp_path, caplog):
    """runner.setup on a packed SDPA run: no TRL cross-contamination text, PackedRowsApart installed;
    the same SFTTrainer built without fasttune's filter (as TRL's users build it) still warns."""
    from datasets import Dataset
    from rich.console import Console
    from trl import SFTTrainer

    from fasttune import config, machine
    from fasttune.prepare import prepare
    from fasttune.train import runner
    from fasttune.train.packed_rows import quiet_cross_contamination_warning
    from fixtures.tiny_models import write_chat_jsonl

    folder = build_tiny_model("llama", load_tokenizer("llama3"), tmp_path / "m")
    data = tmp_path / "chat.jsonl"
    write_chat_jsonl(data, 8)
    recipe = config.resolve("llama3_qlora", [f"model.name={folder}", f"data.path={data}", "data.eval_fraction=0",
                                             "train.per_device_train_batch_size=4", "train.max_length=512", "train.max_steps=1",
                                             "train.eval_strategy=no", "train.save_strategy=no", "train.warmup_steps=0"])
    plan = machine.plan(recipe, machine.MachineFacts(False, "CPU", None, False, "test", False), force_cpu=True)
    prepared = prepare(recipe, plan, tmp_path / "run")
    assert prepared.configs.sft.packing and plan.attention == "sdpa"
    console = Console(record=True, width=200)
    with caplog.at_level(logging.WARNING):
        session = runner.setup(prepared, console)
    assert isinstance(session.trainer.data_collator, PackedRowsApart)
    assert not trl_warned(caplog)
    assert "so packed rows never attend to each other" in console.export_text()  # fasttune's own note stays

    def build():
        return SFTTrainer(model=session.trainer.model, args=prepared.configs.sft, train_dataset=Dataset.from_list(session.data.train),
                          processing_class=session.tokenizer)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build()
    assert trl_warned(caplog), "TRL no longer says this: CROSS_CONTAMINATION needs updating"
    caplog.clear()
    with caplog.at_level(logging.WARNING), quiet_cross_contamination_warning(prepared.configs.sft, "flex_attention"):
        build()  # an attention fasttune does not keep packed rows apart for: unaffected
    assert trl_warned(caplog)
