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

import logging
from contextlib import contextmanager

# TRL 1.14.2 (trl/trainer/sft_trainer.py, SFTTrainer.__init__) warns through accelerate's logger
# for this module whenever BFD packing runs without a flash-attention variant; this is its text.
TRL_LOGGER = "trl.trainer.sft_trainer"
CROSS_CONTAMINATION = "Using other implementations may lead to cross-contamination between samples"


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


def _rows_kept_apart(attention: str, padding_free: bool, packing: bool) -> bool:
    return attention in ("sdpa", "eager") and padding_free and packing


def keep_packed_rows_apart(trainer, attention: str) -> bool:
    """Install :class:`PackedRowsApart` where it helps: padding-free packing with SDPA or eager."""
    collator = trainer.data_collator
    if not _rows_kept_apart(attention, getattr(collator, "padding_free", False), trainer.args.packing):
        return False
    trainer.data_collator = PackedRowsApart(collator)
    return True


def packing_made_safe(args, attention: str) -> bool:
    """Whether :func:`keep_packed_rows_apart` will install its collator on a trainer built from
    ``args`` (an SFTConfig): TRL makes the collator padding-free for ``padding_free`` or BFD
    packing (SFTTrainer.__init__). With flash attention TRL does not warn in the first place."""
    padding_free = bool(args.padding_free) or (args.packing and args.packing_strategy in ("bfd", "bfd_split"))
    return _rows_kept_apart(attention, padding_free, bool(args.packing))


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextmanager
def quiet_cross_contamination_warning(args, attention: str):
    """Around ``SFTTrainer(...)``: where :func:`packing_made_safe`, drop TRL's warning that packing
    "may lead to cross-contamination between samples" (fasttune's own packing note says why it
    does not), and only that message; elsewhere, change nothing."""
    if not packing_made_safe(args, attention):
        yield
        return
    logger, drop = logging.getLogger(TRL_LOGGER), _DropMessage(CROSS_CONTAMINATION)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
