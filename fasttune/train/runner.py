"""One training run, top to bottom: setup (model, tokenizer, data), train, save.

Scope: a recipe that already resolved, bound and passed the machine checks (the CLI does those
before calling :func:`run`). Writes everything into the run directory; see README "Run directory".
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from fasttune.atomic_io import atomic_replace_dir, atomic_write_text
from fasttune.binding import Bound
from fasttune.config import Recipe
from fasttune.machine import MachinePlan


def new_run_dir(recipe: Recipe, root: Path = Path("runs")) -> Path:
    """``train.output_dir`` if the recipe sets it, else ``runs/<recipe>-<timestamp>``."""
    if recipe.train.get("output_dir"):
        return Path(recipe.train["output_dir"])
    return root / f"{recipe.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def write_config(run_dir: Path, recipe: Recipe, plan: MachinePlan) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    document = {**recipe.to_dict(), "machine": {"device": plan.device_name, "backend": plan.backend,
                                                "backend_reason": plan.backend_reason, "dtype": plan.dtype,
                                                "attention": plan.attention}}
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(document, sort_keys=False, allow_unicode=True))


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict = field(default_factory=dict)
    task: dict | None = None


def run(recipe: Recipe, plan: MachinePlan, bound: Bound, run_dir: Path, console) -> RunResult:
    started = time.time()
    if plan.backend == "unsloth":
        from fasttune.model.backends.unsloth import import_first

        import_first()
    # --- setup -------------------------------------------------------------------------------
    from datasets import Dataset
    from trl import SFTTrainer

    from fasttune.data.prepare import prepare
    from fasttune.model import backends
    from fasttune.model.source import resolve_model_source
    from fasttune.model.tokenizer import load_tokenizer
    from fasttune.report import installed_versions, plot_loss, write_report
    from fasttune.train.metrics_log import MetricsLog, read_metrics
    from fasttune.train.progress import use_rich_progress

    write_config(run_dir, recipe, plan)
    if bound.logging_dir:
        os.environ["TENSORBOARD_LOGGING_DIR"] = bound.logging_dir
    data = prepare(recipe)
    source = resolve_model_source(recipe.model.name)
    tokenizer = load_tokenizer(source, recipe)
    console.print(f"[bold]data[/] {len(data.train)} train / {len(data.eval)} eval rows ({data.format}) from {data.source}")
    console.print(f"[bold]model[/] {recipe.model.name} -> {plan.summary()}")
    model, peft_config = backends.load(plan.backend, source, recipe, plan, bound)

    task, before = _task_eval(recipe, model, tokenizer, data.eval, console, "before")
    trainer = SFTTrainer(
        model=model,
        args=bound.sft,
        train_dataset=Dataset.from_list(data.train),
        eval_dataset=Dataset.from_list(data.eval) if data.eval else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[MetricsLog(run_dir / "metrics.jsonl")],
    )
    trainable, total = _count_parameters(trainer.model)
    console.print(f"[bold]trainable[/] {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")

    # --- train -------------------------------------------------------------------------------
    with use_rich_progress(trainer, console):
        trainer.train()
    final = {}
    if data.eval:
        final = trainer.evaluate()

    # --- save --------------------------------------------------------------------------------
    if recipe.export.adapter or recipe.export.merged:
        _save_adapter(trainer, tokenizer, run_dir / "adapter")
    _, after = _task_eval(recipe, trainer.model, tokenizer, data.eval, console, "after")
    if recipe.export.merged and recipe.method != "full":
        from fasttune.export.merge import merge_adapter

        console.print("[bold]merge[/] adapter -> merged/ (16-bit)")
        merge_adapter(source, run_dir / "adapter", run_dir / "merged", tokenizer,
                      save_dtype="bfloat16" if plan.dtype == "float32" else plan.dtype,
                      revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)

    metrics = read_metrics(run_dir / "metrics.jsonl")
    plot_loss(metrics, run_dir / "loss.png")
    task_info = {"name": task.name, "before": before["metrics"], "after": after["metrics"]} if task else None
    info = {
        "recipe": recipe.name, "base_model": recipe.model.name, "method": recipe.method, "backend": plan.backend,
        "backend_reason": plan.backend_reason, "dtype": plan.dtype, "attention": plan.attention, "device": plan.device_name,
        "versions": installed_versions(), "data_source": data.source, "data_format": data.format,
        "train_rows": len(data.train), "eval_rows": len(data.eval), "wall_time_s": time.time() - started,
        "trainable_params": trainable, "total_params": total, "metrics": metrics, "eval_loss": final.get("eval_loss"),
        "task": task_info, "samples": _paired_samples(before, after, recipe.eval.samples) if task else None,
    }
    write_report(run_dir, info)
    return RunResult(run_dir, final, task_info)


def _task_eval(recipe: Recipe, model, tokenizer, rows: list[dict], console, when: str):
    if not recipe.eval.task or not rows:
        return None, None
    from fasttune.tasks import get_task

    task = get_task(recipe.eval.task)
    started = time.time()
    scored = task.evaluate(model, tokenizer, rows, max_new_tokens=recipe.eval.max_new_tokens)
    result = {"metrics": {k: v for k, v in scored.items() if k != "samples"}, "samples": scored.get("samples", [])}
    shown = ", ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items())
    console.print(f"[bold]{task.name} {when} training[/] on {len(rows)} held-out rows: {shown} ({time.time() - started:.0f}s)")
    return task, result


def _paired_samples(before: dict, after: dict, count: int) -> list[dict]:
    return [{"prompt": b["prompt"], "before": b["prediction"], "after": a["prediction"], "reference": b["reference"]}
            for b, a in zip(before["samples"][:count], after["samples"][:count])]


def _count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _save_adapter(trainer, tokenizer, out_dir: Path) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    trainer.model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    atomic_replace_dir(tmp, out_dir)
