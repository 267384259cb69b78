"""Packed rows kept apart (SDPA/eager) compute exactly what TRL's one flattened row computes."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from fasttune.bench.side import Meter
from fasttune.train.packed_rows import PackedRowsApart
from fixtures.tiny_models import build_tiny_model
from fixtures.tokenizers import load_tokenizer


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
