"""Demo tasks: generated data plus a metric, to show that a fine-tune changed behaviour.

A task is a small record (``Task``) in one registry. Task modules are imported only when asked
for, and none of them imports torch at module level, so listing tasks is instant.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

# name -> module that defines ``TASK``. Imported lazily by ``get_task``.
_TASK_MODULES = {
    "json_extract": "fasttune.tasks.json_extract",
}


@dataclass(frozen=True)
class Task:
    """A demo task: deterministic data, a metric, and an evaluation loop."""

    name: str
    """Registry key (e.g. ``"json_extract"``)."""
    description: str
    """One line for listings."""
    headline: str
    """The metric that summarises the task (a key of ``score``'s result)."""
    system_prompt: str
    """The fixed system message of every row."""
    generate: Callable[..., list[dict]]
    """``generate(n, seed, split="train"|"eval")`` -> rows in TRL's conversational format."""
    score: Callable[[list[str], list[dict]], dict[str, float]]
    """``score(predictions, rows)`` -> metric name -> fraction in [0, 1]."""
    evaluate: Callable[..., dict[str, Any]]
    """``evaluate(model, tokenizer, rows, ...)`` -> metrics plus ``samples``."""
    eval_seed: int = 1
    """Seed of the held-out rows (drawn from the ``eval`` split's own name pools)."""


def task_names() -> list[str]:
    return sorted(_TASK_MODULES)


def get_task(name: str) -> Task:
    """The registered task called ``name``; ``KeyError`` naming the known tasks otherwise."""
    module_name = _TASK_MODULES.get(name)
    if module_name is None:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return importlib.import_module(module_name).TASK
