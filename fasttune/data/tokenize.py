"""Tokenize and mask TRL-shaped rows exactly as TRL's SFTTrainer does, and measure the result.

The rules are those of ``SFTTrainer._prepare_dataset`` in trl 1.14.2 (trl/trainer/sft_trainer.py):

* ``messages``: ``apply_chat_template(messages, return_assistant_tokens_mask=assistant_only_loss)``;
  with ``assistant_only_loss`` only the ``{% generation %}`` spans are trained.
* conversational prompt-completion: the prompt rendered with ``add_generation_prompt=True``; the
  completion starts where its ids and those of prompt+completion diverge (``common_prefix_length``);
  the assistant mask applies too when ``assistant_only_loss`` is set.
* ``prompt``/``completion`` strings: EOS appended to the completion unless it already ends with it;
  ``tokenizer(prompt)`` vs ``tokenizer(prompt + completion)`` as above.
* ``text``: EOS appended unless present; ``tokenizer(text)``; every token trained.

``completion_only_loss=None`` means "on for prompt-completion rows" (TRL's default). Labels are
``input_ids`` where every applicable mask is 1, else -100. The dataset returned holds
``input_ids`` and ``labels`` only: TRL then skips its own tokenization and label building and
applies truncation (``max_length``, ``truncation_mode``) or packing itself, so training sees the
same tokens (fasttune.train.runner.trainable_rows hands them to SFTTrainer; tests/test_packing.py
checks they equal what TRL makes of the raw rows). ``completion_mask`` alone would not do: TRL ignores it on a pre-tokenized dataset
because it decides ``completion_only_loss`` from the first row's keys.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from fasttune.errors import Problem, UserError

IGNORE = -100
"""Label of a token that is not trained (PyTorch's CrossEntropyLoss ignore_index)."""
BATCH_SIZE = 256


@dataclass(frozen=True)
class MaskRules:
    """The SFTConfig fields that decide tokens and labels (names and defaults are TRL's)."""

    assistant_only_loss: bool = False
    completion_only_loss: bool | None = None
    max_length: int | None = 1024
    truncation_mode: str = "keep_start"

    @classmethod
    def from_sft(cls, sft) -> "MaskRules":
        return cls(sft.assistant_only_loss, sft.completion_only_loss, sft.max_length, sft.truncation_mode)


def row_shape(row: dict) -> str:
    """TRL's four shapes: ``messages``, ``conversational_prompt_completion``, ``prompt_completion``, ``text``."""
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "conversational_prompt_completion" if isinstance(row["prompt"], list) else "prompt_completion"
    if "text" in row:
        return "text"
    raise UserError(Problem("data", sorted(row), "is not one of TRL's row shapes (messages | prompt+completion | text)",
                            "convert the rows with fasttune.data.rows first"))


CONVERSATIONAL = ("messages", "conversational_prompt_completion")


def rules_for_shape(shape: str, rules: MaskRules) -> tuple[MaskRules, str]:
    """The rules rows of ``shape`` are masked by, and what they train, in words.

    ``train.assistant_only_loss`` means "train only what the model should say". TRL honours it on
    conversational rows and refuses it on the others (trl 1.14.2, SFTTrainer.__init__); fasttune
    applies the intent per shape instead, as TRL's own defaults do for those shapes: the completion
    and its EOS for prompt-completion rows (``completion_only_loss``), every token for ``text`` rows,
    which have no turns. Refused only where the recipe asks for both and they cannot both hold: an
    explicit ``completion_only_loss=false`` on prompt-completion rows."""
    completion_only = rules.completion_only_loss is not False  # None: on for prompt-completion rows (TRL's default)
    if shape in CONVERSATIONAL:
        trained = "the assistant turns, end of turn included" if rules.assistant_only_loss else "every token"
        if shape == "conversational_prompt_completion" and completion_only:
            trained = f"the completion ({trained} of it)" if rules.assistant_only_loss else "the completion"
        return rules, trained
    if not rules.assistant_only_loss:
        return rules, "the completion and its EOS" if shape == "prompt_completion" and completion_only else "every token"
    if shape == "text":
        return (dataclasses.replace(rules, assistant_only_loss=False),
                "every token (train.assistant_only_loss on text rows: they have no turns to pick the reply from)")
    if rules.completion_only_loss is False:
        raise UserError(Problem("train.completion_only_loss", False, "contradicts train.assistant_only_loss=true on prompt-completion "
                                "rows: only the completion is what the model should say",
                                "drop train.completion_only_loss (the completion is then trained), or set train.assistant_only_loss=false "
                                "to train every token"))
    return (dataclasses.replace(rules, assistant_only_loss=False, completion_only_loss=True),
            "the completion and its EOS (train.assistant_only_loss on prompt-completion rows: the completion is the reply)")


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    # trl.data_utils.common_prefix_length (trl 1.14.2)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _labels(input_ids: list[int], *masks: list[int]) -> list[int]:
    if not masks:
        return list(input_ids)
    return [t if all(bits) else IGNORE for t, *bits in zip(input_ids, *masks)]


def _encode_batch(batch: dict, tokenizer, shape: str, rules: MaskRules) -> dict:
    aol = rules.assistant_only_loss
    completion_only = rules.completion_only_loss if rules.completion_only_loss is not None else "prompt" in batch
    n = len(next(iter(batch.values())))
    ids_out, labels_out = [], []
    if shape == "messages":
        tools = batch.get("tools")
        if tools is None:
            out = tokenizer.apply_chat_template(batch["messages"], tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=aol)
            results = [{k: out[k][i] for k in out} for i in range(n)]
        else:  # tools differ per row
            results = [tokenizer.apply_chat_template(m, tools=t, tokenize=True, return_dict=True,
                                                     return_assistant_tokens_mask=aol)
                       for m, t in zip(batch["messages"], tools)]
        for r in results:
            ids_out.append(list(r["input_ids"]))
            labels_out.append(_labels(r["input_ids"], *([r["assistant_masks"]] if aol else [])))
    elif shape == "conversational_prompt_completion":
        full = [p + c for p, c in zip(batch["prompt"], batch["completion"])]
        prompts = tokenizer.apply_chat_template(batch["prompt"], tokenize=True, return_dict=True, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(full, tokenize=True, return_dict=True, return_assistant_tokens_mask=aol)
        for i in range(n):
            ids = list(whole["input_ids"][i])
            start = _common_prefix_length(prompts["input_ids"][i], ids)
            masks = ([[0] * start + [1] * (len(ids) - start)] if completion_only else []) + ([whole["assistant_masks"][i]] if aol else [])
            ids_out.append(ids)
            labels_out.append(_labels(ids, *masks))
    elif shape == "prompt_completion":
        eos = tokenizer.eos_token
        completions = [c if c.endswith(eos) else c + eos for c in batch["completion"]]
        prompts = tokenizer(list(batch["prompt"]))["input_ids"]
        whole = tokenizer([p + c for p, c in zip(batch["prompt"], completions)])["input_ids"]
        for p, ids in zip(prompts, whole):
            start = _common_prefix_length(p, ids)
            ids_out.append(ids)
            labels_out.append(_labels(ids, [0] * start + [1] * (len(ids) - start)) if completion_only else list(ids))
    else:
        eos = tokenizer.eos_token
        texts = [t if t.endswith(eos) else t + eos for t in batch["text"]]
        ids_out = tokenizer(texts)["input_ids"]
        labels_out = [list(ids) for ids in ids_out]
    return {"input_ids": ids_out, "labels": labels_out, **_row_facts(ids_out, labels_out, rules)}


def _row_facts(ids_out, labels_out, rules: MaskRules) -> dict:
    """Per-row numbers for the report, computed in the same pass (dropped from the training dataset)."""
    kept_trained, trained = [], []
    for labels in labels_out:
        trained.append(sum(label != IGNORE for label in labels))
        kept = truncate(labels, rules.max_length, rules.truncation_mode)
        kept_trained.append(sum(label != IGNORE for label in kept))
    return {"length": [len(ids) for ids in ids_out], "trained": trained, "trained_kept": kept_trained}


def truncate(seq: list, max_length: int | None, mode: str = "keep_start") -> list:
    """TRL's truncation of ``input_ids`` and ``labels`` (trl 1.14.2, SFTTrainer._prepare_dataset)."""
    if max_length is None or len(seq) <= max_length:
        return seq
    return seq[:max_length] if mode == "keep_start" else seq[-max_length:]


@dataclass
class Tokenized:
    dataset: object
    """datasets.Dataset: input_ids, labels (untruncated, as TRL's preparation has them before truncating)."""
    facts: object
    """datasets.Dataset: length, trained, trained_kept per row (for :func:`measure`)."""
    shape: str
    rules: MaskRules
    """The rules the tokens and labels were made by: the recipe's, applied to this shape (:func:`rules_for_shape`)."""
    trained: str
    """What the labels train, in words (e.g. "the assistant turns, end of turn included")."""


def tokenize(rows: list[dict], tokenizer, rules: MaskRules, num_proc: int | None = None) -> Tokenized:
    """Rows of one TRL shape → token ids and labels as SFTTrainer builds them.

    ``num_proc``: worker processes for ``datasets.map``; None picks up to 2 for 2,000+ rows (below
    that, starting workers costs more than it saves).
    """
    from datasets import Dataset

    if not rows:
        raise UserError(Problem("data", "0 rows", "there is nothing to tokenize", "check data.path and data.max_rows"))
    shape = row_shape(rows[0])
    rules, trained = rules_for_shape(shape, rules)
    if num_proc is None:
        import os

        num_proc = min(2, os.cpu_count() or 1) if len(rows) >= 2000 else None
    source = Dataset.from_list(rows)
    mapped = source.map(_encode_batch, batched=True, batch_size=BATCH_SIZE, num_proc=num_proc,
                        fn_kwargs={"tokenizer": tokenizer, "shape": shape, "rules": rules},
                        remove_columns=source.column_names, desc=None)
    return Tokenized(mapped.select_columns(["input_ids", "labels"]),
                     mapped.select_columns(["length", "trained", "trained_kept"]), shape, rules, trained)


@dataclass
class PackingStats:
    enabled: bool
    reason: str
    efficiency_unpacked: float | None = None
    """Real tokens / (rows × max_length): every row padded to max_length."""
    efficiency_packed: float | None = None
    """Real tokens / (BFD bins × max_length), bins as trl.pack_dataset(strategy="bfd") makes them."""
    bins: int | None = None


@dataclass
class TokenReport:
    """What tokenizing did to the rows: lengths, truncation, rows that train nothing, packing."""

    rows: int
    tokens: dict
    """min, median, p95, max, total (before truncation)."""
    trained_tokens: int
    """Tokens with a label, after truncation."""
    truncation: dict
    """max_length, mode, rows, tokens_cut, trained_tokens_cut."""
    fully_masked: dict
    """count and rows (0-based indices): rows with no trained token once truncated; they teach nothing."""
    trains: str = ""
    """What the labels of these rows train, with their TRL shape (:func:`rules_for_shape`)."""
    packing: PackingStats = field(default_factory=lambda: PackingStats(False, ""))

    def to_dict(self) -> dict:
        return asdict(self)


def measure(tok: Tokenized, rules: MaskRules, packing: tuple[bool, str] = (False, "")) -> TokenReport:
    import numpy as np

    lengths = np.asarray(tok.facts["length"], dtype=np.int64)
    trained = np.asarray(tok.facts["trained"], dtype=np.int64)
    kept_trained = np.asarray(tok.facts["trained_kept"], dtype=np.int64)
    max_length = rules.max_length
    kept = np.minimum(lengths, max_length) if max_length is not None else lengths
    cut_rows = int((lengths > kept).sum())
    masked = np.flatnonzero(kept_trained == 0)
    stats = PackingStats(*packing)
    if max_length is not None and len(lengths):
        from trl.data_utils import pack_dataset

        bins = len(pack_dataset(tok.dataset.select_columns(["input_ids"]), max_length, "bfd"))
        stats.bins = bins
        stats.efficiency_unpacked = round(float(kept.sum()) / (len(kept) * max_length), 4)
        stats.efficiency_packed = round(float(kept.sum()) / (bins * max_length), 4)
    return TokenReport(
        rows=len(lengths),
        tokens={"min": int(lengths.min()), "median": float(np.median(lengths)), "p95": float(np.percentile(lengths, 95)),
                "max": int(lengths.max()), "total": int(lengths.sum())},
        trained_tokens=int(kept_trained.sum()),
        truncation={"max_length": max_length, "mode": rules.truncation_mode, "rows": cut_rows,
                    "tokens_cut": int((lengths - kept).sum()), "trained_tokens_cut": int((trained - kept_trained).sum())},
        fully_masked={"count": len(masked), "rows": [int(i) for i in masked]},
        trains=f"{tok.shape} rows: {tok.trained}",
        packing=stats,
    )
