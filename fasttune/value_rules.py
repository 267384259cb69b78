"""Value rules the libraries check only at train time, checked when a recipe resolves (torch-free).

PEFT refuses ``r=0`` when it attaches LoRA (after the weights are loaded), torch refuses a dropout
above 1 when it builds the layers, TRL accepts a learning rate of 0 and trains nothing, and
transformers divides by a batch size of 0. Each rule here states what such a key must hold, so
``show``, ``--dry-run`` and a real run refuse the value before any weights load. A value of the
wrong type in a library section (``lora.r=many``), and every key no rule names, are left to
fasttune.binding, which checks them against the library's own fields, all in one message.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass

from fasttune.coercion import coerce
from fasttune.errors import Problem
from fasttune.tasks import task_names  # task modules load lazily: listing them imports nothing heavy


@dataclass(frozen=True)
class Rule:
    key: str
    """Dotted recipe key, ``section.field``."""
    kind: object
    """Type the value is coerced to before ``ok`` looks at it (``int``, ``float``, ``str``)."""
    ok: typing.Callable[[object], bool]
    rule: str
    """What a valid value is, completing "must be ..." (``1 or more``), in the recipe's words."""
    example: str
    """A valid value, for the fix."""
    nullable: bool = False


def _positive(v) -> bool:
    return v > 0


def _at_least_one(v) -> bool:
    return v >= 1


def _not_negative(v) -> bool:
    return v >= 0


RULES = (
    # LoRA (peft.LoraConfig): PEFT raises on r <= 0 only when it wraps the layers; alpha <= 0 scales
    # the update by zero or flips it; torch.nn.Dropout refuses p outside [0, 1], and p = 1 drops
    # every input of the LoRA path, so nothing would train.
    Rule("lora.r", int, _at_least_one, "1 or more (the LoRA rank)", "16"),
    Rule("lora.lora_alpha", float, _positive, "above 0 (LoRA scales its update by lora_alpha / r)", "16"),
    Rule("lora.lora_dropout", float, lambda v: 0 <= v < 1, "a fraction in [0, 1) (1 would drop every input)", "0.05"),
    # Training (trl.SFTConfig / transformers.TrainingArguments).
    Rule("train.learning_rate", float, _not_negative, "0 or more (below 0 trains the wrong way; 0 trains nothing, which checks "
         "that a run starts where it should)", "2e-4"),
    Rule("train.per_device_train_batch_size", int, _at_least_one, "1 or more", "2"),
    Rule("train.per_device_eval_batch_size", int, _at_least_one, "1 or more", "8"),
    Rule("train.gradient_accumulation_steps", int, _at_least_one, "1 or more", "4"),
    Rule("train.max_length", int, _at_least_one, "a number of tokens, 1 or more (null: no truncation)", "2048", nullable=True),
    Rule("train.num_train_epochs", float, _positive, "a number of passes above 0", "1"),
    Rule("train.max_steps", int, lambda v: v == -1 or v >= 1, "-1 (train num_train_epochs) or a number of steps, 1 or more", "-1"),
    Rule("train.warmup_steps", float, _not_negative, "0 or more (below 1: a fraction of the steps)", "10"),
    Rule("train.logging_steps", float, _positive, "above 0 (below 1: a fraction of the steps)", "5"),
    Rule("train.save_steps", float, _positive, "above 0 (below 1: a fraction of the steps)", "200"),
    Rule("train.eval_steps", float, _positive, "above 0 (below 1: a fraction of the steps; null: logging_steps)", "200",
         nullable=True),
    Rule("train.weight_decay", float, _not_negative, "0 or more", "0.01"),
    Rule("train.max_grad_norm", float, _not_negative, "0 or more (0: no clipping)", "1.0"),
    Rule("train.seed", int, lambda v: 0 <= v < 2**32, "from 0 to 2**32 - 1 (numpy's seed range)", "42"),
    Rule("train.dataloader_num_workers", int, _not_negative, "0 or more", "0"),
    # 4-bit quantization (transformers.BitsAndBytesConfig): an unknown quant type is accepted by the
    # config and refused by bitsandbytes when the weights load; the compute dtype is looked up on torch.
    Rule("quantization.bnb_4bit_quant_type", str, lambda v: v in ("nf4", "fp4"), "nf4 or fp4", "nf4"),
    Rule("quantization.bnb_4bit_compute_dtype", str, lambda v: v in ("bfloat16", "float16", "float32"),
         "bfloat16, float16 or float32", "bfloat16"),
    # fasttune's eval section: the task is looked up only when training ends.
    Rule("eval.max_new_tokens", int, _at_least_one, "a number of tokens, 1 or more", "64"),
    Rule("eval.samples", int, _not_negative, "0 or more", "3"),
)


LIBRARY_TYPED = ("train", "lora", "quantization")
"""Sections whose value types fasttune.binding checks against the library class (with its other checks)."""


def _task_rule() -> Rule:
    names = task_names()
    return Rule("eval.task", str, lambda v: v in names, f"one of fasttune's tasks ({', '.join(names)}) or null for none",
                names[0], nullable=True)


def value_problems(sections: dict[str, dict]) -> list[Problem]:
    """Every value in ``sections`` (section name -> mapping of raw values) that breaks a rule."""
    problems = []
    for rule in (*RULES, _task_rule()):
        section, _, name = rule.key.partition(".")
        values = sections.get(section) or {}
        if name not in values:
            continue
        value = values[name]
        if value is None and rule.nullable:
            continue
        try:
            typed = coerce(value, rule.kind)
        except (ValueError, TypeError):
            if section in LIBRARY_TYPED:
                continue  # fasttune.binding names the type, together with every other key the library refuses
            typed = None
        if typed is None or not rule.ok(typed):
            problems.append(Problem(rule.key, value, f"must be {rule.rule}", f"e.g. {rule.key}={rule.example}"))
    targets = (sections.get("lora") or {}).get("target_modules", "all-linear")
    if targets is not None and not targets:
        problems.append(Problem("lora.target_modules", targets, "names no module: LoRA would train nothing",
                                "leave it out for the family's default, or list modules, e.g. [q_proj, v_proj]"))
    elif targets is not None and not isinstance(targets, str) and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        problems.append(Problem("lora.target_modules", targets, "must be a list of module names",
                                "e.g. lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"))
    return problems
