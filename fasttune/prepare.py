"""One preparation for every verb: a recipe on this machine, made into what a run needs.

Every verb that trains or looks at training (``recipe``, ``--dry-run``, ``data inspect``,
``bench``) goes through these stages, in this order, and takes the ones it needs; each result is
made once and never edited afterwards:

``resolve(NAME, overrides)``
    the recipe, checked by fasttune's rules (fasttune.config) and against the stations: the data
    mapping compiles, a local model is what it claims, the export it asks for can be written.
``plan_machine(recipe, facts, ...)``
    device, dtype, backend and attention with their reasons (fasttune.machine). A process that
    will train imports Unsloth here, before transformers, TRL and PEFT; if that import fails the
    plan is made with the failure (backend ``hf``, the reason said).
``prepare(recipe, plan, run_dir, hooks=None)``
    the library configs bound to the plan (SFTConfig, LoraConfig, BitsAndBytesConfig) with the
    packing decision and its reason (fasttune.binding), and the SFTTrainer hooks as objects: the
    recipe's ``hooks:`` imported, or a Python caller's :class:`Hooks` (fasttune.hooks).
``inputs(prepared, source)``
    the rows (fasttune.data.rows), the tokenizer with the training template
    (fasttune.model.tokenizer), and the rows tokenized and masked once (fasttune.data.tokenize):
    these tokens are what SFTTrainer trains on and what ``data inspect`` shows.

Imports stay torch-free at module level: ``show`` and ``recipes`` resolve through here.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path

from fasttune import config, machine
from fasttune.binding import LibraryConfigs, bind
from fasttune.config import Recipe
from fasttune.data.mapping import compile_mapping
from fasttune.data.rows import PreparedData, read_data
from fasttune.data.tokenize import MaskRules, Tokenized, TokenReport, measure, tokenize
from fasttune.errors import Problem, UserError
from fasttune.export.checks import export_problems
from fasttune.families import FAMILIES
from fasttune.hooks import Hooks, hook_problems, keep_logits, ready
from fasttune.machine import MachineFacts, MachinePlan
from fasttune.model.backends import import_unsloth
from fasttune.model import trained_adapter
from fasttune.model.local_model import local_model_problems
from fasttune.run_folder import CONFIG
from fasttune.model.tokenizer import TemplateChoice, load_tokenizer


def station_problems(recipe: Recipe, to_train: bool = True) -> list[Problem]:
    """What the stations refuse in a recipe, found before anything loads: a data mapping that does
    not compile, a local model that is not what it claims, an export that cannot be written; and,
    ``to_train``, the adapter it trains on from and its hooks."""
    problems = []
    if recipe.data.mapping is not None:
        problems.extend(compile_mapping(recipe.data.mapping)[1])
    targets = recipe.lora.get("target_modules")
    if to_train and recipe.model.adapter and recipe.method != "full":
        try:
            adapter = trained_adapter.locate(recipe.model.adapter)
            problems.extend(trained_adapter.contradictions(recipe.lora, adapter))
            targets = adapter.settings().get("target_modules")
        except UserError as err:
            problems.extend(err.problems)
    if recipe.model.name:
        problems.extend(local_model_problems(recipe.model.name, targets))
    if recipe.family in FAMILIES:
        problems.extend(export_problems(recipe))
    if to_train:
        problems.extend(hook_problems(recipe))
    return problems


def resolve(name_or_path: str, overrides: typing.Sequence[str] = ()) -> Recipe:
    """The recipe, every problem of it (fasttune's rules and the stations') raised together. With
    ``model.adapter``, its ``lora:`` section holds the adapter's own settings."""
    recipe = config.resolve(name_or_path, overrides, checks=(station_problems,))
    return trained_adapter.adopt(recipe) if recipe.model.adapter else recipe


def resolve_finished_run(run_dir: Path) -> Recipe:
    """A run's own ``config.yaml``, for what works from the run folder alone (``export``): the
    adapter the run started from and its hooks are not needed there, so a moved or deleted one is
    not a problem (the run's own ``adapter/`` is what is exported)."""
    return config.resolve(str(run_dir / CONFIG), (), checks=(lambda recipe: station_problems(recipe, to_train=False),))


