"""A demo task's metric on held-out rows: their answers (generated in batches) scored by the task."""
from __future__ import annotations

from typing import Any

from fasttune.inference.generation import Sampling, answer_all
from fasttune.inference.prompts import prompt_and_reference, shown
from fasttune.tasks import Task

SAMPLES = 3
"""Rows whose texts are kept (the report shows ``eval.samples`` of them)."""


def evaluate_task(task: Task, model, tokenizer, rows: list[dict], max_new_tokens: int, stops=(), adapter: bool = True,
                  on_batch=None) -> dict[str, Any]:
    """``{"metrics": task.score(...), "samples": [...], "answers": [...]}``: greedy answers for ``rows``."""
    pairs = [prompt_and_reference(row) for row in rows]
    answers = answer_all(model, tokenizer, [prompt for prompt, _ in pairs], Sampling(max_new_tokens=max_new_tokens), stops,
                         on_batch=on_batch, adapter=adapter)
    samples = [{"prompt": shown(prompt), "prediction": answer, "reference": reference}
               for (prompt, reference), answer in zip(pairs[:SAMPLES], answers)]
    return {"metrics": task.score(answers, rows), "samples": samples, "answers": answers}
