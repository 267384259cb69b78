"""Bind a recipe's library sections to the real classes they feed, and report every mistake.

``train`` → ``trl.SFTConfig``, ``lora`` → ``peft.LoraConfig``, ``quantization`` →
``transformers.BitsAndBytesConfig``. Keys are checked against the classes' own fields (so any
field of theirs is reachable from a recipe), values are coerced to the declared types, and then
the classes' constructors validate the rest. Imports torch: not on the CLI's start-up path.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass
from pathlib import Path

from fasttune.coercion import coerce
from fasttune.config import Recipe
from fasttune.errors import Problem, UserError, suggest
from fasttune.machine import MachinePlan

# SFTConfig keys that TRL's SFT guides teach but transformers 5 removed from TrainingArguments.
# They stay settable; translate_moved_keys maps each onto what transformers 5 reads instead.
MOVED_KEYS = {
    "logging_dir": "TensorBoard's folder, read from TENSORBOARD_LOGGING_DIR in transformers 5",
    "warmup_ratio": "warmup_steps below 1 is a fraction of the run in transformers 5",
    "half_precision_backend": "transformers 5 always uses torch's native AMP",
}


# SFTConfig keys whose work fasttune does itself, before SFTTrainer sees the rows (it hands TRL
# rows it tokenized and masked: fasttune.train.runner.trainable_rows). Set, they would change what
# TRL expects of the rows, not the rows.
FASTTUNE_DOES = {
    "eos_token": ("the end-of-turn token comes from the training chat template", "choose the template with data.chat_template"),
    "chat_template_path": ("the training chat template is data.chat_template", "set data.chat_template (fasttune/families/templates)"),
    "dataset_text_field": ("fasttune reads every row shape itself", "map your columns with data.mapping or data.format"),
    "dataset_kwargs": ("fasttune tokenizes the rows and TRL must still truncate or pack them", "remove it"),
}


# train keys that are fasttune's own (not SFTConfig fields), read by the station named.
FASTTUNE_TRAIN_KEYS = {
    "auto_fit": "when the memory plan exceeds the card, apply the first changes that make it fit (fasttune.memory.fit)",
}


def translate_moved_keys(train: dict, problems: list[Problem]) -> tuple[dict, str | None]:
    """``train`` without the keys transformers 5 removed, their meaning carried over."""
    out = {k: v for k, v in train.items() if k not in MOVED_KEYS}
    if "warmup_ratio" in train:
        ratio = train["warmup_ratio"]
        if out.get("warmup_steps"):
            problems.append(Problem("train.warmup_ratio", ratio, "and train.warmup_steps both set the warm-up",
                                    "keep one of them (in transformers 5, warmup_steps=0.1 means 10% of the steps)"))
        elif not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio < 1:
            problems.append(Problem("train.warmup_ratio", ratio, "must be a fraction in [0, 1)", "use e.g. 0.03"))
        else:
            out["warmup_steps"] = float(ratio)
    backend = train.get("half_precision_backend")
    if backend not in (None, "auto", "cpu_amp", "amp"):
        problems.append(Problem("train.half_precision_backend", backend, MOVED_KEYS["half_precision_backend"],
                                "remove it, or set it to auto"))
    return out, train.get("logging_dir")


class Packing(typing.NamedTuple):
    """Whether training packs rows (TRL's padding-free BFD packing), and why."""

    enabled: bool
    reason: str


@dataclass(frozen=True)
class LibraryConfigs:
    """A recipe's library sections as the library objects they feed, for one machine plan."""

    sft: object
    """trl.SFTConfig"""
    lora: object | None
    """peft.LoraConfig, or None for method full"""
    bnb: object | None
    """transformers.BitsAndBytesConfig, or None unless method qlora"""
    logging_dir: str | None
    """TensorBoard's folder (train.logging_dir, which transformers 5 reads from the environment)."""
    packing: Packing
    notes: tuple[str, ...] = ()
    """What binding changed from the recipe for this machine, and why (printed with the plan's notes)."""


def _fields(cls: type) -> dict[str, object]:
    """Constructor parameter name → type annotation (``Any`` where none can be resolved).

    Names come from ``__init__``'s signature: a dataclass's generated one, or a hand-written one
    (BitsAndBytesConfig is a dataclass with its own ``__init__``). Types come from the dataclass
    annotations where they resolve.
    """
    hints = {}
    if dataclasses.is_dataclass(cls):
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # a library's forward reference we cannot resolve: no coercion then
            hints = {}
    params = inspect.signature(cls.__init__).parameters
    return {name: hints.get(name, typing.Any) for name, p in params.items()
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _check(section: str, values: dict, cls: type, problems: list[Problem], other: dict[str, dict]) -> dict:
    fields = _fields(cls)
    out = {}
    for key, value in values.items():
        if key not in fields:
            close = suggest(key, fields)
            elsewhere = [f"{name}.{key}" for name, keys in other.items() if key in keys]
            fix = (close.replace("`", f"`{section}.", 1) if close else
                   f"did you mean `{elsewhere[0]}`?" if elsewhere else
                   f"see the fields of {cls.__module__.split('.')[0]}.{cls.__name__}")
            problems.append(Problem(f"{section}.{key}", value, f"is not a field of {cls.__name__}", fix))
            continue
        try:
            out[key] = coerce(value, fields[key])
        except ValueError as err:
            problems.append(Problem(f"{section}.{key}", value, str(err), f"give {section}.{key} a value of that type"))
    return out


def _construct(section: str, cls: type, kwargs: dict, problems: list[Problem], given: dict):
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, AttributeError) as err:  # BitsAndBytesConfig looks a dtype name up on torch
        key = _named_key(str(err), kwargs, given)
        if key is None:
            problems.append(Problem(section, sorted(given), f"{cls.__name__} refused these settings: {err}",
                                    f"change the {section} keys the message names"))
        else:
            problems.append(Problem(f"{section}.{key}", kwargs[key], f"{cls.__name__} refused it: {err}",
                                    f"change {section}.{key} (or the key the message names with it)"))
        return None


def _named_key(message: str, kwargs: dict, given: dict) -> str | None:
    """The key a library's error message is about: the longest key it names, preferring keys the
    recipe set (so ``lr_scheduler_type`` is reported, not the whole section)."""
    def found(text: str) -> re.Match | None:
        return re.search(rf"(?<![A-Za-z0-9_]){re.escape(text)}(?![A-Za-z0-9_])", message)

    named = [k for k in kwargs if found(k)]
    if named:
        return max(named, key=lambda k: (k in given, len(k)))
    # "zigzag is not a valid SchedulerType": the value named first in the message, among those the recipe set.
    by_value = [(found(v).start(), k) for k, v in kwargs.items() if k in given and isinstance(v, str) and v and found(v)]
    return min(by_value)[1] if by_value else None


def device_settings(recipe: Recipe, plan: MachinePlan, notes: list[str]) -> dict:
    """The SFTConfig precision settings the machine dictates, where the recipe did not set them."""
    train = recipe.train
    if plan.device == "cpu":
        # TRL's SFTConfig defaults to bf16 and refuses it without a GPU (trl 1.14.2).
        for key in ("bf16", "fp16"):
            if train.get(key):
                notes.append(f"train.{key}=true does not apply on the CPU: training in {plan.dtype}")
        return {"use_cpu": True, "bf16": False, "fp16": False}
    if "bf16" in train or "fp16" in train:
        return {}
    return {"bf16": plan.dtype == "bfloat16", "fp16": plan.dtype == "float16"}


def bind(recipe: Recipe, plan: MachinePlan, run_dir: Path) -> LibraryConfigs:
    """The library config objects for ``recipe`` on ``plan``; raises UserError listing all problems."""
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

    problems: list[Problem] = []
    notes: list[str] = []
    field_names = {"train": set(_fields(SFTConfig)), "lora": set(_fields(LoraConfig)),
                   "quantization": set(_fields(BitsAndBytesConfig))}

    def others(name: str) -> dict[str, set]:
        return {k: v for k, v in field_names.items() if k != name}

    for key, (why, fix) in FASTTUNE_DOES.items():
        if key in recipe.train:
            problems.append(Problem(f"train.{key}", recipe.train[key], f"is not used by fasttune: {why}", fix))
    if not isinstance(recipe.train.get("auto_fit", False), bool):
        problems.append(Problem("train.auto_fit", recipe.train["auto_fit"], "is true or false", "write train.auto_fit=true"))
    translated, logging_dir = translate_moved_keys({k: v for k, v in recipe.train.items()
                                                    if k not in FASTTUNE_DOES and k not in FASTTUNE_TRAIN_KEYS}, problems)
    train = _check("train", translated, SFTConfig, problems, others("train"))
    # train.output_dir names the run directory (runner.new_run_dir); checkpoints go inside it.
    train["output_dir"] = str(run_dir / "checkpoints")
    train.setdefault("report_to", "none")
    train.update(device_settings(recipe, plan, notes))
    if recipe.train.get("learning_rate") == 0:
        notes.append("train.learning_rate=0: no weight will change (a check that the run starts where it should)")
    packing = packing_decision(recipe, plan)
    if "packing" not in recipe.train:
        train["packing"] = packing.enabled
        notes.append(f"packing {'on' if packing.enabled else 'off'}: {packing.reason}")
    sft = _construct("train", SFTConfig, train, problems, recipe.train)

    lora = None
    if recipe.method in ("qlora", "lora"):
        kwargs = _check("lora", recipe.lora, LoraConfig, problems, others("lora"))
        kwargs.setdefault("task_type", "CAUSAL_LM")
        lora = _construct("lora", LoraConfig, kwargs, problems, recipe.lora)

    bnb = None
    if recipe.method == "qlora":
        kwargs = _check("quantization", recipe.quantization, BitsAndBytesConfig, problems, others("quantization"))
        if kwargs.get("bnb_4bit_compute_dtype") in ("bfloat16", "float16") and plan.dtype != kwargs["bnb_4bit_compute_dtype"]:
            # bf16 compute on a GPU without bf16 (or on the CPU) would fail or crawl: follow the plan.
            notes.append(f"quantization.bnb_4bit_compute_dtype {kwargs['bnb_4bit_compute_dtype']} -> {plan.dtype} ({plan.dtype_reason})")
            kwargs["bnb_4bit_compute_dtype"] = plan.dtype
        bnb = _construct("quantization", BitsAndBytesConfig, kwargs, problems, recipe.quantization)

    if problems:
        raise UserError(problems, f"recipe {recipe.name!r} does not bind")
    return LibraryConfigs(sft, lora, bnb, logging_dir, packing, tuple(notes))


# Attention implementations that TRL 1.14.2 lists as safe for padding-free packing
# (FLASH_ATTENTION_VARIANTS in trl/trainer/sft_trainer.py, hub kernels left out).
_FLASH = ("flash_attention_2", "flash_attention_3")


def packing_decision(recipe: Recipe, plan: MachinePlan) -> Packing:
    """Whether training should pack rows (TRL's padding-free BFD packing), and why.

    A recipe that sets ``train.packing`` decides. Otherwise packing is correct wherever attention
    keeps packed rows apart: flash-attention reads the ``position_ids`` TRL's padding-free collator
    writes; sdpa and eager do too, because transformers 5.17 builds a per-row causal mask from
    ``position_ids`` when there is no attention mask and no cache (``masking_utils``,
    ``find_packed_sequence_indices``) and SFTTrainer.compute_loss calls the model with
    ``use_cache=False`` (trl 1.14.2; checked on CPU by tests/test_packing.py).
    """
    train = recipe.train
    if "packing" in train:
        return Packing(bool(train["packing"]), "set by the recipe (train.packing)")
    if "max_length" in train and train["max_length"] is None:
        return Packing(False, "train.max_length is null: TRL packs into max_length bins and refuses packing without it")
    if train.get("packing_strategy", "bfd") not in ("bfd", "bfd_split"):
        return Packing(False, f"packing_strategy {train['packing_strategy']!r} cuts rows across boundaries; only bfd is padding-free")
    if plan.backend == "unsloth":
        return Packing(False, "Unsloth's patched attention is not checked by fasttune with packed rows; set train.packing=true to opt in")
    if plan.attention in _FLASH:
        return Packing(True, f"{plan.attention} keeps packed rows apart through position_ids (TRL's supported case)")
    if plan.attention in ("sdpa", "eager"):
        return Packing(True, f"{plan.attention}: transformers builds a per-row causal mask from position_ids when training "
                             "without a cache (SFTTrainer passes use_cache=False), so packed rows never attend to each other")
    return Packing(False, f"attention {plan.attention!r} is not known to keep packed rows apart")
