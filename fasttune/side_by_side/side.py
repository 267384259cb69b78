"""One side of a bench run, in a process of its own: train the examples, measure, write JSON.

``python -m fasttune.side_by_side.side SPEC.json OUT.json``. SPEC names the side (``fasttune`` or
``vanilla``), the recipe and its overrides, and the warm-up; OUT receives the side document
described in fasttune/side_by_side/results.py.

- **fasttune**: the recipe exactly as ``python -m fasttune recipe`` runs it (runner.setup: the
  backend ``auto`` picks, fasttune's packing decision, its LoRA attachment).
- **vanilla**: the standard recipe of TRL's SFT guides on the same model, data, tokenizer and
  settings: ``AutoModelForCausalLM`` + the same ``BitsAndBytesConfig`` + TRL attaching the same
  ``LoraConfig`` + ``SFTTrainer`` with its default data handling (no packing), SDPA attention.

Each is its own process because Unsloth, once imported, patches transformers, TRL and PEFT for
the whole process. Tokens are counted from what each training forward receives (a forward
pre-hook), so the figures are what the model computed on, not what a data loader prepared.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from fasttune import machine, prepare
from fasttune.atomic_io import atomic_write_text
from fasttune.data.rows import read_data
from fasttune.data.tokenize import MaskRules, row_shape, rules_for_shape
from fasttune.errors import EXIT_USER_ERROR, SourceUnavailable, UserError
from fasttune.model import trained_adapter
from fasttune.model.backends import hf
from fasttune.model.source import resolve_model_source
from fasttune.model.tokenizer import load_tokenizer
from fasttune.report import installed_versions
from fasttune.train import runner

SIDES = ("fasttune", "vanilla")


class Meter:
    """Per optimizer step: wall time and the tokens of every micro-batch the model was given."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.training = False
        self.step_times, self.trained, self.real, self.total, self.losses = [], [], [], [], []
        self._batch = [0, 0, 0]
        self._started = 0.0

    def hook(self, module, args, kwargs):
        if not self.training:
            return
        ids, labels, mask = kwargs.get("input_ids"), kwargs.get("labels"), kwargs.get("attention_mask")
        if ids is None and args:
            ids = args[0]
        if ids is None:
            return
        self._batch[0] += int((labels != -100).sum()) if labels is not None else 0
        self._batch[1] += int(mask.sum()) if mask is not None else ids.numel() - _row_end_padding(kwargs.get("position_ids"))
        self._batch[2] += ids.numel()

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class _Timing(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                meter.training = True

            def on_step_begin(self, args, state, control, **kwargs):
                meter._started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if meter.cuda:
                    import torch

                    torch.cuda.synchronize()
                meter.step_times.append(time.perf_counter() - meter._started)
                for values, count in zip((meter.trained, meter.real, meter.total), meter._batch):
                    values.append(count)
                meter._batch = [0, 0, 0]

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs and len(meter.losses) < len(meter.step_times):
                    meter.losses.append(float(logs["loss"]))

            def on_train_end(self, args, state, control, **kwargs):
                meter.training = False

        return _Timing()


def _row_end_padding(position_ids) -> int:
    """Padding in packed rows without an attention mask: the run of position 0 ending each row (a
    real one-token sequence at a row's very end would count too: at most one token per row)."""
    if position_ids is None or position_ids.shape[0] < 2:
        return 0  # a single flattened row has no padding
    import torch

    nonzero_seen = (position_ids.flip(-1) != 0).to(torch.int32).cumsum(-1)
    return int((nonzero_seen == 0).sum())


def settings(recipe, configs, plan) -> dict:
    sft, lora = configs.sft, configs.lora
    return {
        "model": recipe.model.name, "max_length": sft.max_length, "lora_r": lora.r, "lora_alpha": lora.lora_alpha,
        "lora_dropout": lora.lora_dropout, "target_modules": sorted(lora.target_modules), "learning_rate": sft.learning_rate,
        "lr_scheduler_type": str(getattr(sft.lr_scheduler_type, "value", sft.lr_scheduler_type)),
        "warmup_steps": sft.warmup_steps, "seed": sft.seed,
        "quantization": configs.bnb.to_dict() if configs.bnb is not None else None,
        "per_device_train_batch_size": sft.per_device_train_batch_size,
        "gradient_accumulation_steps": sft.gradient_accumulation_steps,
        "gradient_checkpointing": bool(sft.gradient_checkpointing), "packing": bool(sft.packing),
        "examples": None, "dtype": plan.dtype,
    }


def run_side(spec: dict) -> dict:
    import dataclasses

    from rich.console import Console

    side = spec["side"]
    recipe = prepare.resolve(spec["recipe"], spec["overrides"])
    console = Console(stderr=True, soft_wrap=True, quiet=spec.get("quiet", False))
    facts = machine.detect()
    if side == "vanilla":
        plan = dataclasses.replace(machine.plan(recipe, facts, force_cpu=spec.get("force_cpu", False)),
                                   backend="hf", backend_reason="vanilla PEFT", attention="sdpa")
    else:  # as `python -m fasttune recipe` makes it: Unsloth first where the plan says so
        plan = prepare.plan_machine(recipe, facts, force_cpu=spec.get("force_cpu", False), training=True)
    from transformers import set_seed

    run_dir = Path(spec["work_dir"]) / side
    prepared = prepare.prepare(recipe, plan, run_dir)
    configs = prepared.configs
    configs.sft.disable_tqdm = True
    if side == "vanilla":
        configs.sft.packing = False
        configs.sft.padding_free = False
    meter = Meter(plan.device == "cuda")
    started = time.perf_counter()
    if side == "fasttune":
        session = runner.setup(prepared, console)
        trainer, engine, data = session.trainer, session.engine, session.data
        backend, reason, fast_path = engine.backend, engine.reason, engine.fast_path.describe() if engine.fast_path else None
    else:
        trainer, data = _vanilla_trainer(prepared, set_seed)
        backend, reason, fast_path = "hf", "vanilla: transformers + bitsandbytes + PEFT + TRL defaults", None
    load_s = time.perf_counter() - started
    trainer.model.register_forward_pre_hook(meter.hook, with_kwargs=True)
    trainer.add_callback(meter.callback())
    begun = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - begun
    eval_loss = trainer.evaluate()["eval_loss"] if data.eval else None
    document = settings(recipe, configs, plan)
    document["examples"] = len(data.train)
    return {
        "side": side, "settings": document, "backend": backend, "backend_reason": reason, "fast_path": fast_path,
        "attention": plan.attention, "device": plan.device_name, "versions": _versions(), "warmup": spec.get("warmup", 0),
        "step_times_s": meter.step_times, "trained_tokens": meter.trained, "real_tokens": meter.real,
        "total_tokens": meter.total, "losses": meter.losses, "eval_loss": eval_loss, **_peaks(plan.device == "cuda"),
        "load_s": load_s, "train_s": train_s, "wall_s": time.perf_counter() - started,
    }


def _vanilla_trainer(prepared, set_seed):
    """TRL's SFT guide: the same 4-bit config, TRL attaches the LoRA config, TRL's own data handling
    of the raw rows (the same rows, the same training template and loss mask)."""
    from datasets import Dataset
    from trl import SFTTrainer

    recipe, plan, configs = prepared.recipe, prepared.plan, prepared.configs
    data = read_data(recipe)
    # The loss fasttune trains for this shape, said to TRL in its own flags (it reads the raw rows).
    rules, _ = rules_for_shape(row_shape(data.train[0]), MaskRules.from_sft(configs.sft))
    configs.sft.assistant_only_loss, configs.sft.completion_only_loss = rules.assistant_only_loss, rules.completion_only_loss
    source = resolve_model_source(recipe.model.name)
    tokenizer, _ = load_tokenizer(source, recipe)
    set_seed(configs.sft.seed)
    model = hf.load_base(source, dtype=plan.dtype, attention="sdpa", device=plan.device, quantization=configs.bnb,
                         revision=recipe.model.revision)
    peft_config = configs.lora
    if recipe.model.adapter:  # TRL's way to train on an adapter: a trainable PeftModel, no peft_config
        model, peft_config = trained_adapter.attach(model, trained_adapter.locate(recipe.model.adapter).location), None
    trainer = SFTTrainer(model=model, args=configs.sft, train_dataset=Dataset.from_list(data.train),
                         eval_dataset=Dataset.from_list(data.eval) if data.eval else None, processing_class=tokenizer,
                         peft_config=peft_config)
    return trainer, data


def _peaks(cuda: bool) -> dict:
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    if not cuda:
        return {"peak_gpu_alloc_gib": None, "peak_gpu_reserved_gib": None, "peak_rss_gib": rss_gib}
    import torch

    return {"peak_gpu_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "peak_rss_gib": rss_gib}


def _versions() -> dict:
    return installed_versions(("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth"))


def main(argv: list[str]) -> int:
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    if spec.get("side") not in SIDES:
        raise SystemExit(f"side must be one of {SIDES}")

    try:
        document = run_side(spec)
    except (UserError, SourceUnavailable) as err:  # the message as the CLI gives it: the harness reports this line
        print(f"fasttune: {err.render() if isinstance(err, UserError) else err}", file=sys.stderr)
        return EXIT_USER_ERROR

    atomic_write_text(out_path, json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
