"""The user's own functions that SFTTrainer calls: found from a recipe's ``hooks:`` strings, or given.

A recipe names each hook ``module:attribute`` (fasttune.config.HooksSection documents them); a
Python caller gives the objects in a :class:`Hooks` (``prepare.prepare(..., hooks=Hooks(...))``).
:func:`hook_problems` is the check ``prepare.resolve`` runs before anything loads: each module
imports, from the current folder too (put first on ``sys.path``, as ``python -m`` does), and each
attribute is there and callable, and takes the arguments it is called with. :func:`ready` makes the
:class:`Hooks` a run carries (callback classes made into instances); :func:`guard_metric_hooks` makes
a failure of the user's metric functions during a run a UserError. Importing a hook runs the user's
module, nothing else here imports torch: ``transformers`` is imported only to check callbacks.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import numbers
import os
import sys
import traceback
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

from fasttune.config import Recipe, formatting_func_problems, hook_form_problems
from fasttune.errors import Problem, UserError, suggest

CALLED_AS = {
    "formatting_func": "called with one row (a dict of the data's columns), it returns the row's text",
    "compute_metrics": "called with a transformers.EvalPrediction, it returns {name: number}",
    "preprocess_logits_for_metrics": "called with (logits, labels) of an eval batch, it returns the predictions compute_metrics gets",
}
CALLED_WITH = {"formatting_func": ("row",), "compute_metrics": ("prediction",), "preprocess_logits_for_metrics": ("logits", "labels")}
"""The positional arguments each hook gets: TRL 1.14.2 calls ``formatting_func(row)`` (SFTTrainer._prepare_dataset,
``batched=False``); transformers 5.17 ``compute_metrics(EvalPrediction)`` and ``preprocess_logits_for_metrics(logits,
labels)`` (Trainer.evaluation_loop), ``compute_metrics(..., compute_result=bool)`` with ``batch_eval_metrics``."""


@dataclass(frozen=True)
class Hooks:
    """The hooks of one run, as objects: what SFTTrainer is given (fasttune applies ``formatting_func``
    itself, before it tokenizes, as TRL would: fasttune.data.rows)."""

    formatting_func: typing.Optional[typing.Callable[[dict], str]] = None
    compute_metrics: typing.Optional[typing.Callable] = None
    preprocess_logits_for_metrics: typing.Optional[typing.Callable] = None
    callbacks: tuple = field(default=())
    """``transformers.TrainerCallback`` instances (:func:`ready` makes classes and factories into them)."""


def _importable_from_here() -> None:
    # `python -m fasttune` puts the current folder first on sys.path; a console script or a test
    # does not. A user's my_hooks.py beside the recipe must import either way.
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
    importlib.invalidate_caches()  # a module written after this process looked at the folder


def _no_module(key: str, spec: str, module_name: str) -> Problem:
    here = [p[:-3] for p in os.listdir(".") if p.endswith(".py")]
    return Problem(key, spec, f"names module {module_name!r}, which is neither a .py file in the current folder "
                   f"({os.getcwd()}) nor an installed package",
                   suggest(module_name, here) or f"run fasttune from the folder that holds {module_name}.py, or install the package")


def module_problem(key: str, spec: str) -> Problem | None:
    """Whether the module of ``spec`` can be found, without running it (``importlib.util.find_spec``):
    resolving a recipe (``show`` too) must not run the user's code, nor import transformers before
    Unsloth. The module is imported, and its attribute checked, when the run is prepared (:func:`ready`)."""
    module_name = spec.partition(":")[0].strip()
    _importable_from_here()
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):  # a parent package that is missing (or raises)
        found = None
    return None if found is not None else _no_module(key, spec, module_name)


def find(key: str, spec: str) -> tuple[object, Problem | None]:
    """The object ``spec`` (``module:attribute``, the attribute may be dotted) names, or why not."""
    module_name, _, attribute = spec.partition(":")
    module_name, attribute = module_name.strip(), attribute.strip()
    _importable_from_here()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            return None, _no_module(key, spec, module_name)
        return None, Problem(key, spec, f"importing {module_name} failed: {err}", f"install {err.name}, or fix the import in {module_name}")
    except Exception as err:  # the user's module raised while it was imported
        return None, Problem(key, spec, f"importing {module_name} raised {type(err).__name__}: {err}",
                             f"fix {getattr(err, 'filename', None) or module_name} so that it imports")
    found: object = module
    for depth, part in enumerate(attribute.split(".")):
        if not hasattr(found, part):
            where = ".".join([module_name, *attribute.split(".")[:depth]])
            names = [n for n in dir(found) if not n.startswith("_")]
            return None, Problem(key, spec, f"{where} has no attribute {part!r}",
                                 suggest(part, names) or f"define {part} in {where}, or name one of: {', '.join(names[:12])}")
        found = getattr(found, part)
    return found, None


def signature_problem(key: str, obj: object, spec: str, recipe: Recipe) -> Problem | None:
    """Whether the function ``obj`` (the hook ``key``, e.g. ``hooks.formatting_func``) can be called as TRL and
    transformers call it (CALLED_WITH); an object whose signature cannot be read (a builtin) is let through."""
    name = key.rpartition(".")[2]
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    args = CALLED_WITH[name]
    batched = name == "compute_metrics" and recipe.train.get("batch_eval_metrics") is True
    try:
        signature.bind(*args, **({"compute_result": True} if batched else {}))
    except TypeError as err:
        called = getattr(obj, "__name__", name)
        wanted = f"def {called}({', '.join(args)}{', compute_result' if batched else ''})"
        extra = (" (train.batch_eval_metrics=true: transformers also passes compute_result=True on an eval's last batch, "
                 "False before)" if batched else "")
        return Problem(key, spec, f"is {CALLED_AS[name]}{extra}; its signature {called}{signature} cannot take that: {err}",
                       f"write it as {wanted}, with defaults for any other argument")
    return None


def _problems(recipe: Recipe) -> tuple[dict[str, object], list[Problem]]:
    """Each hook the recipe names (well formed) as its object, keyed ``hooks.<key>``; the problems."""
    problems, found = [], {}
    section = recipe.hooks
    malformed = {p.where for p in hook_form_problems(section)}  # said by fasttune.config already
    for key, spec in section.named().items():
        if key in malformed:
            continue
        obj, problem = find(key, spec)
        if problem is None and not key.startswith("hooks.callbacks") and not callable(obj):
            name = key.removeprefix("hooks.")
            problem = Problem(key, spec, f"is a value of type {type(obj).__name__}, not a function ({CALLED_AS[name]})",
                              f"name the function itself, e.g. {spec.partition(':')[0]}:my_{name}")
        elif problem is None and not key.startswith("hooks.callbacks"):
            problem = signature_problem(key, obj, spec, recipe)
        if problem is not None:
            problems.append(problem)
        else:
            found[key] = obj
    return found, problems


def hook_problems(recipe: Recipe) -> list[Problem]:
    """The station check of ``hooks:`` (fasttune.prepare.resolve): every hook's module can be found.
    That it imports, is callable and takes its arguments is checked by :func:`ready`, before any weights load."""
    malformed = {p.where for p in hook_form_problems(recipe.hooks)}  # said by fasttune.config already
    found = (module_problem(key, spec) for key, spec in recipe.hooks.named().items() if key not in malformed)
    return [problem for problem in found if problem is not None]


def _callback(key: str, obj: object):
    """``obj`` as a TrainerCallback instance: a class made with no arguments, an instance, or what a function returns."""
    from transformers import TrainerCallback

    rule = "must be a transformers.TrainerCallback: a class (made with no arguments), an instance, or a function returning one"
    made = obj
    if isinstance(obj, type) or (callable(obj) and not isinstance(obj, TrainerCallback)):
        try:
            made = obj()
        except TypeError as err:
            raise UserError(Problem(key, hook_name(obj), f"{rule}; calling it with no arguments failed: {err}",
                                    "give its arguments defaults, or name a function that builds it")) from None
    if not isinstance(made, TrainerCallback):
        raise UserError(Problem(key, hook_name(obj), f"{rule} (got a value of type {type(made).__name__})",
                                "subclass transformers.TrainerCallback"))
    return made


def keep_logits(configs, recipe: Recipe, hooks: Hooks):
    """The library configs with ``train.loss_type=nll`` where compute_metrics needs logits. TRL 1.14.2's
    default ``chunked_nll`` computes the loss from the hidden states in chunks and returns no logits
    (trl/trainer/sft_trainer.py, ``_patch_chunked_ce_lm_head``): compute_metrics would get none. ``nll``
    is the same loss, with the logits made."""
    import dataclasses

    if hooks.compute_metrics is None and hooks.preprocess_logits_for_metrics is None:
        return configs
    if recipe.train.get("loss_type") == "chunked_nll":
        raise UserError(Problem("train.loss_type", "chunked_nll", "makes no logits, and hooks.compute_metrics needs them",
                                "drop train.loss_type (fasttune then uses nll, the same loss), or set it to nll"))
    if configs.sft.loss_type != "chunked_nll":
        return configs
    note = "train.loss_type nll: compute_metrics needs the logits, which TRL's default chunked_nll does not make (the same loss)"
    return dataclasses.replace(configs, sft=dataclasses.replace(configs.sft, loss_type="nll"), notes=(*configs.notes, note))


def hook_name(obj: object) -> str:
    """A hook as ``module:function``, as a recipe names it."""
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__name__)}"


def raised_at(err: BaseException, func: object) -> str:
    """`` (my_hooks.py line 12: return row['question'])``: the innermost line of ``func``'s own file in the
    traceback of ``err``, so the message names it without a traceback; "" when none is there."""
    func = inspect.unwrap(func) if callable(func) else None
    code = getattr(func, "__code__", None) or getattr(getattr(type(func), "__call__", None), "__code__", None)  # an object with __call__
    home = [f for f in traceback.extract_tb(err.__traceback__) if code is not None and f.filename == code.co_filename]
    if not home:
        return ""
    frame = home[-1]
    return f" ({os.path.basename(frame.filename)} line {frame.lineno}" + (f": {frame.line.strip()})" if frame.line else ")")


def guard_metric_hooks(trainer) -> None:
    """``trainer.compute_metrics`` and ``trainer.preprocess_logits_for_metrics`` (the user's), wrapped on this
    trainer once it is made: an exception of the user's function, or a compute_metrics return transformers
    cannot log (5.17 prefixes each key in place: a float ends in ``'float' object does not support item
    assignment``), is a UserError naming the hook, the step and what went wrong. The wrappers take the same
    arguments and return the same values; they carry the function's signature (transformers reads it)."""
    for key in ("compute_metrics", "preprocess_logits_for_metrics"):
        func = getattr(trainer, key, None)
        if func is not None:
            setattr(trainer, key, _guarded(key, func, lambda: trainer.state.global_step))


AGAIN = " (the run folder keeps its checkpoints: --resume RUN_DIR continues from the last one, if one was saved)"


def _guarded(key: str, func: typing.Callable, step: typing.Callable[[], int]) -> typing.Callable:
    name = hook_name(func)

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        try:
            result = func(*args, **kwargs)
        except Exception as err:
            raise UserError(Problem(f"hooks.{key}", name, f"raised {type(err).__name__}: {err}{raised_at(err, func)} at step "
                                    f"{step()}, in an evaluation; it is {CALLED_AS[key]}",
                                    f"fix {name}, then run again{AGAIN}"), f"hooks.{key} failed; the run stopped") from err
        if key == "compute_metrics" and kwargs.get("compute_result", True):  # with batch_eval_metrics, only the last batch's counts
            wrong = _not_metrics(result)
            if wrong:
                raise UserError(Problem(f"hooks.{key}", name, f"returned {wrong} at step {step()}, in an evaluation; it is "
                                        f"{CALLED_AS[key]}", f"make {name} return a dict of metric names to numbers, "
                                        f"e.g. {{'accuracy': 0.9}}, then run again{AGAIN}"), f"hooks.{key} failed; the run stopped")
        return result

    return guarded


def _not_metrics(result: object) -> str:
    """What makes ``result`` not ``{name: number}`` (numbers: Python, numpy or one-element tensors), or ""."""
    if not isinstance(result, Mapping):
        return f"a {type(result).__name__} ({result!r:.80})"
    for key, value in result.items():
        if not isinstance(key, str):
            return f"a key {key!r} that is not a name"
        size = getattr(value, "numel", None) or getattr(value, "size", None)
        size = size() if callable(size) else size
        if not isinstance(value, numbers.Number) and not (hasattr(value, "item") and size == 1):
            return f"a {type(value).__name__} for {key!r} ({value!r:.80}), not a number"
    return ""


def ready(recipe: Recipe, given: Hooks | None = None) -> Hooks:
    """The hooks a run carries: those ``given`` (a Python caller's objects) where set, else the
    recipe's, with callbacks made into instances; a UserError names every problem."""
    given = given or Hooks()
    found, problems = _problems(recipe)
    if problems:
        raise UserError(problems, "hooks: are not valid")
    spec = {key.removeprefix("hooks."): obj for key, obj in found.items() if not key.startswith("hooks.callbacks")}
    for key in ("formatting_func", "compute_metrics", "preprocess_logits_for_metrics"):
        value = getattr(given, key)
        if value is not None and not callable(value):
            problems.append(Problem(f"Hooks.{key}", repr(value), f"must be a function ({CALLED_AS[key]})", "pass the function itself"))
        elif value is not None:
            problem = signature_problem(f"Hooks.{key}", value, hook_name(value), recipe)
            if problem is None:
                spec[key] = value
            else:
                problems.append(problem)
    if given.formatting_func is not None and recipe.hooks.formatting_func is None:  # the recipe's was checked by config.resolve
        problems.extend(formatting_func_problems(recipe, hook_name(given.formatting_func), "Hooks.formatting_func"))
    pairs = ([(f"Hooks.callbacks[{i}]", c) for i, c in enumerate(given.callbacks)] if given.callbacks else
             [(key, obj) for key, obj in found.items() if key.startswith("hooks.callbacks")])
    callbacks = []
    for key, obj in pairs:
        try:
            callbacks.append(_callback(key, obj))
        except UserError as err:
            problems.extend(err.problems)
    if problems:
        raise UserError(problems, "hooks are not valid")
    return Hooks(**spec, callbacks=tuple(callbacks))
