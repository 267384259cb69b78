"""``python -m fasttune bench``: the same work through fasttune and through vanilla PEFT.

Both sides train one pass over the same first N examples of the recipe's data (``--examples``;
``--steps`` caps vanilla's optimizer steps, and both sides then train on exactly the examples
those steps consume), with the same model, max_length, LoRA, learning rate, schedule and seed.
Vanilla runs first, then fasttune, each in its own process (fasttune/side_by_side/side.py); the figures
and the report come from fasttune/side_by_side/results.py.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fasttune import machine, prepare
from fasttune.binding import packing_decision
from fasttune.data.rows import read_data
from fasttune.errors import Problem, UserError
from fasttune.model.source import is_local
from fasttune.output_paths import folder_problem
from fasttune.side_by_side.random_model import architecture, build_random_model
from fasttune.side_by_side.results import PLOT_FILE, REPORT_FILE, RESULTS_FILE, write_results

# What the bench sets on both sides: one pass, every step logged, nothing saved or evaluated mid-run.
BENCH_OVERRIDES = ("train.num_train_epochs=1", "train.max_steps=-1", "train.logging_steps=1", "train.save_strategy=no",
                   "train.eval_strategy=no", "eval.task=null", "export.merged=false", "export.gguf=[]")
TRL_DEFAULT_BATCH = 8


@dataclass
class BenchRequest:
    recipe: str
    examples: int = 256
    steps: int | None = None
    warmup: int = 2
    random_init: bool = False
    out: Path | None = None
    overrides: list[str] = field(default_factory=list)
    force_cpu: bool = False
    timeout_s: int = 3600


def examples_to_train(recipe, request: BenchRequest) -> int:
    """``--examples``, or fewer when ``--steps`` caps vanilla's optimizer steps."""
    batch = int(recipe.train.get("per_device_train_batch_size", TRL_DEFAULT_BATCH))
    accumulation = int(recipe.train.get("gradient_accumulation_steps", 1))
    examples = request.examples
    if request.steps is not None:
        examples = min(examples, request.steps * batch * accumulation)
    if math.ceil(examples / (batch * accumulation)) <= request.warmup:
        raise UserError(Problem("--examples", examples, f"gives {math.ceil(examples / (batch * accumulation))} optimizer steps "
                                f"(batch {batch} x accumulation {accumulation}), not more than the {request.warmup} warm-up steps",
                                "raise --examples/--steps or lower --warmup"))
    return examples


