"""Will a run fit its card, and what makes it fit (torch-free).

``planned(prepared, card, lengths)`` is the memory plan of a prepared run (fasttune.prepare) on a
card; ``suggestions`` lists the changes that bring it under the card, cheapest first (each applied
on top of the ones before, with the new total); ``auto_fit_overrides`` is the first set of them
that fits, as ``key=value`` overrides (``train.auto_fit=true``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from fasttune.architectures import config_values
from fasttune.errors import Problem, UserError
from fasttune.families import get_family
from fasttune.memory.cards import Card
from fasttune.memory.plan import GIB, MemoryPlan, Setup, Shape, estimate

OFFLOAD_FROM = 512
"""Unsloth's checkpointing offloads saved layer inputs to host RAM from this many tokens on (below, plain checkpointing)."""
SHORTEST_MAX_LENGTH = 256
"""auto-fit never cuts max_length below this."""


@dataclass(frozen=True)
class Lengths:
    """Token counts of the training rows (before truncation) and of their trained tokens beyond each
    position, for the cost of a shorter max_length."""

    lengths: tuple[int, ...]
    trained: tuple[tuple[int, ...], ...]
    """Per row, the positions (0-based) of its trained tokens."""

    @classmethod
    def of(cls, tokenized) -> "Lengths":
        from fasttune.data.tokenize import IGNORE

        labels = tokenized.dataset["labels"]
        return cls(tuple(len(row) for row in labels),
                   tuple(tuple(i for i, label in enumerate(row) if label != IGNORE) for row in labels))

    def cut_at(self, max_length: int) -> tuple[float, float]:
        """Shares of rows and of trained tokens a max_length of ``max_length`` would cut (keeping the start)."""
        rows = sum(length > max_length for length in self.lengths)
        trained = sum(len(positions) for positions in self.trained)
        lost = sum(sum(p >= max_length for p in positions) for positions in self.trained)
        return rows / max(len(self.lengths), 1), lost / max(trained, 1)


def shape_of(recipe) -> tuple[Shape, str]:
    found = config_values(recipe.model.name, recipe.model.revision)
    if found is None:
        raise UserError(Problem("model.name", recipe.model.name,
                                "has no config.json on this machine and no architecture shipped with fasttune, so its size is unknown",
                                "download it once (its config is enough: huggingface-cli download NAME config.json), "
                                "or point model.name at a local folder"), "the memory plan needs the model's shape")
    return Shape.from_config(found[0]), found[1]


def setup_for(prepared, card: Card | None, lengths: Lengths | None) -> tuple[Setup, str]:
    """The run of ``prepared`` as the plan sees it, on ``card`` (None: the CPU), and where its sequence length came from."""
    recipe, configs, machine_plan = prepared.recipe, prepared.configs, prepared.plan
    sft = configs.sft
    max_length = sft.max_length
    if lengths is not None and lengths.lengths:
        longest = max(lengths.lengths)
        sequence = min(longest, max_length) if max_length else longest
        where = f"the longest row of the recipe's data ({longest} tokens" + (
            f", cut to max_length {max_length})" if max_length and longest > max_length else ")")
    else:
        sequence = max_length or 4096
        where = f"train.max_length {max_length}" if max_length else "no max_length and no data read: 4096 tokens assumed"
    cuda = card is not None
    width = 4 if machine_plan.dtype == "float32" else 2
    lora = configs.lora
    targets = getattr(lora, "target_modules", None) if lora is not None else None
    targets = tuple(sorted(targets)) if isinstance(targets, (set, list, tuple)) else None
    packing = bool(sft.packing)
    checkpointing = bool(sft.gradient_checkpointing)
    setup = Setup(method=recipe.method, width=width, batch=int(sft.per_device_train_batch_size), sequence=int(sequence),
                  packing=packing, gradient_checkpointing=checkpointing, optimizer=str(getattr(sft.optim, "value", sft.optim)),
                  attention=machine_plan.attention, backend=machine_plan.backend, cuda=cuda,
                  lora_rank=int(lora.r) if lora is not None else 0, lora_targets=targets,
                  lora_dropout=float(lora.lora_dropout) if lora is not None else 0.0,
                  double_quant=bool(configs.bnb.bnb_4bit_use_double_quant) if configs.bnb is not None else False)
    return _offload(setup), where


