"""Bind a recipe's library sections to the real classes they feed, and report every mistake.

``train`` → ``trl.SFTConfig``, ``lora`` → ``peft.LoraConfig``, ``quantization`` →
``transformers.BitsAndBytesConfig``. Keys are checked against the classes' own fields (so any
field of theirs is reachable from a recipe), values are coerced to the declared types, and then
the classes' constructors validate the rest. Imports torch: not on the CLI's start-up path.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import typing
from dataclasses import dataclass
from pathlib import Path

from fasttune.coercion import coerce
from fasttune.config import Recipe
from fasttune.errors import Problem, UserError
from fasttune.machine import MachinePlan

# SFTConfig keys that TRL's SFT guides teach but transformers 5 removed from TrainingArguments.
# They stay settable; translate_moved_keys maps each onto what transformers 5 reads instead.
MOVED_KEYS = {
    "logging_dir": "TensorBoard's folder, read from TENSORBOARD_LOGGING_DIR in transformers 5",
    "warmup_ratio": "warmup_steps below 1 is a fraction of the run in transformers 5",
    "half_precision_backend": "transformers 5 always uses torch's native AMP",
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


@dataclass
class Bound:
    sft: object
    """trl.SFTConfig"""
    lora: object | None
    """peft.LoraConfig, or None for method full"""
    bnb: object | None
    """transformers.BitsAndBytesConfig, or None unless method qlora"""
    logging_dir: str | None


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
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            elsewhere = [f"{name}.{key}" for name, keys in other.items() if key in keys]
            fix = (f"did you mean `{section}.{close[0]}`?" if close else
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


def device_settings(recipe: Recipe, plan: MachinePlan) -> dict:
    """The SFTConfig precision settings the machine dictates, where the recipe did not set them."""
    train = recipe.train
    if plan.device == "cpu":
        # TRL's SFTConfig defaults to bf16 and refuses it without a GPU (trl 1.14.2).
        for key in ("bf16", "fp16"):
            if train.get(key):
                plan.notes.append(f"train.{key}=true does not apply on the CPU: training in {plan.dtype}")
        return {"use_cpu": True, "bf16": False, "fp16": False}
    if "bf16" in train or "fp16" in train:
        return {}
    return {"bf16": plan.dtype == "bfloat16", "fp16": plan.dtype == "float16"}


def bind(recipe: Recipe, plan: MachinePlan, run_dir: Path) -> Bound:
    """The library config objects for ``recipe`` on ``plan``; raises UserError listing all problems."""
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

    problems: list[Problem] = []
    field_names = {"train": set(_fields(SFTConfig)), "lora": set(_fields(LoraConfig)),
                   "quantization": set(_fields(BitsAndBytesConfig))}

    def others(name: str) -> dict[str, set]:
        return {k: v for k, v in field_names.items() if k != name}

    translated, logging_dir = translate_moved_keys(recipe.train, problems)
    train = _check("train", translated, SFTConfig, problems, others("train"))
    # train.output_dir names the run directory (runner.new_run_dir); checkpoints go inside it.
    train["output_dir"] = str(run_dir / "checkpoints")
    train.setdefault("report_to", "none")
    train.update(device_settings(recipe, plan))
    if "packing" not in recipe.train:
        from fasttune.data.tokenize import packing_decision

        train["packing"], reason = packing_decision(recipe, plan)
        plan.notes.append(f"packing {'on' if train['packing'] else 'off'}: {reason}")
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
            plan.notes.append(f"quantization.bnb_4bit_compute_dtype {kwargs['bnb_4bit_compute_dtype']} -> {plan.dtype} ({plan.dtype_reason})")
            kwargs["bnb_4bit_compute_dtype"] = plan.dtype
        bnb = _construct("quantization", BitsAndBytesConfig, kwargs, problems, recipe.quantization)

    if problems:
        raise UserError(problems, f"recipe {recipe.name!r} does not bind")
    return Bound(sft, lora, bnb, logging_dir)