def plan_machine(recipe: Recipe, facts: MachineFacts, *, force_cpu: bool = False, training: bool = False) -> MachinePlan:
    """The machine plan. ``training``: this process trains, so where the plan says Unsloth it is
    imported now (it must patch transformers, TRL and PEFT before they load); a failed import
    gives the ``hf`` plan with the reason, or a UserError when the recipe named Unsloth."""
    plan = machine.plan(recipe, facts, force_cpu)
    if training and plan.backend == "unsloth":
        failure = import_unsloth(explicit=recipe.model.backend == "unsloth")
        if failure:
            plan = machine.plan(recipe, facts, force_cpu, unsloth_failure=failure)
    return plan


@dataclass(frozen=True)
class Prepared:
    """A recipe bound to one machine plan and one run folder: everything a run needs before data."""

    recipe: Recipe
    plan: MachinePlan
    configs: LibraryConfigs
    run_dir: Path
    hooks: Hooks = Hooks()
    """The SFTTrainer hooks (formatting_func, compute_metrics, ..., callbacks) as objects."""

    @property
    def notes(self) -> tuple[str, ...]:
        """What the plan and the binding decided that the recipe did not say, with the reasons (and
        a base model other than the one ``model.adapter`` was trained on)."""
        adapter = self.recipe.model.adapter
        note = trained_adapter.base_note(self.recipe.model.name, trained_adapter.locate(adapter)) if adapter else None
        return (*self.plan.notes, *self.configs.notes, *((note,) if note else ()))


def prepare(recipe: Recipe, plan: MachinePlan, run_dir: Path, hooks: Hooks | None = None) -> Prepared:
    """``hooks``: a Python caller's objects; each one set replaces the recipe's ``hooks:`` entry for
    that key (callbacks: the whole list). They are not written to config.yaml: a resumed run from
    Python is given them again."""
    hooks = ready(recipe, hooks)
    return Prepared(recipe, plan, keep_logits(bind(recipe, plan, run_dir), recipe, hooks), run_dir, hooks)


def prepare_elsewhere(recipe: Recipe, plan: MachinePlan, hooks: Hooks | None = None) -> Prepared:
    """``prepare`` for a verb that writes no run (``data inspect``, a bench's checks): bound in a
    throwaway folder, since SFTConfig wants an output_dir."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return prepare(recipe, plan, Path(tmp), hooks)


@dataclass(frozen=True)
class Inputs:
    """The rows of a run, as text and as the tokens that train."""

    data: PreparedData
    """The rows in TRL's shapes, and what reading them did."""
    tokenizer: object
    """transformers' tokenizer with the training template, end of turn and pad set."""
    template: TemplateChoice
    """The training chat template and why it was chosen."""
    train: Tokenized
    """The training rows, tokenized and masked as TRL would (what SFTTrainer trains on)."""
    eval: Tokenized | None
    """The same for the held-out rows (None without any; the first set of named eval sets)."""
    stats: TokenReport
    """Of ``train``: lengths, truncation, rows that train nothing, packing."""
    eval_sets: dict[str, Tokenized] = field(default_factory=dict)
    """Named eval sets (``data.eval_path`` a mapping), each tokenized the same way; empty otherwise."""


def inputs(prepared: Prepared, source: str, data: PreparedData | None = None) -> Inputs:
    """Read the rows (unless ``data`` holds them already), load the tokenizer from ``source`` (a
    folder or hub id) with the training template, and tokenize and mask the rows once."""
    recipe = prepared.recipe
    data = data if data is not None else read_data(recipe, prepared.hooks.formatting_func)
    try:
        tokenizer, template = load_tokenizer(source, recipe)
    except (OSError, ValueError) as err:
        raise UserError(Problem("model.name", recipe.model.name, f"no tokenizer could be loaded from {source}: {err}",
                                "point model.name at a folder with tokenizer files, or a hub id you have cached")) from None
    rules = MaskRules.from_sft(prepared.configs.sft)
    train = tokenize(data.train, tokenizer, rules)
    sets = {name: tokenize(rows, tokenizer, rules) for name, rows in data.eval_sets.items()}
    held_out = next(iter(sets.values())) if sets else tokenize(data.eval, tokenizer, rules) if data.eval else None
    return Inputs(data, tokenizer, template, train, held_out, measure(train, rules, prepared.configs.packing), sets)