def run_bench(request: BenchRequest, console) -> dict:
    recipe = prepare.resolve(request.recipe, request.overrides)
    if recipe.method not in ("lora", "qlora"):
        raise UserError(Problem("method", recipe.method, "the bench compares LoRA/QLoRA against vanilla PEFT", "bench a lora or qlora recipe"))
    if recipe.hooks.named():
        raise UserError(Problem("hooks", sorted(recipe.hooks.named()), "change what fasttune's side trains or measures, and the "
                                "vanilla side reads the rows without them: the two would not do the same work",
                                "bench the recipe without its hooks: section"))
    if isinstance(recipe.data.eval_path, dict):
        raise UserError(Problem("data.eval_path", sorted(recipe.data.eval_path), "names several eval sets; the bench compares one "
                                "eval loss per side", "bench with one eval set: data.eval_path=FILE"))
    examples = examples_to_train(recipe, request)

    if not is_local(recipe.model.name):
        from fasttune import hub

        hub.use_cache_if_unreachable()  # asked once here; both sides inherit the answer (HF_HUB_OFFLINE=1)
    out = Path(request.out or Path("bench-results") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_out(out)
    overrides = [*request.overrides, *BENCH_OVERRIDES, f"data.max_rows={examples}"]
    check_recipe(request, overrides)
    out.mkdir(parents=True, exist_ok=True)
    if request.random_init:
        console.print(f"[bold]bench[/] building {recipe.model.name}'s architecture with random weights")
        overrides.append(f"model.name={build_random_model(recipe, out / 'random-model', force_cpu=request.force_cpu)}")
    documents = {}
    for side in ("vanilla", "fasttune"):
        side_overrides = overrides if side == "vanilla" else [*overrides, *packed_batch(recipe, overrides, documents["vanilla"], request)]
        console.print(f"[bold]bench[/] {side}: {examples} examples, one pass {' '.join(side_overrides[len(overrides):])}")
        documents[side] = _run_side(side, request, side_overrides, out, console)
        doc = documents[side]
        console.print(f"[bold]bench[/] {side}: {len(doc['step_times_s'])} steps in {doc['train_s']:.1f} s on {doc['backend']}")
    command = "python -m fasttune bench " + " ".join([request.recipe, f"--examples {request.examples}",
                                                      *([f"--steps {request.steps}"] if request.steps else []),
                                                      f"--warmup {request.warmup}", *(["--random-init"] if request.random_init else []),
                                                      *request.overrides])
    results = write_results(out, documents["fasttune"], documents["vanilla"], command)
    results["out"] = str(out)
    return results


def outputs() -> tuple[str, ...]:
    """What a bench writes into its --out folder (random-model/ aside: its builder reuses or refuses it)."""
    return (RESULTS_FILE, REPORT_FILE, PLOT_FILE, "work", *(f"{side}{ext}" for side in ("vanilla", "fasttune")
                                                             for ext in (".json", ".log", ".spec.json")))


def check_out(out: Path) -> None:
    """Refuse an --out that cannot be written, or that holds a bench's outputs already (an earlier
    bench's measurements, or files of the user's with those names): a bench never replaces them."""
    problem = folder_problem(out, "--out", "give --out a folder you can write")
    if problem is not None:
        raise UserError(problem, "cannot bench into that folder")
    found = [name for name in outputs() if (out / name).exists()]
    if found:
        raise UserError(Problem("--out", str(out), f"already holds {', '.join(found)}, which this bench did not write",
                                "give another --out (the default is a new bench-results/<recipe>-<time>), or move or "
                                "remove them yourself"), "cannot bench into that folder")


def check_recipe(request: BenchRequest, overrides: list[str]) -> None:
    """What both sides will check, checked once here, before any side starts or anything is written:
    the recipe with the bench's settings binds (SFTConfig, LoraConfig, BitsAndBytesConfig), its data
    reads, and a --random-init model has an architecture. A mistake is then one message, not a child's failure."""
    recipe = prepare.resolve(request.recipe, overrides)
    prepare.prepare_elsewhere(recipe, machine.plan(recipe, machine.detect(), force_cpu=request.force_cpu))
    if request.random_init:
        architecture(recipe)
    read_data(recipe)


def packed_batch(recipe, overrides: list[str], vanilla: dict, request: BenchRequest) -> list[str]:
    """Where fasttune packs, rows per batch so that a packed batch holds about the real (non-padding)
    tokens of vanilla's average batch: the same examples in fuller rows, in about as many optimizer
    steps (so one pass ends at a comparable loss), at less memory than vanilla's padded batches."""
    resolved = prepare.resolve(request.recipe, overrides)
    packs = packing_decision(resolved, machine.plan(resolved, machine.detect(), force_cpu=request.force_cpu)).enabled
    if not packs:
        return []
    max_length = int(resolved.train.get("max_length", 1024))
    accumulation = int(resolved.train.get("gradient_accumulation_steps", 1))
    real_per_batch = sum(vanilla["real_tokens"]) / len(vanilla["real_tokens"]) / accumulation
    return [f"train.per_device_train_batch_size={max(1, round(real_per_batch / max_length))}"]


def _run_side(side: str, request: BenchRequest, overrides: list[str], out: Path, console) -> dict:
    spec = {"side": side, "recipe": request.recipe, "overrides": overrides, "warmup": request.warmup,
            "work_dir": str(out / "work"), "force_cpu": request.force_cpu}
    spec_path, result_path = out / f"{side}.spec.json", out / f"{side}.json"
    spec_path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    log_path = out / f"{side}.log"
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            process = subprocess.run([sys.executable, "-m", "fasttune.side_by_side.side", str(spec_path), str(result_path)],
                                     stdout=log, stderr=subprocess.STDOUT, env=env, timeout=request.timeout_s)
        except subprocess.TimeoutExpired:
            raise UserError(Problem(f"bench side {side}", f"{request.timeout_s} s", f"did not finish within --timeout (log: {log_path})",
                                    "give it more time (--timeout), or fewer examples or steps (--examples, --steps)"),
                            "the bench could not finish") from None
    if process.returncode != 0 or not result_path.is_file():
        last = last_error(log_path.read_text(encoding="utf-8", errors="replace"))
        raise UserError(Problem(f"bench side {side}", process.returncode, f"failed: {last} (the whole log: {log_path})",
                                "fix what the message names, then run the bench again with another --out"),
                        f"the bench could not finish: its {side} side failed")
    return json.loads(result_path.read_text(encoding="utf-8"))


_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt|Unavailable)\b(?::|$)")


def last_error(log: str) -> str:
    """The child's own message, not its traceback: a ``fasttune:`` refusal as the CLI gives it (its
    problems on one line), else the last ``SomeError: ...`` line, else the last line of the log."""
    lines = [line.rstrip() for line in log.splitlines() if line.strip()]
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].startswith("fasttune: "):
            return " ".join(part.strip() for part in lines[index:])[len("fasttune: "):][:1000]
    for line in reversed(lines):
        if _ERROR_LINE.match(line.strip()):
            return line.strip()[:500]
    return lines[-1].strip()[:500] if lines else "it wrote nothing to its log"
