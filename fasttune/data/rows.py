"""From ``data:`` to train and eval rows in TRL's shapes (no tokenizer, no weights).

Read every source of ``data.path`` → apply ``data.mapping`` → detect the shape (sources must
agree) → convert each row, collecting bad rows by kind → ``data.on_bad_row`` → hold out eval rows.
"""
from __future__ import annotations

import logging
import random
import typing
from dataclasses import dataclass, field

from fasttune.config import BUILTIN_PREFIX, DataSection, Recipe, source_paths
from fasttune.data.formats import BadRow, convert, detect
from fasttune.data.mapping import check_columns, compile_mapping, map_row, output_columns
from fasttune.data.report import DataReport
from fasttune.data.sources import load_source
from fasttune.errors import Problem, UserError
from fasttune.tasks import get_task

log = logging.getLogger(__name__)

# Rows generated for a builtin task when data.max_rows / data.eval_rows are not set.
BUILTIN_TRAIN_ROWS = 1000
BUILTIN_EVAL_ROWS = 50


@dataclass
class PreparedData:
    train: list[dict]
    eval: list[dict]
    format: str
    source: str
    report: typing.Optional[DataReport] = None
    """Rows read, kept and dropped from ``data.path``."""
    eval_report: typing.Optional[DataReport] = field(default=None)
    """The same for ``data.eval_path``, when there is one."""


def read_data(recipe: Recipe) -> PreparedData:
    """Train and eval rows of ``recipe.data`` in TRL's shapes (see the module docstring)."""
    data = recipe.data
    paths = source_paths(data.path)
    if paths and paths[0].startswith(BUILTIN_PREFIX):
        return _builtin(recipe)
    rows, report = read_rows(paths, data)
    eval_report = None
    if data.eval_path:
        # eval_path wins over eval_fraction: a held-out file is the more deliberate choice.
        eval_rows, eval_report = read_rows(source_paths(data.eval_path), data, fmt=report.format, key="data.eval_path")
    elif data.eval_fraction > 0:
        order = list(range(len(rows)))
        random.Random(data.seed).shuffle(order)
        held_out = set(order[: max(1, round(len(rows) * data.eval_fraction))])
        eval_rows = [rows[i] for i in sorted(held_out)]
        rows = [row for i, row in enumerate(rows) if i not in held_out]
    else:
        eval_rows = []
    if data.max_rows and len(rows) > data.max_rows:
        report.notes.append(f"data.max_rows={data.max_rows}: using {data.max_rows} of {len(rows)} rows")
        rows = rows[: data.max_rows]
    if data.eval_rows is not None and len(eval_rows) > data.eval_rows:
        (eval_report or report).notes.append(f"data.eval_rows={data.eval_rows}: using {data.eval_rows} of {len(eval_rows)} eval rows")
        eval_rows = eval_rows[: data.eval_rows]
    return PreparedData(rows, eval_rows, report.format, ", ".join(paths), report, eval_report)


def read_rows(paths: list[str], data: DataSection, fmt: typing.Optional[str] = None,
              key: str = "data.path") -> tuple[list[dict], DataReport]:
    """Every usable row of ``paths`` in TRL's shape, and what happened to the others.

    ``fmt`` forces a shape (the train data's, for eval_path); else ``data.format``, where
    ``auto`` detects it per source and requires the sources to agree. ``key`` is the recipe key
    that named ``paths`` (``data.path`` or ``data.eval_path``), for the messages.
    """
    templates = {}
    if data.mapping:
        templates, problems = compile_mapping(data.mapping)
        if problems:
            raise UserError(problems, "data.mapping is not valid")
    forced = fmt or (None if data.format == "auto" else data.format)
    report = DataReport(", ".join(paths))
    shapes: dict[str, str] = {}
    out: list[dict] = []
    for path in paths:
        rows = load_source(path, data.split, key)
        if not rows:
            raise UserError(Problem(key, path, "holds no rows", f"point {key} at a file with examples"))
        if templates:
            check_columns(templates, _columns(rows), path)
        shape = forced or detect(output_columns(templates) if templates else rows[0], f"{path} row 1 columns")
        shapes[path] = shape
        report.add_file(path)
        for row in rows:
            report.rows_read += 1
            report.rows_kept += 1
            try:
                out.append(convert(map_row(row, templates) if templates else row, shape, data.system_prompt))
            except BadRow as bad:
                report.drop(bad.kind, report.rows_read, bad.fix)
    if len(set(shapes.values())) > 1:
        found = ", ".join(f"{path} is {shape}" for path, shape in shapes.items())
        raise UserError(Problem(key, list(shapes), f"sources must share one row shape ({found})",
                                "convert them to one shape, or set data.format to the shape they can all be read as"))
    report.format = next(iter(shapes.values()))
    report.apply_policy(data.on_bad_row)
    for line in report.lines():
        log.warning(line)
    return out, report


def _columns(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows[:1000]:  # enough to name the columns; a column absent later is a bad row
        seen.update(dict.fromkeys(row))
    return list(seen)


def _builtin(recipe: Recipe) -> PreparedData:
    data = recipe.data
    name = source_paths(data.path)[0][len(BUILTIN_PREFIX):]
    try:
        task = get_task(name)
    except KeyError as err:
        raise UserError(Problem("data.path", data.path, str(err.args[0]), "use builtin:<task> with a known task, or a file")) from None
    # Held-out rows come from the task's own eval seed and name pools, so they never overlap the
    # training rows whatever data.seed is.
    train_rows = task.generate(data.max_rows or BUILTIN_TRAIN_ROWS, data.seed, split="train")
    eval_rows = task.generate(data.eval_rows or BUILTIN_EVAL_ROWS, task.eval_seed, split="eval")
    report = _convert_all(train_rows, data.path, data.system_prompt)
    eval_report = _convert_all(eval_rows, data.path, data.system_prompt)
    return PreparedData(report[0], eval_report[0], "messages", data.path, report[1], eval_report[1])


def _convert_all(rows: list[dict], source: str, system_prompt: typing.Optional[str]) -> tuple[list[dict], DataReport]:
    report = DataReport(source, "messages", len(rows), len(rows))
    out = []
    for number, row in enumerate(rows, start=1):
        try:
            out.append(convert(row, "messages", system_prompt))
        except BadRow as bad:
            report.drop(bad.kind, number, bad.fix)
    report.apply_policy("error")  # generated rows are never bad: a failure here is fasttune's bug, said loudly
    return out, report
