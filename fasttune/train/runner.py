"""One training run, top to bottom: setup (data, tokenizer, model, trainer), train, save.

Scope: a :class:`fasttune.prepare.Prepared` (the recipe resolved, the machine planned, the
library configs bound: the CLI makes it before calling :func:`run`). Everything is written into the
run directory (README "Run directory").
The three stages are separate functions so tests can look at the model between them.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.markup import escape

from fasttune.atomic_io import atomic_dir, atomic_write_text
from fasttune.config import Recipe
from fasttune.data.rows import read_data
from fasttune.data.tokenize import IGNORE, truncate
from fasttune.disk import disk_full, gib, require_free
from fasttune.errors import Problem, UserError
from fasttune.export.exporter import export_run, request_from_recipe
from fasttune.export.model_card import model_card
from fasttune.hooks import guard_metric_hooks
from fasttune.inference.task_eval import evaluate_task
from fasttune.inspect_data import print_stats
from fasttune.machine import MachinePlan
from fasttune.model import backends
from fasttune.model.backends.hf import keep_adapter_in_plan_dtype, trainable_values
from fasttune.model.gguf_import import names_gguf
from fasttune.model.source import resolve_model_source
from fasttune.model.tokenizer import training_template
from fasttune.prepare import Inputs, Prepared
from fasttune.prepare import inputs as prepare_inputs
from fasttune.report import installed_versions, plot_loss, read_metrics, training_summary, write_report
from fasttune.run_folder import CONFIG, SUMMARY, save_dtype
from fasttune.tasks import get_task
from fasttune.train import space
from fasttune.train.checkpoints import atomic_checkpoints
from fasttune.train.distributed import is_main, world_size
from fasttune.train.longest_first import longest_batch_first
from fasttune.train.packed_rows import keep_packed_rows_apart, quiet_cross_contamination_warning


def write_config(run_dir: Path, recipe: Recipe, plan: MachinePlan, engine, hooks=None) -> None:
    """``config.yaml``: the resolved recipe plus what ran it (written once the engine has loaded the
    model; resume and export read it back through fasttune.run_folder.saved_config). Hooks a Python
    caller gave (``hooks``, fasttune.hooks.Hooks) are named under ``python_hooks``: a resume from the
    command line cannot have them, and says so as a change of recipe."""
    run_dir.mkdir(parents=True, exist_ok=True)
    machine = {"device": plan.device_name, "backend": plan.backend, "backend_reason": plan.backend_reason,
               "dtype": plan.dtype, "attention": plan.attention, "processes": world_size(),
               "fast_path": engine.fast_path.describe() if engine.fast_path is not None else None, "kernels": engine.kernels}
    document = {**recipe.to_dict(), "machine": machine}
    given = python_hooks(recipe, hooks)
    if given:
        document["python_hooks"] = given
    atomic_write_text(run_dir / CONFIG, yaml.safe_dump(document, sort_keys=False, allow_unicode=True))


def python_hooks(recipe: Recipe, hooks) -> dict:
    """The hooks of the run that the recipe does not name (a Python caller's objects), as ``module:function``."""
    from fasttune.hooks import hook_name

    if hooks is None:
        return {}
    out = {key: hook_name(getattr(hooks, key)) for key in ("formatting_func", "compute_metrics", "preprocess_logits_for_metrics")
           if getattr(hooks, key) is not None and getattr(recipe.hooks, key) is None}
    if hooks.callbacks and not recipe.hooks.callbacks:
        out["callbacks"] = [hook_name(type(callback)) for callback in hooks.callbacks]
    return out


@dataclass
class Session:
    """Everything a run holds between its stages."""

    prepared: Prepared
    console: object
    source: str
    """The local folder or hub id the weights load from."""
    inputs: Inputs
    trainer: object
    """trl.SFTTrainer"""
    started: float
    engine: object
    """fasttune.model.backends.Engine: what actually loaded the model"""
    task: object | None = None
    before: dict | None = None
    final_eval: dict | None = None
    after: dict | None = None

    @property
    def recipe(self) -> Recipe:
        return self.prepared.recipe

    @property
    def plan(self) -> MachinePlan:
        return self.prepared.plan

    @property
    def run_dir(self) -> Path:
        return self.prepared.run_dir

    @property
    def data(self):
        return self.inputs.data

    @property
    def tokenizer(self):
        return self.inputs.tokenizer


def run(prepared: Prepared, console, resume_from: str | None = None) -> Session:
    session = setup(prepared, console)
    train(session, resume_from)
    save(session)
    return session


def setup(prepared: Prepared, console) -> Session:
    """Rows, tokenizer and model as ``prepared`` says (fasttune.prepare made it in this process,
    Unsloth imported first where the plan says unsloth), and the SFTTrainer over them."""
    started = time.time()
    recipe, plan, configs, run_dir = prepared.recipe, prepared.plan, prepared.configs, prepared.run_dir
    from trl import SFTTrainer

    from fasttune.train.metrics_log import MetricsLog

    quiet_library_progress_bars()
    if configs.logging_dir:
        os.environ["TENSORBOARD_LOGGING_DIR"] = configs.logging_dir
    hooks = prepared.hooks
    # before the model: a data problem is said before a GGUF file is converted
    data = read_data(recipe, hooks.formatting_func)
    console.print(f"[bold]data[/] {len(data.train)} train / {escape(data.eval_summary())} ({data.format}) from {escape(data.source)}"
                  + (" (rows made by hooks.formatting_func)" if hooks.formatting_func else ""))
    console.print(f"[bold]model[/] loading {escape(recipe.model.name)} ({plan.backend} backend, {plan.dtype}, {plan.device_name})"
                  + ("; a GGUF file is converted once, then cached" if names_gguf(recipe.model.name) else ""))
    for line in (data.report.lines() if data.report else []):
        console.print(f"[yellow]data[/] {escape(line)}")
    source = resolve_model_source(recipe.model.name)
    inputs = prepare_inputs(prepared, source, data)
    console.print(f"[bold]template[/] {escape(inputs.template.describe())}")
    if is_main():
        print_stats(inputs.stats.to_dict(), console)
    # LoRA's A matrices are random and the Trainer seeds only later: seed first, so the same recipe
    # gives the same adapter, and a resumed run the same as an uninterrupted one.
    from transformers import set_seed

    set_seed(configs.sft.seed)
    model, engine = backends.load(source, recipe, plan, configs)
    console.print(f"[bold]engine[/] {escape(engine.describe())}")
    if recipe.model.adapter:
        lora = recipe.lora
        console.print(f"[bold]adapter[/] training on from {escape(recipe.model.adapter)} (its own settings: r {lora.get('r')}, "
                      f"alpha {lora.get('lora_alpha')})")
    if engine.fast_path is not None and engine.fast_path.layers and not engine.fast_path.fused:
        console.print("[yellow]slow path[/] Unsloth did not fuse every layer; see the notes above for the settings that cost it")
    task, before = None, None
    if is_main():
        write_config(run_dir, recipe, plan, engine, prepared.hooks)
        task, before = _task_eval(recipe, model, inputs.tokenizer, data, console, "before")

    before_trl = trainable_values(model) if configs.bnb is not None and plan.dtype != "bfloat16" else {}
    with quiet_cross_contamination_warning(configs.sft, plan.attention):  # rows are kept apart just below
        trainer = SFTTrainer(
            model=model,
            args=args_for_tokenized_rows(configs.sft),
            train_dataset=trainable_rows(inputs.train, configs.sft),
            eval_dataset=eval_dataset(inputs, configs.sft),
            processing_class=inputs.tokenizer,
            callbacks=[MetricsLog(run_dir / "metrics.jsonl", data.eval_sets), *hooks.callbacks],
            compute_metrics=hooks.compute_metrics,
            preprocess_logits_for_metrics=hooks.preprocess_logits_for_metrics,
        )
    keep_packed_rows_apart(trainer, plan.attention)
    if plan.device == "cuda" and world_size() == 1:
        longest_batch_first(trainer)  # an out-of-memory comes at step 1, not hours in
    guard_metric_hooks(trainer)  # the user's compute_metrics failing at an evaluation: a UserError, not a traceback

    atomic_checkpoints(trainer)
    if configs.bnb is not None:
        keep_adapter_in_plan_dtype(trainer.model, plan, before_trl)
    trainable, total = count_parameters(trainer.model)
    console.print(f"[bold]trainable[/] {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return Session(prepared, console, source, inputs, trainer, started, engine, task, before)


def trainable_rows(tokenized, sft):
    """The dataset SFTTrainer trains on: fasttune's own ``input_ids`` and ``labels``, the very rows
    ``data inspect`` shows. TRL (trl 1.14.2, ``SFTTrainer._prepare_dataset``) then tokenizes nothing
    again: it keeps a dataset's ``labels``, truncates or packs them, and its collator reads them.

    Without packing the rows are cut to ``max_length`` here, as TRL cuts them (a no-op for TRL, but
    Unsloth's replacement of ``_prepare_dataset`` on CUDA does not truncate pre-tokenized rows), and
    rows left with no trained token are dropped, as TRL drops them. With ``assistant_only_loss`` a
    row whose template marks no assistant token is refused, as TRL refuses raw rows."""
    rules = tokenized.rules
    if rules.assistant_only_loss and 0 in tokenized.facts["trained"]:
        row = tokenized.facts["trained"].index(0)
        raise UserError(Problem("data.chat_template", row, "this row (0-based) has no assistant token to train with "
                                "train.assistant_only_loss=true", "give every row an assistant reply, or use a template "
                                "with {% generation %} markers (fasttune/families/templates)"))
    dataset = tokenized.dataset
    if sft.packing or rules.max_length is None:
        return dataset

    def cut(row):
        return {key: truncate(row[key], rules.max_length, rules.truncation_mode) for key in ("input_ids", "labels")}

    return dataset.map(cut).filter(lambda row: any(label != IGNORE for label in row["labels"]))


def eval_dataset(inputs: Inputs, sft):
    """What SFTTrainer evaluates: one dataset, or named eval sets as a dict, which transformers'
    Trainer evaluates one by one and logs as ``eval_<name>_loss`` (transformers 5.17, Trainer.evaluate)."""
    if inputs.eval_sets:
        return {name: trainable_rows(tokenized, sft) for name, tokenized in inputs.eval_sets.items()}
    return trainable_rows(inputs.eval, sft) if inputs.eval is not None else None


def args_for_tokenized_rows(sft):
    """The SFTConfig SFTTrainer gets with tokenized rows: ``assistant_only_loss`` is already in their
    labels, and TRL refuses the flag for a dataset that is not conversational text."""
    import dataclasses

    return dataclasses.replace(sft, assistant_only_loss=False) if sft.assistant_only_loss else sft


def train(session: Session, resume_from: str | None = None) -> None:
    """Train; Ctrl-C saves a checkpoint and raises TrainingInterrupted (see train/resume.py).

    The disk is checked first (two checkpoints and the final saves must fit); a disk that fills
    anyway, inside a checkpoint, ends with a UserError naming it, the previous checkpoint intact.
    """
    from fasttune.train.progress import use_rich_progress
    from fasttune.train.resume import GracefulInterrupt, TrainingInterrupted

    trainer, run_dir = session.trainer, session.run_dir
    needed = space.estimate(trainer.model, session.recipe, trainer.args)
    if is_main():
        require_free(run_dir, needed.total, f"this run ({needed.describe()})", "train.output_dir",
                     "free some space, put the run on a larger disk (train.output_dir=DIR), lower save_total_limit "
                     "or export fewer GGUF types")
    try:
        with GracefulInterrupt(session.console) as interrupt, use_rich_progress(trainer, session.console):
            trainer.add_callback(interrupt)
            trainer.train(resume_from_checkpoint=resume_from)
    except OSError as err:
        full = disk_full(err, f"checkpoint-{trainer.state.global_step} into {run_dir / 'checkpoints'}", run_dir,
                         f"free at least {gib(needed.checkpoint * 1.2)} (one checkpoint), then continue from the "
                         f"last complete checkpoint with --resume {run_dir}")
        if full is None:
            raise
        raise full from None
    except Exception as err:
        if type(err).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
            raise
        from fasttune.memory.for_run import out_of_memory
        from fasttune.train.checkpoints import CHECKPOINT, step_of

        saved = [p for p in (run_dir / "checkpoints").glob("checkpoint-*") if CHECKPOINT.match(p.name)]
        newest = str(max(saved, key=step_of)) if saved else None
        resume = f"python -m fasttune recipe {session.recipe.name} --resume {run_dir}"
        raise out_of_memory(session.recipe, trainer.state.global_step, newest, resume) from None
    if interrupt.requested:
        raise TrainingInterrupted(session.run_dir, trainer.state.global_step)


def final_evaluation(trainer) -> dict:
    """The evaluation after training: one eval set's metrics as the trainer names them (``eval_loss``, ...),
    or, for named eval sets, each set evaluated on its own: ``{name: {metric: value}}``, the ``eval_<name>_``
    taken off. One ``evaluate`` of the dict would merge the sets: TRL 1.14.2's ``SFTTrainer.log`` adds its own
    ``eval_entropy``, ``eval_mean_token_accuracy``, ``eval_num_tokens`` to each set's metrics without the set's
    name, so the last set's would win."""
    if not isinstance(trainer.eval_dataset, dict):
        return trainer.evaluate()
    out = {}
    for name in trainer.eval_dataset:
        prefix = f"eval_{name}"
        metrics = trainer.evaluate(eval_dataset=name, metric_key_prefix=prefix)  # a str: the set SFTTrainer prepared
        out[name] = {key.removeprefix(f"{prefix}_").removeprefix("eval_"): value for key, value in metrics.items()}
    return out


def save(session: Session) -> None:
    """The trained weights first (always: a finished run holds what it trained), then the
    evaluation after training and ``summary.json`` (what the report shows), the exports the recipe
    asks for, and last ``report.md``, which lists every output. Each output
    is written under a temporary name and renamed when whole; SIGTERM here stops like Ctrl-C
    (nothing half-written is left), and ``--resume`` then redoes only what is missing."""
    from fasttune.train.resume import terminate_raises_interrupt

    recipe, run_dir, trainer = session.recipe, session.run_dir, session.trainer
    with terminate_raises_interrupt():
        if is_main():  # rank 0 writes for every process of a data-parallel run
            save_trained_weights(session)
        # After the weights: a hook that fails here cannot cost the training. In every process: the
        # evaluation shares the eval rows out over them and gathers the losses, as during training.
        if session.data.eval:
            session.final_eval = final_evaluation(trainer)
        if not is_main():
            return
        _, after = _task_eval(recipe, trainer.model, session.tokenizer, session.data, session.console, "after")
        metrics = read_metrics(run_dir / "metrics.jsonl")
        plot_loss(metrics, run_dir / "loss.png", session.data.eval_sets)
        trainable, total = count_parameters(trainer.model)
        plan, data, before, task = session.plan, session.data, session.before, session.task
        info = {
            "recipe": recipe.name, "base_model": recipe.model.name, "method": recipe.method, "adapter": recipe.model.adapter,
            "backend": plan.backend,
            "backend_reason": plan.backend_reason, "dtype": plan.dtype, "attention": plan.attention, "device": plan.device_name,
            "fast_path": session.engine.fast_path.describe() if session.engine.fast_path is not None else None,
            "kernels": session.engine.kernels, "processes": world_size(),
            "versions": installed_versions(), "data_source": data.source, "data_format": data.format,
            "train_rows": len(data.train), "eval_rows": data.eval_rows,
            "eval_sets": {name: len(rows) for name, rows in data.eval_sets.items()} or None,
            "trainable_params": trainable, "total_params": total, "metrics": metrics,
            "eval_loss": None if data.eval_sets else (session.final_eval or {}).get("eval_loss"),
            "eval_losses": {name: (session.final_eval or {}).get(name, {}).get("loss") for name in data.eval_sets} or None,
            "eval_metrics": session.final_eval,  # named eval sets: {name: {metric: value}}, each set's own final evaluation
            "task": {"name": task.name, "before": before["metrics"], "after": after["metrics"]} if task else None,
            "samples": _paired_samples(before, after, recipe.eval.samples) if task else None,
        }
        info["wall_time_s"] = time.time() - session.started
        # Training is finished once this is written: --resume then redoes only the exports.
        atomic_write_text(run_dir / SUMMARY, json.dumps(info, indent=1, default=str))
        session.after = after
        request = request_from_recipe(recipe)
        if request.merged or request.gguf:
            request.save_dtype = save_dtype(plan.dtype)
            export(run_dir, recipe, request, session.console, tokenizer=session.tokenizer,
                   card_info={**training_summary(metrics, data.eval_sets), **info})
        write_report(run_dir, info)


def export(run_dir: Path, recipe: Recipe, request, console, **kwargs) -> list[Path]:
    """``export_run``, with a disk that fills on the way said as such (the outputs written so far stay whole)."""
    try:
        return export_run(run_dir, recipe, request, console, **kwargs)
    except OSError as err:
        full = disk_full(err, "the export (merged/, gguf/)", Path(request.out or run_dir),
                         f"free some space, then finish the export with --resume {run_dir} "
                         f"(or python -m fasttune export {run_dir})")
        if full is None:
            raise
        raise full from None


def save_trained_weights(session: Session) -> Path:
    """``adapter/`` (LoRA, QLoRA) or ``model/`` (full fine-tuning: 16-bit safetensors, sharded, with
    a model card), with the tokenizer and its training template, written atomically."""
    recipe, run_dir, trainer = session.recipe, session.run_dir, session.trainer
    if recipe.method != "full" and not recipe.export.adapter:
        session.console.print("[yellow]note[/] export.adapter=false: the adapter is kept anyway (a run always keeps what it "
                              "trained; it is what merged/ and GGUF exports are made from)")
    final = run_dir / ("model" if recipe.method == "full" else "adapter")
    with atomic_dir(final) as tmp:
        if recipe.method == "full":
            save_16bit(trainer.model, tmp, save_dtype(session.plan.dtype))
            card_info = {**training_summary(read_metrics(run_dir / "metrics.jsonl"), session.data.eval_sets),
                         "train_rows": len(session.data.train),
                         "data_source": session.data.source, "data_format": session.data.format}
            (tmp / "README.md").write_text(model_card(recipe, card_info), encoding="utf-8")
        else:
            trainer.model.save_pretrained(tmp, safe_serialization=True)
        session.tokenizer.save_pretrained(tmp)
    return final


def save_16bit(model, folder: Path, dtype: str, max_shard_size: str = "2GB") -> None:
    """``model`` as ``dtype`` safetensors shards with its config, without changing the model in memory
    (a float32 CPU run keeps training or evaluating in float32; only the saved copy is 16-bit)."""
    import torch

    torch_dtype = getattr(torch, dtype)
    # Tied weights (embeddings and lm_head) share one tensor: convert it once, so save_pretrained
    # still sees one storage and writes it once.
    converted: dict[tuple, object] = {}
    state = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in converted:
            converted[key] = tensor.detach().to(torch_dtype) if tensor.is_floating_point() else tensor
        state[name] = converted[key]
    model.save_pretrained(folder, state_dict=state, safe_serialization=True, max_shard_size=max_shard_size)
    # save_pretrained writes the dtype of the model in memory into config.json; the shards are dtype.
    config_path = folder / "config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    saved["dtype"] = dtype
    config_path.write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")


def quiet_library_progress_bars() -> None:
    """One display per run: ours. The libraries' tqdm bars (tokenizing, loading shards) would
    interleave with it and fill logs with carriage returns."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _task_eval(recipe: Recipe, model, tokenizer, data, console, when: str):
    """``eval.task`` measured on ``data.eval`` (fasttune.data.rows.PreparedData): with named eval sets, the
    rows of the data's first set (a set of the recipe left with no rows is not one of them)."""
    rows = data.eval
    if not recipe.eval.task or not rows:
        return None, None

    task = get_task(recipe.eval.task)
    first = next(iter(data.eval_sets), None)
    console.print(f"[bold]{task.name} {when} training[/]: generating answers for {len(rows)} held-out rows"
                  + (f" (eval set {escape(first)}, the first)" if first else "") + "...")
    started = time.time()
    result = evaluate_task(task, model, tokenizer, rows, recipe.eval.max_new_tokens, training_template(tokenizer, recipe).stop)
    shown = ", ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items())
    console.print(f"[bold]{task.name} {when} training[/]: {shown} ({time.time() - started:.0f}s)")
    return task, result


def _paired_samples(before: dict, after: dict, count: int) -> list[dict]:
    return [{"prompt": b["prompt"], "before": b["prediction"], "after": a["prediction"], "reference": b["reference"]}
            for b, a in zip(before["samples"][:count], after["samples"][:count])]


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
