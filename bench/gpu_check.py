"""GPU proof for the engine: QLoRA on a Mistral-7B-shaped model, Unsloth backend against hf.

It builds a model with the mistral_qlora recipe's architecture (Mistral 7B v0.3) and random weights
(nothing is downloaded; fasttune.side_by_side.random_model, the bench's own builder, on the GPU in bfloat16,
written once and reused), then, in one child process per backend
(``import unsloth`` patches transformers, TRL and PEFT for the whole process), loads it in 4-bit
through ``fasttune.FastLanguageModel``, attaches LoRA r=16 to all seven projections and trains 20
steps of 2048 random tokens with TRL's SFTTrainer. Each child prints the backend it actually used,
why, Unsloth's fused-layer counts, and one ``GPU_CHECK_RESULT {json}`` line; the parent prints them
side by side with a verdict. Exit status 0 when every backend that could run did and passed.

On a CUDA machine (about 15 GB of free disk for the model; a few minutes on one H100)::

    python bench/gpu_check.py                  # both backends, 20 steps of 2048 tokens
    python bench/gpu_check.py --wheels KIT     # first install the kit bench/gpu_kit.sh built (bench/README.md)
    python bench/gpu_check.py --model-dir DIR  # keep the random model in DIR and reuse it next time
    python bench/gpu_check.py --out DIR        # also write gpu_check.json and gpu_check.md into DIR

On a GPU the check fails when Unsloth cannot be imported: proving its fast path is its purpose.

Without a GPU, the same code paths on a tiny model in seconds (tokens/s and memory mean nothing
there; the unsloth backend runs only if ``import unsloth`` works, and is reported skipped if not)::

    python bench/gpu_check.py --smoke
    python bench/gpu_check.py --smoke --gpu    # the tiny model on a GPU: a quick look before the 7B run
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

from gpu_check_report import ChildOutcome, judge, markdown_table, print_table, status_of  # noqa: E402  (bench/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))  # fasttune itself, for the random model (the children get it on PYTHONPATH)
RESULT_TAG = "GPU_CHECK_RESULT"
BACKENDS = ("unsloth", "hf")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STDERR_TAIL = 30


@dataclass(frozen=True)
class Profile:
    """What one mode builds and trains."""

    name: str
    recipe: str
    """Whose architecture (fasttune.architectures.BASE_CONFIGS) the random model has."""
    shapes: dict
    """Architecture overrides; empty means the recipe's base model's own (7B)."""
    seq_len: int
    steps: int
    disk_gib: float
    """Free disk the saved model needs."""
    warmup: int
    """Steps left out of the timing (CUDA kernels compile and autotune there)."""


FULL = Profile("mistral-7b", "mistral_qlora", {}, seq_len=2048, steps=20, disk_gib=15.5, warmup=2)
SMOKE = Profile("tiny-mistral", "mistral_qlora", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                                  "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 512},
                seq_len=64, steps=3, disk_gib=0.1, warmup=2)


def log(message: str) -> None:
    print(f"gpu_check: {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# The kit: a machine that has torch and transformers but not the rest.


def use_kit(kit: Path, site: Path) -> None:
    """Install the kit (bench/gpu_kit.py) into ``site`` and put it first on this process's and the children's path."""
    from gpu_kit import install

    names = install(kit, site)
    log(f"installed {len(names)} wheels from {kit} into {site}")
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)


def missing_packages() -> list[str]:
    """The packages of bench/gpu_wheels.txt this Python lacks; those at another version are only logged."""
    from importlib.metadata import PackageNotFoundError, version

    from gpu_kit import pinned_wheels

    missing = []
    for name, pinned in pinned_wheels().items():
        try:
            found = version(name)
        except PackageNotFoundError:
            missing.append(name)
            continue
        if found != pinned:
            log(f"{name} is {found}, not the tested {pinned}")
    return missing


def ensure_model(profile: Profile, model_dir: Path, use_cuda: bool) -> None:
    """The random model in ``model_dir``: built (on the GPU in bfloat16 when ``use_cuda``), or reused."""
    from fasttune import config
    from fasttune.side_by_side.random_model import build_random_model

    build_random_model(config.resolve(profile.recipe), model_dir, force_cpu=not use_cuda, shapes=profile.shapes)
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    log(f"random {profile.name} ({profile.recipe}'s architecture{', tiny shapes' if profile.shapes else ''}): "
        f"{size / 2**30:.2f} GiB of safetensors in {model_dir}")


# ---------------------------------------------------------------------------------------------
# The child: one backend, through fasttune's API.


def random_rows(rows: int, seq_len: int, tokenizer, seed: int) -> list[list[int]]:
    """Random ids of the tokenizer's ordinary (non-special) tokens."""
    import random

    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    rng = random.Random(seed)
    return [[rng.choice(ordinary) for _ in range(seq_len)] for _ in range(rows)]


