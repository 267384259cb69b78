"""From ``data:`` to train and eval rows in TRL's shapes (no tokenizer, no weights).

Read every source of ``data.path`` → apply ``data.mapping`` → detect the shape (sources must
agree) → convert each row, collecting bad rows by kind → ``data.on_bad_row`` → hold out eval rows.
A ``formatting_func`` (``hooks.formatting_func``) takes the place of mapping and detection: each row
as read becomes ``{"text": formatting_func(row)}``, as TRL's SFTTrainer makes it (trl 1.14.2,
``SFTTrainer._prepare_dataset``: one row at a time, ``batched=False``), then a text row as any other.
"""
from __future__ import annotations

import logging
import random
import typing
from dataclasses import dataclass, field

from fasttune.config import BUILTIN_PREFIX, DataSection, Recipe, eval_sets, source_paths
from fasttune.data.formats import BadRow, convert, detect
from fasttune.data.mapping import check_columns, compile_mapping, map_row, output_columns
from fasttune.data.report import DataReport
from fasttune.data.sources import load_source
from fasttune.errors import Problem, UserError
from fasttune.hooks import hook_name, raised_at
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
    """The same for ``data.eval_path``, when it is one set."""
    eval_sets: dict[str, list[dict]] = field(default_factory=dict)
    """Named eval sets (``data.eval_path`` a mapping), in the recipe's order; ``eval`` holds the first's
    rows (what the task metric is measured on). Empty for one set or none."""
    eval_reports: dict[str, DataReport] = field(default_factory=dict)
    """The DataReport of each named eval set."""

    @property
    def eval_rows(self) -> int:
        """Held-out rows in all: every named eval set's, or the one eval set's."""
        return sum(map(len, self.eval_sets.values())) if self.eval_sets else len(self.eval)

    def eval_summary(self) -> str:
        """``12 eval rows``, or ``eval sets easy 6, hard 6 rows``: for the verbs' one-line summaries."""
        if self.eval_sets:
            return "eval sets " + ", ".join(f"{name} {len(rows)}" for name, rows in self.eval_sets.items()) + " rows"
        return f"{len(self.eval)} eval rows"

    def reports(self) -> list[DataReport]:
        """Every DataReport: the training data's, then the eval data's."""
        return [r for r in (self.report, self.eval_report, *self.eval_reports.values()) if r is not None]


def read_data(recipe: Recipe, formatting_func: typing.Optional[typing.Callable[[dict], str]] = None) -> PreparedData:
    """Train and eval rows of ``recipe.data`` in TRL's shapes (see the module docstring)."""
    data = recipe.data
    paths = source_paths(data.path)
    if paths and paths[0].startswith(BUILTIN_PREFIX):
        return _builtin(recipe, formatting_func)
    rows, report = read_rows(paths, data, formatting_func=formatting_func)
    eval_report = None
    named = eval_sets(data.eval_path)
    if named:
        return _with_eval_sets(rows, report, paths, named, data, formatting_func)
    if data.eval_path:
        # eval_path wins over eval_fraction: a held-out file is the more deliberate choice.
        eval_rows, eval_report = read_rows(source_paths(data.eval_path), data, fmt=report.format, key="data.eval_path",
                                           formatting_func=formatting_func)
    elif data.eval_fraction > 0:
        order = list(range(len(rows)))
        random.Random(data.seed).shuffle(order)
        held_out = set(order[: max(1, round(len(rows) * data.eval_fraction))])
        eval_rows = [rows[i] for i in sorted(held_out)]
        rows = [row for i, row in enumerate(rows) if i not in held_out]
    else:
        eval_rows = []
    rows = _first_rows(rows, data.max_rows, report, "")
    eval_rows = _first_rows(eval_rows, data.eval_rows, eval_report or report, "eval ")
    return PreparedData(rows, eval_rows, report.format, ", ".join(paths), report, eval_report)


def _first_rows(rows: list[dict], limit: typing.Optional[int], report: DataReport, kind: str) -> list[dict]:
    """``data.max_rows`` / ``data.eval_rows``: the first ``limit`` rows, said in the report."""
    if limit is None or len(rows) <= limit or (not kind and not limit):  # max_rows 0 or null: every row
        return rows
    report.notes.append(f"data.{'eval_' if kind else 'max_'}rows={limit}: using {limit} of {len(rows)} {kind}rows")
    return rows[:limit]


