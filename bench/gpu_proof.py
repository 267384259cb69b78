"""The GPU proof in one call, within a time budget: the engine check, then the bench, then a summary.

For a CUDA machine that has torch and transformers and no package index: the kit (bench/gpu_kit.sh)
brings the rest. One command, about 9 minutes on one H200::

    python3 bench/gpu_proof.py --kit bench/kit --out OUT

1. installs the kit into a temporary folder, first on the path of every process that follows;
2. ``bench/gpu_check.py``: the Mistral-7B-shaped random model, built once on the GPU, 20 QLoRA
   steps at 2048 tokens per backend (backend used, Unsloth's fused-layer counts, tokens/s, peak
   memory);
3. ``python -m fasttune bench mistral_qlora`` on the same model: fasttune against vanilla PEFT
   on varied-length chat data, its steps sized from the check's measured speed to fit what is
   left of the budget;
4. ``proof.json`` and ``proof.md`` in OUT: versions, each phase's time, the tables, and the
   findings (a fast path not taken, a bench target missed, a phase that failed).

OUT also receives gpu_check.json/.md, bench/ (results.json, report.md, bench.png, the sides' logs)
and the log of every phase. ``--smoke`` runs every line of it on a tiny model on the CPU in about
two minutes (the tests do, with the kit installed beside only what such a machine has).
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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(1, str(REPO))
from fasttune.atomic_io import atomic_write_text  # noqa: E402  (standard library only, like this script)
RECIPE = "mistral_qlora"
VERSIONS = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "unsloth", "unsloth_zoo",
            "triton", "gguf")
RESERVE_S = 15
"""Kept back from the budget for the summary."""


@dataclass(frozen=True)
class Mode:
    name: str
    check_args: tuple[str, ...]
    """What gpu_check.py is given besides the model folder and output."""
    bench_args: tuple[str, ...]
    max_length: int
    chat_rows: int
    warmup: int
    min_steps: int
    max_steps: int
    bench_min_s: int
    """Below this much time left, the bench is not started (its two model loads alone take that)."""


FULL = Mode("gpu", (), (), max_length=2048, chat_rows=600, warmup=2, min_steps=6, max_steps=40, bench_min_s=120)
SMOKE = Mode("smoke", ("--smoke",), ("--cpu",), max_length=64, chat_rows=60, warmup=1, min_steps=3, max_steps=4,
             bench_min_s=30)


class Clock:
    def __init__(self, budget_s: float):
        self.begun, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.begun

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def log(message: str) -> None:
    print(f"gpu_proof: {message}", flush=True)


def run_logged(command: list[str], log_path: Path, timeout_s: float, env: dict) -> tuple[int | None, float]:
    """Run ``command``, its output echoed and written to ``log_path``; ``(exit code or None if killed at the timeout, s)``."""
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log_file:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                                start_new_session=True)  # its own group: a timeout kills its children too

        def pump():
            for line in proc.stdout:
                log_file.write(line)
                print("  " + line.rstrip("\n"), flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        reader.join(timeout=10)
    return code, time.perf_counter() - started


def bench_plan(check: dict | None, seconds: float, mode: Mode, batch: int = 2) -> dict:
    """Steps for the bench from the check's slower backend's tokens/s, so both sides fit ``seconds``.

    Each side loads the model (as long as the check's load took, plus imports) and trains; rows are
    assumed three quarters of max_length on average (chat rows vary; the bench reports the truth).
    """
    speeds, loads = [], []
    for outcome in (check or {}).get("outcomes", []):
        result = outcome.get("result") or {}
        if result.get("tokens_per_s"):
            speeds.append(result["tokens_per_s"])
            loads.append(result.get("load_s") or 0.0)
    per_side = seconds / 2
    timeout = max(10, int(per_side))
    if not speeds:
        return {"steps": mode.min_steps, "examples": mode.min_steps * batch, "timeout_s": timeout,
                "why": "the check measured no speed: the fewest steps"}
    load = max(loads) + 30  # the side's own imports and data preparation
    tokens_per_step = batch * mode.max_length * 0.75
    fit = math.floor(max(0.0, per_side - load) * min(speeds) / tokens_per_step)
    steps = max(mode.min_steps, min(mode.max_steps, fit))
    return {"steps": steps, "examples": steps * batch, "timeout_s": timeout,
            "why": f"{min(speeds):,.0f} tokens/s (slower backend), {load:.0f} s to load, {per_side:.0f} s per side: "
                   f"{fit} steps fit, {steps} taken (between {mode.min_steps} and {mode.max_steps})"}


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in VERSIONS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_proof(args) -> int:
    mode = SMOKE if args.smoke else FULL
    clock = Clock(args.budget)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fasttune-gpu-proof-", dir=args.workdir))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "UNSLOTH_DISABLE_STATISTICS": "1", "HF_DATASETS_CACHE": str(work / "datasets-cache")}
    proof = {"mode": mode.name, "budget_s": args.budget, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
             "python": sys.version.split()[0], "phases": []}

    def phase(name: str, seconds: float, status: str, detail: str = "") -> None:
        proof["phases"].append({"name": name, "seconds": round(seconds, 1), "status": status, "detail": detail})
        log(f"phase {name}: {status} in {seconds:.1f} s{f' ({detail})' if detail else ''}; {clock.left():.0f} s of the budget left")

    try:
        site = work / "site"
        if args.kit:
            sys.path.insert(0, str(BENCH))
            from gpu_kit import install

            started = time.perf_counter()
            names = install(Path(args.kit).resolve(), site)
            phase("kit", time.perf_counter() - started, "ran", f"{len(names)} wheels")
            sys.path.insert(0, str(site))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site) if args.kit else "", str(REPO), env.get("PYTHONPATH", "")) if p)
        proof["versions"] = versions()

        chat = work / "chat.jsonl"
        code, seconds = run_logged([sys.executable, str(BENCH / "chat_data.py"), str(chat), "--rows", str(mode.chat_rows)],
                                   out / "chat_data.log", 60, env)
        phase("chat data", seconds, "ran" if code == 0 else f"failed (exit {code})")

        model = work / "model"
        check_budget = clock.left() - RESERVE_S - mode.bench_min_s
        command = [sys.executable, str(BENCH / "gpu_check.py"), *mode.check_args, "--model-dir", str(model), "--out", str(out),
                   "--workdir", str(work), "--timeout", str(max(30, int(check_budget / 2.5)))]
        code, seconds = run_logged(command, out / "gpu_check.log", check_budget, env)
        check = read_json(out / "gpu_check.json")
        proof["gpu_check"] = check
        phase("gpu_check", seconds, "killed at its time limit" if code is None else "ran" if code == 0 else f"failed (exit {code})",
              f"verdict {'PASS' if check and check['passed'] else 'FAIL'}" if check else "no gpu_check.json")

        left = clock.left() - RESERVE_S
        if left < mode.bench_min_s or not (model / "config.json").is_file():
            why = "no model was built" if not (model / "config.json").is_file() else f"only {left:.0f} s left"
            phase("bench", 0.0, "not started", why)
        else:
            plan = bench_plan(check, left, mode)
            proof["bench_plan"] = plan
            log(f"bench sized: {plan['why']}")
            command = [sys.executable, "-m", "fasttune", "bench", RECIPE, *mode.bench_args, "--examples", str(plan["examples"]),
                       "--steps", str(plan["steps"]), "--warmup", str(mode.warmup), "--timeout", str(plan["timeout_s"]),
                       "--out", str(out / "bench"), f"model.name={model}", f"data.path={chat}", "data.eval_fraction=0.05",
                       "data.eval_rows=8", f"train.max_length={mode.max_length}", "train.gradient_accumulation_steps=1"]
            code, seconds = run_logged(command, out / "bench.log", left, env)
            proof["bench"] = read_json(out / "bench" / "results.json")
            phase("bench", seconds, "killed at its time limit" if code is None else "ran" if code == 0 else f"failed (exit {code})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    proof["total_s"] = round(clock.elapsed(), 1)
    proof["findings"] = findings(proof)
    atomic_write_text(out / "proof.json", json.dumps(proof, indent=1, default=str) + "\n")
    atomic_write_text(out / "proof.md", proof_markdown(proof, out))
    log(f"done in {proof['total_s']:.0f} s of {args.budget} s; proof.json and proof.md in {out}")
    for line in proof["findings"]:
        log(f"finding: {line}")
    return 0 if all(p["status"] == "ran" for p in proof["phases"]) else 1


def findings(proof: dict) -> list[str]:
    """What the results contradict: failed phases, FAIL verdicts, missed bench targets."""
    found = [f"phase {p['name']}: {p['status']}" + (f" ({p['detail']})" if p["detail"] else "")
             for p in proof["phases"] if p["status"] != "ran"]
    check = proof.get("gpu_check") or {}
    found += [f"gpu_check: {line}" for line in check.get("verdict", []) if line.startswith("FAIL")]
    bench = proof.get("bench") or {}
    found += [f"bench: {t['target']} MISSED (measured {t['measured']:.2f}x)" if t["measured"] is not None
              else f"bench: {t['target']} not measured" for t in bench.get("targets", []) if not t["met"]]
    return found


def proof_markdown(proof: dict, out: Path) -> str:
    check = proof.get("gpu_check") or {}
    lines = [f"# fasttune GPU proof ({proof['mode']}), {proof['started']}", "",
             f"Machine: {check.get('machine', 'unknown')}; Python {proof['python']}.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in (proof.get("versions") or {}).items() if v) + ".", "",
             f"Budget {proof['budget_s']} s, used {proof['total_s']} s: "
             + ", ".join(f"{p['name']} {p['seconds']} s ({p['status']})" for p in proof["phases"]) + ".", ""]
    for title, path in (("Engine check", out / "gpu_check.md"), ("Bench: fasttune against vanilla PEFT", out / "bench" / "report.md")):
        lines += [f"## {title}", ""]
        text = path.read_text(encoding="utf-8") if path.is_file() else "(not written: see the phase above and its log)\n"
        lines += [("#" + line if line.startswith("## ") else line) for line in text.splitlines() if not line.startswith("# ")] + [""]
    lines += ["## Memory plan", "", "fasttune has no memory plan yet: nothing to compare with the measured peaks above.", "",
              "## Findings", ""]
    lines += [f"- {line}" for line in proof["findings"]] or ["- none: every phase ran, every check passed and every target was met"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, metavar="DIR", help="where proof.json, proof.md and every phase's output go")
    parser.add_argument("--kit", metavar="KIT", help="install this kit (bench/gpu_kit.sh) first")
    parser.add_argument("--budget", type=int, default=540, metavar="S", help="seconds for the whole proof (default 540)")
    parser.add_argument("--smoke", action="store_true", help="every line on a tiny model, on the CPU")
    parser.add_argument("--workdir", metavar="DIR", help="parent of the temporary folder (the 7B model needs ~15 GB)")
    args = parser.parse_args(argv)
    return run_proof(args)


if __name__ == "__main__":
    sys.exit(main())