def step_timer(cuda: bool):
    """A TrainerCallback that stamps the end of every optimizer step (after the GPU has finished it)."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.losses: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                took = f"{self.stamps[-1] - self.stamps[-2]:.2f} s" if len(self.stamps) > 1 else "first step"
                print(f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} ({took})", flush=True)

    return StepTimer()


def fast_path_dict(fast_path) -> dict | None:
    if fast_path is None:
        return None
    fields = asdict(fast_path) if is_dataclass(fast_path) else dict(vars(fast_path))
    fields["fused"] = bool(getattr(fast_path, "fused", False))
    fields["describe"] = fast_path.describe()
    return fields


def loss_tokens(trainer) -> int:
    """How many tokens of the first training row count in the loss (labels other than -100)."""
    batch = trainer.data_collator([trainer.train_dataset[0]])
    return int((batch["labels"] != -100).sum())


def gib(n_bytes: int) -> float:
    return round(n_bytes / 2**30, 2)


def skip_without_unsloth(backend: str) -> bool:
    """Import Unsloth first (it patches transformers, TRL and PEFT); print a skip result if it will not import."""
    if backend != "unsloth":
        return False
    try:
        import unsloth  # noqa: F401
    except Exception as err:  # noqa: BLE001  (Unsloth's import raises anything: missing CUDA, driver, versions)
        reason = f"import unsloth failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
        print(f"{RESULT_TAG} {json.dumps({'backend': None, 'requested': backend, 'skipped': reason})}", flush=True)
        return True
    return False


def load_and_attach(args):
    """``(model, tokenizer, engine)`` through fasttune's Unsloth-style API, and what it printed about itself."""
    from fasttune import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(args.model, max_seq_length=args.seq_len, dtype=None,
                                                         load_in_4bit=True, backend=args.backend)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=TARGET_MODULES, use_gradient_checkpointing="unsloth",
                                             random_state=3407)
    engine = FastLanguageModel.engine(model)
    print(f"backend used: {engine.backend} ({engine.reason})", flush=True)
    print(f"dtype {engine.dtype}; attention {engine.attention}; device {engine.device}; kernels {engine.kernels}", flush=True)
    fast_path = engine.fast_path.describe() if engine.fast_path is not None else "none (hf backend)"
    print(f"fast path: {fast_path}", flush=True)
    return model, tokenizer, engine


