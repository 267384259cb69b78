"""From ``data:`` to train and eval rows in TRL's shapes (no tokenizer, no weights)."""
from __future__ import annotations

import random
from dataclasses import dataclass

from fasttune.config import Recipe
from fasttune.data.formats import to_trl
from fasttune.data.sources import BUILTIN_PREFIX, load_rows
from fasttune.errors import Problem, UserError

# Rows generated for a builtin task when data.max_rows / data.eval_rows are not set.
BUILTIN_TRAIN_ROWS = 1000
BUILTIN_EVAL_ROWS = 50


@dataclass
class PreparedData:
    train: list[dict]
    eval: list[dict]
    format: str
    source: str


def prepare(recipe: Recipe) -> PreparedData:
    data = recipe.data
    if data.path.startswith(BUILTIN_PREFIX):
        return _builtin(recipe)
    rows, fmt = to_trl(load_rows(data.path, data.split), data.format, data.system_prompt, data.path)
    if data.eval_path:
        eval_rows, _ = to_trl(load_rows(data.eval_path, data.split), fmt, data.system_prompt, data.eval_path)
    elif data.eval_fraction > 0:
        order = list(range(len(rows)))
        random.Random(data.seed).shuffle(order)
        held = max(1, round(len(rows) * data.eval_fraction))
        held_out = set(order[:held])
        eval_rows = [rows[i] for i in sorted(held_out)]
        rows = [row for i, row in enumerate(rows) if i not in held_out]
    else:
        eval_rows = []
    if data.max_rows:
        rows = rows[: data.max_rows]
    if data.eval_rows is not None:
        eval_rows = eval_rows[: data.eval_rows]
    return PreparedData(rows, eval_rows, fmt, data.path)


def _builtin(recipe: Recipe) -> PreparedData:
    from fasttune.tasks import get_task

    data = recipe.data
    name = data.path[len(BUILTIN_PREFIX):]
    try:
        task = get_task(name)
    except KeyError as err:
        raise UserError(Problem("data.path", data.path, str(err.args[0]), "use builtin:<task> with a known task, or a file")) from None
    # Held-out rows come from the task's own eval seed and name pools, so they never overlap the
    # training rows whatever data.seed is.
    train_rows = task.generate(data.max_rows or BUILTIN_TRAIN_ROWS, data.seed, split="train")
    eval_rows = task.generate(data.eval_rows or BUILTIN_EVAL_ROWS, task.eval_seed, split="eval")
    train, fmt = to_trl(train_rows, "messages", data.system_prompt, data.path)
    held, _ = to_trl(eval_rows, "messages", data.system_prompt, data.path)
    return PreparedData(train, held, fmt, data.path)
