"""Packed batches as separate rows for SDPA and eager attention.

TRL's padding-free collator concatenates a whole packed batch into ONE row and marks where each
sequence starts with ``position_ids``. Flash-attention's variable-length kernels then attend only
within each sequence. SDPA and eager attention cannot: transformers builds a block-diagonal mask
over the row, and the attention is computed over the full square, (sum of row lengths)^2. Keeping
each packed row (one bin of at most ``max_length`` tokens) as its own batch row costs the sum of
their squares instead: half for two rows, a quarter for four. Same tokens, same labels, same
per-sequence masking (transformers reads the restarts of ``position_ids`` in every row).
"""
from __future__ import annotations


class PackedRowsApart:
    """Wraps TRL's padding-free collator: collates each packed row alone, then stacks the rows,
    right-padding the shorter ones (pad id, label -100, position 0)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        rows = [self.collator([example]) for example in examples]
        width = max(row["input_ids"].shape[1] for row in rows)
        padding = {"input_ids": self.collator.pad_token_id, "labels": -100, "position_ids": 0}
        batch = {}
        for key, value in padding.items():
            batch[key] = torch.cat([torch.nn.functional.pad(row[key], (0, width - row[key].shape[1]), value=value) for row in rows])
        return batch


def keep_packed_rows_apart(trainer, attention: str) -> bool:
    """Install :class:`PackedRowsApart` where it helps: padding-free packing with SDPA or eager."""
    collator = trainer.data_collator
    if attention not in ("sdpa", "eager") or not getattr(collator, "padding_free", False) or not trainer.args.packing:
        return False
    trainer.data_collator = PackedRowsApart(collator)
    return True