def _offload(setup: Setup) -> Setup:
    tokens = setup.batch * setup.sequence if setup.packing else setup.sequence
    return replace(setup, offload_checkpoints=setup.backend == "unsloth" and setup.gradient_checkpointing and setup.cuda
                   and tokens >= OFFLOAD_FROM)


def planned(prepared, card: Card | None, lengths: Lengths | None) -> tuple[MemoryPlan, str]:
    shape, _ = shape_of(prepared.recipe)
    setup, where = setup_for(prepared, card, lengths)
    return estimate(shape, get_family(shape.model_type), setup), where


@dataclass(frozen=True)
class Change:
    overrides: tuple[str, ...]
    """``key=value``, as the command line takes them."""
    why: str
    plan: MemoryPlan
    """The plan with this change and every one before it."""


def suggestions(prepared, plan: MemoryPlan, card: Card, lengths: Lengths | None) -> list[Change]:
    """Changes, cheapest first, each on top of those before, until the plan fits ``card`` (or none is left)."""
    shape, _ = shape_of(prepared.recipe)
    family = get_family(shape.model_type)
    budget = card.gib * GIB
    setup = plan.setup
    sft = prepared.configs.sft
    accumulation = int(sft.gradient_accumulation_steps)
    out: list[Change] = []

    def add(overrides: tuple[str, ...], why: str, changed: Setup) -> bool:
        nonlocal setup
        setup = _offload(changed)
        out.append(Change(overrides, why, estimate(shape, family, setup)))
        return out[-1].plan.total <= budget

    if plan.total <= budget:
        return []
    if not setup.gradient_checkpointing:
        why = "keeps one input per layer and recomputes the rest in backward (about 20-30% slower)"
        if add(("train.gradient_checkpointing=true",), why, replace(setup, gradient_checkpointing=True)):
            return out
    if setup.packing and setup.attention == "eager":
        if add(("train.packing=false",), "eager attention over a packed row attends across the whole pack (tokens^2)",
               replace(setup, packing=False)):
            return out
    if "8bit" not in setup.optimizer and not setup.optimizer.startswith("sgd"):
        if add(("train.optim=adamw_8bit",), "bitsandbytes' 8-bit AdamW: 2 bytes of state per parameter instead of 8",
               replace(setup, optimizer="adamw_8bit")):
            return out
    batch = setup.batch
    while batch > 1:
        batch //= 2
        accumulation *= 2
        if add((f"train.per_device_train_batch_size={batch}", f"train.gradient_accumulation_steps={accumulation}"),
               "the same global batch in smaller micro-batches (slower per step, same result)", replace(setup, batch=batch)):
            return out
    length = setup.sequence
    while length // 2 >= SHORTEST_MAX_LENGTH:
        length //= 2
        cost = ""
        if lengths is not None:
            rows, trained = lengths.cut_at(length)
            cost = f": cuts {rows:.0%} of the rows and {trained:.0%} of the trained tokens"
        if add((f"train.max_length={length}",), f"shorter rows{cost}", replace(setup, sequence=length)):
            return out
    return out


def auto_fit_overrides(changes: list[Change], card: Card) -> list[str] | None:
    """The overrides of the first prefix of ``changes`` that fits ``card``; None when none fits."""
    if not changes or changes[-1].plan.total > card.gib * GIB:
        return None
    out: dict[str, str] = {}
    for change in changes:
        for item in change.overrides:
            key, _, value = item.partition("=")
            out[key] = value
    return [f"{key}={value}" for key, value in out.items()]
