"""A recipe's memory plan on a card, as ``plan``, ``--dry-run``, ``train.auto_fit`` and an
out-of-memory message make it: which card, the run bound as it would train there, and the
lengths of the recipe's own rows when they can be read and tokenized here."""
from __future__ import annotations

from dataclasses import dataclass, replace

from fasttune import machine, prepare
from fasttune.config import Recipe
from fasttune.errors import Problem, SourceUnavailable, UserError
from fasttune.machine import MachineFacts, MachinePlan
from fasttune.memory.cards import Card, card as named_card
from fasttune.memory.fit import Change, Lengths, planned, suggestions
from fasttune.memory.plan import GIB, MemoryPlan


@dataclass(frozen=True)
class RunMemory:
    plan: MemoryPlan
    card: Card | None
    """None: the run is planned on the CPU."""
    where: str
    """Where the sequence length came from."""
    changes: list[Change]
    lengths: Lengths | None


def card_for(recipe: Recipe, facts: MachineFacts, gpu: str | None = None, cpu: bool = False) -> Card | None:
    """``--gpu`` if given; else this machine's GPU; else, for a GPU recipe on a machine without
    one, the card the recipe is sized for; else (or ``--cpu``) None: the CPU."""
    if cpu:
        return None
    if gpu is not None:
        return named_card(gpu)
    if facts.cuda:
        return Card(facts.device_name, float(facts.gpu_memory_gb), detected=True)
    if recipe.needs_gpu:
        return Card(f"the {recipe.gpu_memory_gb} GiB card the recipe is sized for", float(recipe.gpu_memory_gb))
    return None


def machine_plan_for(recipe: Recipe, facts: MachineFacts, card: Card | None) -> MachinePlan:
    if card is None:
        return machine.plan(recipe, facts, force_cpu=True)
    if card.detected:
        return machine.plan(recipe, facts)
    # a card asked about: bf16-capable, Unsloth as installed here
    return machine.plan(recipe, MachineFacts(True, card.name, card.gib, True, facts.torch_version, facts.unsloth_installed))


def bound(recipe: Recipe, plan: MachinePlan):
    """The run bound as it would train under ``plan``. On a machine without the card, TRL refuses
    bf16 at binding, so the settings are bound with the CPU's precision; the plan keeps the card's dtype."""
    if plan.device == "cuda" and not machine_has_cuda():
        return replace(prepare.prepare_elsewhere(recipe, replace(plan, device="cpu", dtype="float32")), plan=plan)
    return prepare.prepare_elsewhere(recipe, plan)


def machine_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def data_lengths(prepared) -> tuple[Lengths | None, str | None]:
    """The recipe's training rows tokenized as the run would, or None and why not."""
    from fasttune.model.source import tokenizer_source

    recipe = prepared.recipe
    try:
        source = tokenizer_source(recipe.model.name)
        if source is None:
            return None, "the model's tokenizer is converted on the first run"
        return Lengths.of(prepare.inputs(prepared, source).train), None
    except SourceUnavailable:
        return None, "the recipe's data cannot be read here"
    except (UserError, OSError, ValueError) as err:
        return None, f"rows not tokenized here ({type(err).__name__})"


def run_memory(recipe: Recipe, facts: MachineFacts, gpu: str | None = None, cpu: bool = False,
               prepared=None) -> RunMemory:
    card = card_for(recipe, facts, gpu, cpu)
    plan = machine_plan_for(recipe, facts, card)
    if prepared is None or prepared.plan != plan:
        prepared = bound(recipe, plan)
    lengths, why_not = data_lengths(prepared)
    memory, where = planned(prepared, card, lengths)
    if why_not:
        where += f" ({why_not})"
    changes = suggestions(prepared, memory, card, lengths) if card is not None else []
    return RunMemory(memory, card, where, changes, lengths)


def fit_the_card(name: str, overrides: list[str], recipe: Recipe, facts: MachineFacts, console) -> Recipe:
    """A GPU run says, before anything loads, whether its plan fits the card; with train.auto_fit
    it takes the first changes that make it fit (the same again on a resume: same card, same
    data), resolved as overrides so that config.yaml holds them."""
    from rich.markup import escape

    from fasttune.memory.fit import auto_fit_overrides
    from fasttune.memory.table import verdict

    memory = run_memory(recipe, facts)
    console.print(f"[bold]memory[/] {escape(verdict(memory.plan, memory.card))}")
    if memory.plan.total <= memory.card.gib * GIB:
        return recipe
    fitting = auto_fit_overrides(memory.changes, memory.card)
    if recipe.train.get("auto_fit") and fitting:
        console.print(f"[bold]auto-fit[/] {escape(' '.join(fitting))} -> {memory.changes[-1].plan.total / GIB:.2f} GiB predicted")
        return prepare.resolve(name, [*overrides, *fitting])
    if fitting:
        console.print(f"[yellow]memory[/] it may run out of memory; what would fit: {escape(' '.join(fitting))} "
                      f"(or train.auto_fit=true; python -m fasttune plan {escape(name)} shows the parts)")
        return recipe
    if recipe.train.get("auto_fit") is False:  # said outright: run anyway
        console.print("[yellow]memory[/] no change fasttune knows makes it fit; running anyway (train.auto_fit=false)")
        return recipe
    tried = " ".join(dict.fromkeys(item for change in memory.changes for item in change.overrides))
    still = f", and still {memory.changes[-1].plan.total / GIB:.2f} GiB with {tried}" if memory.changes else ""
    raise UserError(Problem("train", name, f"{verdict(memory.plan, memory.card)}{still}",
                            "use a card with more memory, method qlora or a smaller model; see python -m fasttune plan "
                            f"{name} --gpu GB; or run anyway with train.auto_fit=false"), "the run does not fit the card")


def out_of_memory(recipe: Recipe, step: int, checkpoint: str | None, resume: str) -> UserError:
    """What a CUDA out-of-memory at ``step`` says: the plan against the card, the changes that fit,
    and where the run continues from."""
    from fasttune.memory.fit import auto_fit_overrides
    from fasttune.memory.table import verdict

    memory = run_memory(recipe, machine.detect())
    fitting = auto_fit_overrides(memory.changes, memory.card) if memory.card is not None else None
    change = " ".join(fitting) if fitting else ("train.per_device_train_batch_size=<half> "
                                                "train.gradient_accumulation_steps=<double>, or a lower train.max_length")
    where = f"from {checkpoint}" if checkpoint else "from the start (no checkpoint was written yet)"
    return UserError(Problem("GPU memory", f"step {step + 1}", f"ran out of memory; the plan: {verdict(memory.plan, memory.card)}",
                             f"change {change}, then continue {where}: {resume} {' '.join(fitting or [])} --force".rstrip()),
                     "the run ran out of GPU memory")
