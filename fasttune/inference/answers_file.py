"""``python -m fasttune generate``: the model's answer to every row of a data file, as JSONL.

Rows are read as training reads them (any shape, the run's ``data.mapping`` and system prompt),
except that they need no answer. Each output row holds ``prompt`` (the conversation up to its last
assistant turn, or the raw text), ``reference`` (that turn, where the row has one) and ``answer``,
in the input's order. Without ``--data`` a run's own held-out rows are answered (those its report
measured). Where every row has a reference and the run has an ``eval.task``, its metric is given.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from fasttune.atomic_io import atomic_write_text
from fasttune.config import DataSection, source_paths
from fasttune.errors import Problem, UserError
from fasttune.inference.generation import BATCH_SIZE, Sampling, answer_all
from fasttune.inference.loading import Loaded, Target
from fasttune.inference.prompts import prompt_and_reference


@dataclass(frozen=True)
class Rows:
    rows: list[dict]
    """In TRL's shapes (fasttune.data.rows)."""
    source: str


def read(target: Target, data: str | None) -> Rows:
    """``data``'s rows (any shape fasttune reads), or without it the run's held-out rows; checked before loading."""
    recipe = target.recipe
    if data is None:
        if recipe is None:
            raise UserError(Problem("--data", None, "is needed for a model that is not a run folder",
                                    "give the rows to answer: --data prompts.jsonl"))
        from fasttune.data.rows import read_data

        held_out = read_data(recipe).eval
        if not held_out:
            raise UserError(Problem("--data", None, f"is needed: the run {target.run_dir} held no rows out",
                                    "give the rows to answer: --data prompts.jsonl"))
        return Rows(held_out, f"the run's held-out rows ({recipe.data.path if isinstance(recipe.data.path, str) else 'data.path'})")
    from fasttune.data.rows import read_rows

    section = recipe.data if recipe is not None else DataSection()
    section = dataclasses.replace(section, path=data, eval_path=None, eval_fraction=0.0)
    rows, _ = read_rows(source_paths(data), section, key="--data", needs_answer=False)
    return Rows(rows, data)


def default_out(target: Target, data: str | None) -> Path:
    """``<run>/answers-<data stem>.jsonl`` (``answers-eval.jsonl`` for the held-out rows); here for a plain model."""
    stem = "eval" if data is None else Path(source_paths(data)[0]).stem
    return (target.run_dir or Path(".")) / f"answers-{stem}.jsonl"


def write_answers(loaded: Loaded, rows: Rows, out: Path, sampling: Sampling, console, batch_size: int = BATCH_SIZE) -> dict | None:
    """Answer ``rows`` into ``out`` (written whole, by rename); the task's metric where it applies, else None."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from fasttune.inference.chat import too_long
    from fasttune.inference.generation import batches, prompt_ids

    pairs = [prompt_and_reference(row) for row in rows.rows]
    lengths = [len(prompt_ids(loaded.tokenizer, prompt)) for prompt, _ in pairs]
    over = [(number, length) for number, length in enumerate(lengths, start=1)
            if length + sampling.max_new_tokens > loaded.context]
    if over:
        raise UserError(Problem("--data", rows.source, f"{len(over)} row{'s' * (len(over) > 1)} too long to answer (row "
                                + ", row ".join(f"{n}: {length} tokens" for n, length in over[:3]) + (", ..." if len(over) > 3 else "")
                                + ")", too_long(max(length for _, length in over), loaded.context, sampling.max_new_tokens)[1]
                                .replace("shorten it", "shorten those rows, or leave them out")))
    count = len(batches(lengths, sampling.max_new_tokens, batch_size))
    console.print(f"[bold]answering[/] {len(pairs)} rows in {count} batch{'es' * (count > 1)}, up to {sampling.max_new_tokens} "
                  "new tokens each (a batch ends with its longest answer)")
    with Progress(TextColumn("answering"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                  transient=True) as progress:
        bar = progress.add_task("answers", total=len(pairs))
        answers = answer_all(loaded.model, loaded.tokenizer, [p for p, _ in pairs], sampling, loaded.stops, batch_size,
                             on_batch=lambda n: progress.advance(bar, n))
    lines = []
    for (prompt, reference), answer in zip(pairs, answers):
        record = {"prompt": list(prompt.messages) if prompt.messages is not None else prompt.text}
        if reference is not None:
            record["reference"] = reference
        record["answer"] = answer
        lines.append(json.dumps(record, ensure_ascii=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines) + "\n")
    console.print(f"[green]wrote[/] {escape(str(out))}: {len(answers)} answer{'s' * (len(answers) != 1)} to {escape(rows.source)}")
    return _task_metric(loaded, rows, answers, [reference for _, reference in pairs], console)


def _task_metric(loaded: Loaded, rows: Rows, answers: list[str], references: list, console) -> dict | None:
    recipe = loaded.target.recipe
    if recipe is None or not recipe.eval.task:
        return None
    if any(reference is None for reference in references):
        console.print(f"[yellow]note[/] no {recipe.eval.task} metric: some rows have no reference answer")
        return None
    from fasttune.tasks import get_task

    task = get_task(recipe.eval.task)
    try:
        metrics = task.score(answers, rows.rows)
    except (KeyError, ValueError, TypeError, IndexError) as err:  # rows that are not the task's own shape
        console.print(f"[yellow]note[/] no {task.name} metric: these rows are not {task.name} rows ({type(err).__name__})")
        return None
    console.print(f"[bold]{task.name}[/]: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))  # as report.md shows them
    return metrics
