"""``python -m fasttune bench``: the same work through fasttune and through vanilla PEFT.

Both sides train one pass over the same first N examples of the recipe's data (``--examples``;
``--steps`` caps vanilla's optimizer steps, and both sides then train on exactly the examples
those steps consume), with the same model, max_length, LoRA, learning rate, schedule and seed.
Vanilla runs first, then fasttune, each in its own process (fasttune/bench/side.py); the figures
and the report come from fasttune/bench/results.py.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fasttune.errors import Problem, UserError

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
    from fasttune import config
    from fasttune.bench.results import write_results

    recipe = config.resolve(request.recipe, request.overrides)
    if recipe.method not in ("lora", "qlora"):
        raise UserError(Problem("method", recipe.method, "the bench compares LoRA/QLoRA against vanilla PEFT", "bench a lora or qlora recipe"))
    examples = examples_to_train(recipe, request)
    out = Path(request.out or Path("bench-results") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    overrides = [*request.overrides, *BENCH_OVERRIDES, f"data.max_rows={examples}"]
    if request.random_init:
        from fasttune.bench.random_model import build_random_model

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


def packed_batch(recipe, overrides: list[str], vanilla: dict, request: BenchRequest) -> list[str]:
    """Where fasttune packs, rows per batch so that a packed batch holds about the real (non-padding)
    tokens of vanilla's average batch: the same examples in fuller rows, in about as many optimizer
    steps (so one pass ends at a comparable loss), at less memory than vanilla's padded batches."""
    from fasttune import config, machine
    from fasttune.data.tokenize import packing_decision

    resolved = config.resolve(request.recipe, overrides)
    packs = resolved.train["packing"] if "packing" in resolved.train else \
        packing_decision(resolved, machine.plan(resolved, machine.facts(), force_cpu=request.force_cpu))[0]
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
            process = subprocess.run([sys.executable, "-m", "fasttune.bench.side", str(spec_path), str(result_path)],
                                     stdout=log, stderr=subprocess.STDOUT, env=env, timeout=request.timeout_s)
        except subprocess.TimeoutExpired:
            raise UserError(Problem(f"bench side {side}", f"{request.timeout_s} s", f"did not finish within --timeout (log: {log_path})",
                                    "give it more time (--timeout), or fewer examples or steps (--examples, --steps)"),
                            "the bench could not finish") from None
    if process.returncode != 0 or not result_path.is_file():
        tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
        raise UserError(Problem(f"bench side {side}", process.returncode, f"failed; the last lines of {log_path}:\n{tail}",
                                "fix what the log names (the other side's results are kept)"), "the bench could not finish")
    return json.loads(result_path.read_text(encoding="utf-8"))