def make_trainer(args, model, tokenizer, engine, cuda: bool, timer):
    """TRL's SFTTrainer on rows of exactly seq-len random token ids; every token counts in the loss."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    rows = random_rows(args.steps, args.seq_len, tokenizer, seed=3407)
    config = SFTConfig(
        output_dir=str(Path(args.workdir) / f"trainer-{args.backend}"), per_device_train_batch_size=1,
        gradient_accumulation_steps=1, max_steps=args.steps, max_length=args.seq_len, packing=False, learning_rate=2e-4,
        logging_steps=1, save_strategy="no", report_to="none", bf16=cuda and engine.dtype == "bfloat16",
        fp16=cuda and engine.dtype == "float16", use_cpu=not cuda, dataset_num_proc=None, seed=3407, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"input_ids": rows}),
                         processing_class=tokenizer, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # the timer prints one line a step instead
    return trainer


def timing(timer, warmup: int, seq_len: int, train_started: float) -> tuple[int, float | None]:
    """``(timed steps, tokens/s)`` over the steps after the warm-up ones (batch 1, no padding)."""
    warmup = min(warmup, len(timer.stamps) - 1)
    timed_steps = len(timer.stamps) - warmup
    since = timer.stamps[warmup - 1] if warmup > 0 else train_started
    seconds = timer.stamps[-1] - since
    return timed_steps, (round(timed_steps * seq_len / seconds, 1) if seconds > 0 else None)


def run_child(args) -> int:
    if skip_without_unsloth(args.backend):
        return 0
    import torch

    cuda = torch.cuda.is_available()
    started = time.perf_counter()
    model, tokenizer, engine = load_and_attach(args)
    load_s = time.perf_counter() - started
    peak_load = gib(torch.cuda.max_memory_allocated()) if cuda else None
    timer = step_timer(cuda)
    trainer = make_trainer(args, model, tokenizer, engine, cuda, timer)
    counted = loss_tokens(trainer)
    print(f"loss counts {counted} of {args.seq_len} tokens per row", flush=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started

    timed_steps, tokens_per_s = timing(timer, args.warmup, args.seq_len, started)
    finite = bool(timer.losses) and all(math.isfinite(loss) for loss in timer.losses)
    result = {
        "backend": engine.backend, "reason": engine.reason, "fast_path": fast_path_dict(engine.fast_path),
        "tokens_per_s": tokens_per_s,
        "peak_alloc_gib": gib(torch.cuda.max_memory_allocated()) if cuda else None,
        "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()) if cuda else None,
        "peak_load_alloc_gib": peak_load, "steps": len(timer.stamps), "timed_steps": timed_steps, "seq_len": args.seq_len,
        "final_loss": timer.losses[-1] if finite else None, "loss_finite": finite,
        "first_loss": timer.losses[0] if finite else None, "loss_tokens_per_row": counted,
        "load_s": round(load_s, 1), "train_s": round(train_s, 1), "dtype": engine.dtype, "attention": engine.attention,
        "kernels": engine.kernels, "device": engine.device, "cuda": cuda, "profile": (SMOKE if args.smoke else FULL).name,
    }
    result.update(memory_plan(args, model, trainer, engine, cuda))
    print(f"{RESULT_TAG} {json.dumps(result)}", flush=True)
    return 0


def memory_plan(args, model, trainer, engine, cuda: bool) -> dict:
    """fasttune's memory plan of this very run (fasttune.memory.plan), to set beside the measured
    peaks: ``plan_allocated_gib`` is its total less the overhead part (CUDA context and allocator
    slack, which ``max_memory_allocated`` does not see)."""
    from fasttune.families import get_family
    from fasttune.memory.plan import GIB, Setup, Shape, estimate

    shape = Shape.from_config(model.config.to_dict())
    setup = Setup(method="qlora", width=2 if engine.dtype in ("bfloat16", "float16") else 4, batch=1, sequence=args.seq_len,
                  packing=False, gradient_checkpointing=True, optimizer=str(getattr(trainer.args.optim, "value", trainer.args.optim)),
                  attention="sdpa" if engine.attention not in ("eager",) else "eager", backend=engine.backend, cuda=cuda,
                  lora_rank=16, offload_checkpoints=engine.backend == "unsloth" and cuda and args.seq_len >= 512)
    plan = estimate(shape, get_family(shape.model_type), setup)
    return {"plan_parts_gib": {name: round(size / GIB, 3) for name, size in plan.parts.items()},
            "plan_allocated_gib": round((plan.total - plan.parts["overhead"]) / GIB, 3), "plan_total_gib": round(plan.total / GIB, 3)}


# ---------------------------------------------------------------------------------------------
# The parent: build once, one child per backend, table and verdict.


def child_env(workdir: Path, use_cuda: bool) -> dict:
    env = dict(os.environ)
    if not use_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run stays on the CPU on a GPU machine too
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    env["HF_DATASETS_CACHE"] = str(workdir / "datasets-cache")
    return env


def run_backend(backend: str, model_dir: Path, profile: Profile, args, workdir: Path, use_cuda: bool) -> ChildOutcome:
    """One child process; its stdout is echoed live, its stderr kept for the report."""
    command = [sys.executable, str(SCRIPT), "--child", "--backend", backend, "--model", str(model_dir),
               "--steps", str(profile.steps), "--seq-len", str(profile.seq_len), "--warmup", str(profile.warmup),
               "--workdir", str(workdir)] + (["--smoke"] if args.smoke else [])
    stderr_path = workdir / f"child-{backend}.stderr"
    result: dict | None = None
    started = time.perf_counter()
    with open(stderr_path, "w", encoding="utf-8") as stderr:
        # Its own session, so a timeout kills the whole group (compile workers included) and the pipe closes.
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=workdir,
                                env=child_env(workdir, use_cuda), start_new_session=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: echo_lines(proc.stdout, backend, lines), daemon=True)
        reader.start()
        try:
            exit_code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            exit_code = None
        reader.join(timeout=10)
    for line in lines:
        if line.startswith(RESULT_TAG + " "):
            result = json.loads(line[len(RESULT_TAG) + 1:])
    tail = stderr_path.read_text(encoding="utf-8", errors="replace").splitlines()[-STDERR_TAIL:]
    return ChildOutcome(backend, exit_code, result, tail, time.perf_counter() - started)


def echo_lines(stream, backend: str, into: list[str]) -> None:
    for line in stream:
        line = line.rstrip("\n")
        into.append(line)
        print(f"  [{backend}] {line}", flush=True)


def cuda_summary() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__}, no CUDA device"
    props = torch.cuda.get_device_properties(0)
    return True, f"torch {torch.__version__}, {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"


def enough_disk(folder: Path, profile: Profile) -> bool:
    from fasttune.disk import existing_parent, free_bytes, gib

    folder = existing_parent(folder)
    free = free_bytes(folder)
    if free >= profile.disk_gib * 2**30:
        return True
    log(f"{folder} has {gib(free)} free; the {profile.name} model needs about {profile.disk_gib} GiB: "
        "pass --workdir or --model-dir on a larger disk")
    return False


def run_parent(args) -> int:
    begun = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights: nothing to look up (offline lookups retry for ~45 s)
    profile = SMOKE if args.smoke else FULL
    workdir = Path(tempfile.mkdtemp(prefix="fasttune-gpu-check-", dir=args.workdir))
    phases: dict[str, float] = {}
    try:
        if args.wheels:
            phase = time.perf_counter()
            use_kit(Path(args.wheels), workdir / "site")
            phases["kit"] = time.perf_counter() - phase
            log(f"phase kit: {phases['kit']:.1f} s")
        on_cuda, machine = cuda_summary()
        log(machine)
        if not on_cuda and (args.gpu or not args.smoke):
            log("no CUDA device: this check needs a GPU; run `python bench/gpu_check.py --smoke` for the CPU version")
            return 1
        use_cuda = on_cuda and (args.gpu or not args.smoke)
        missing = missing_packages()
        if missing:
            log(f"not installed: {', '.join(missing)} (bench/gpu_kit.sh builds a kit of them; --wheels KIT installs it)")
            if use_cuda:  # fail before the 7B model is built, not minutes later in the children
                return 1
        model_dir = Path(args.model_dir).resolve() if args.model_dir else workdir / "model"
        if not enough_disk(model_dir, profile):
            return 1
        phase = time.perf_counter()
        ensure_model(profile, model_dir, use_cuda)
        phases["build model"] = time.perf_counter() - phase
        log(f"phase build model: {phases['build model']:.1f} s ({model_dir})")
        outcomes = []
        for backend in args.backends:
            log(f"phase {backend}: child starting (timeout {args.timeout} s)")
            outcomes.append(run_backend(backend, model_dir, profile, args, workdir, use_cuda))
            phases[backend] = outcomes[-1].seconds
            log(f"phase {backend}: {status_of(outcomes[-1])} in {outcomes[-1].seconds:.1f} s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(outcomes, profile, use_cuda)
    passed, verdict = judge(outcomes, use_cuda)
    for line in verdict:
        print(f"verdict: {line}")
    total = time.perf_counter() - begun
    print(f"verdict: {'PASS' if passed else 'FAIL'} ({profile.name}, total {total:.1f} s)")
    if args.out:
        write_outputs(Path(args.out), outcomes, profile, machine, use_cuda, passed, verdict, phases, total)
    return 0 if passed else 1


def write_outputs(out: Path, outcomes, profile: Profile, machine: str, use_cuda: bool, passed: bool, verdict: list[str],
                  phases: dict[str, float], total: float) -> None:
    """``gpu_check.json`` (every child's result) and ``gpu_check.md`` (the table and verdict) in ``out``."""
    from fasttune.atomic_io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    document = {"profile": asdict(profile), "machine": machine, "cuda": use_cuda, "passed": passed, "verdict": verdict,
                "phases_s": {k: round(v, 1) for k, v in phases.items()}, "total_s": round(total, 1),
                "outcomes": [asdict(o) for o in outcomes]}
    atomic_write_text(out / "gpu_check.json", json.dumps(document, indent=1) + "\n")
    atomic_write_text(out / "gpu_check.md", markdown_table(outcomes, profile, use_cuda, machine) + "\n"
               + "".join(f"- {line}\n" for line in verdict))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 3 steps of 64 tokens")
    parser.add_argument("--gpu", action="store_true",
                        help="with --smoke: the tiny model on the GPU, a quick check of the CUDA paths before the 7B run")
    parser.add_argument("--wheels", metavar="KIT", help="first install the kit bench/gpu_kit.sh built (no index needed)")
    parser.add_argument("--out", metavar="DIR", help="also write gpu_check.json and gpu_check.md into DIR")
    parser.add_argument("--model-dir", metavar="DIR", help="where the random model is kept (reused when it matches)")
    parser.add_argument("--workdir", metavar="DIR", help="parent folder of the temporary working folder")
    parser.add_argument("--backends", type=lambda s: [b for b in s.split(",") if b], default=list(BACKENDS),
                        help="comma-separated, from unsloth,hf (default both)")
    parser.add_argument("--timeout", type=int, default=200, help="seconds each child may run (default 200)")
    child = parser.add_argument_group("child process (started by the parent)")
    child.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    child.add_argument("--backend", choices=BACKENDS)
    child.add_argument("--model")
    child.add_argument("--steps", type=int, default=FULL.steps)
    child.add_argument("--seq-len", type=int, default=FULL.seq_len)
    child.add_argument("--warmup", type=int, default=FULL.warmup)
    args = parser.parse_args(argv)
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    if args.child and not (args.backend and args.model and args.workdir):
        parser.error("--child needs --backend, --model and --workdir")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_child(args) if args.child else run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