def _with_eval_sets(rows: list[dict], report: DataReport, paths: list[str], named: dict[str, list[str]], data: DataSection,
                    formatting_func) -> PreparedData:
    """Named eval sets: each read like a single eval_path (the training rows' shape), cut to
    ``data.eval_rows`` each; a set left with no rows (``eval_rows=0``) is not evaluated."""
    sets, reports = {}, {}
    for name, sources in named.items():
        set_rows, reports[name] = read_rows(sources, data, fmt=report.format, key=f"data.eval_path.{name}", formatting_func=formatting_func)
        set_rows = _first_rows(set_rows, data.eval_rows, reports[name], f"eval ({name}) ")
        if set_rows:
            sets[name] = set_rows
    rows = _first_rows(rows, data.max_rows, report, "")
    first = next(iter(sets.values()), [])
    return PreparedData(rows, first, report.format, ", ".join(paths), report, None, sets, reports)


def read_rows(paths: list[str], data: DataSection, fmt: typing.Optional[str] = None,
              key: str = "data.path", formatting_func: typing.Optional[typing.Callable[[dict], str]] = None,
              needs_answer: bool = True) -> tuple[list[dict], DataReport]:
    """Every usable row of ``paths`` in TRL's shape, and what happened to the others.

    ``fmt`` forces a shape (the train data's, for eval_path); else ``data.format``, where
    ``auto`` detects it per source and requires the sources to agree. ``key`` is the recipe key
    that named ``paths`` (``data.path`` or ``data.eval_path``), for the messages. A
    ``formatting_func`` makes each row as read a ``text`` row (no mapping, no detection).
    ``needs_answer=False``: rows to answer (``generate``), which need no assistant turn or completion.
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
        if formatting_func is not None:
            # "Applying the formatting function explicitly converts the dataset into a language modeling type" (trl 1.14.2)
            shape = "text"
        else:
            shape = forced or detect(output_columns(templates) if templates else rows[0], f"{path} row 1 columns", needs_answer)
        shapes[path] = shape
        report.add_file(path)
        for number, row in enumerate(rows, start=1):
            report.rows_read += 1
            report.rows_kept += 1
            try:
                if formatting_func is not None:
                    row = {"text": formatted(formatting_func, row, f"{path} row {number}")}
                out.append(convert(map_row(row, templates) if templates else row, shape, data.system_prompt, needs_answer))
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


def formatted(formatting_func: typing.Callable[[dict], str], row: dict, where: str) -> str:
    """``formatting_func(row)``, which must be the row's text (one string: TRL 1.14.2 calls it per row).
    An exception of the user's function is a UserError naming the row it was called with and the line
    that raised; an empty text is a bad row of its own kind (``data.on_bad_row`` applies)."""
    name = hook_name(formatting_func)
    try:
        text = formatting_func(row)
    except Exception as err:
        columns = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
        raise UserError(Problem("hooks.formatting_func", name, f"raised {type(err).__name__}: {err} when called with {where}"
                                f"{raised_at(err, formatting_func)}; the row's columns: {columns}",
                                f"make {name} read the columns these rows have, or point the data at rows it was written for"),
                        "hooks.formatting_func failed") from err
    if not isinstance(text, str):
        batched = isinstance(text, list) and all(isinstance(t, str) for t in text)
        raise UserError(Problem("hooks.formatting_func", name, f"returned a {type(text).__name__} for {where}; it must return the row's "
                                "text, one string" + (" (a list of strings is the batched form of older TRL versions; TRL 1.14.2 "
                                                      "calls it with one row at a time)" if batched else ""),
                                "return one string for the row it is given"))
    if not text.strip():
        raise BadRow(f"hooks.formatting_func returned {'an empty string' if not text else 'only whitespace'}",
                     f"make {name} return the row's text for them")
    return text


def _columns(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows[:1000]:  # enough to name the columns; a column absent later is a bad row
        seen.update(dict.fromkeys(row))
    return list(seen)


def _builtin(recipe: Recipe, formatting_func=None) -> PreparedData:
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
    report = _convert_all(train_rows, data.path, data.system_prompt, formatting_func)
    eval_report = _convert_all(eval_rows, data.path, data.system_prompt, formatting_func)
    return PreparedData(report[0], eval_report[0], report[1].format, data.path, report[1], eval_report[1])


def _convert_all(rows: list[dict], source: str, system_prompt: typing.Optional[str],
                 formatting_func=None) -> tuple[list[dict], DataReport]:
    shape = "messages" if formatting_func is None else "text"
    report = DataReport(source, shape, len(rows), len(rows))
    out = []
    for number, row in enumerate(rows, start=1):
        try:
            if formatting_func is not None:
                row = {"text": formatted(formatting_func, row, f"{source} row {number}")}
            out.append(convert(row, shape, system_prompt))
        except BadRow as bad:
            report.drop(bad.kind, number, bad.fix)
    report.apply_policy("error")  # generated rows are never bad: a failure here is fasttune's bug, said loudly
    return out, report
