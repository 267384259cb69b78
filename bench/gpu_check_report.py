"""bench/gpu_check.py's verdict: the side-by-side table and the pass/fail judgement of its children.

Split from gpu_check.py (which builds the model, runs one child per backend and collects their
``GPU_CHECK_RESULT`` lines) so each file holds one responsibility; imported by it, not run alone.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass
class ChildOutcome:
    backend: str
    exit_code: int | None
    """None when the child ran past the timeout and was killed."""
    result: dict | None
    stderr_tail: list[str]
    seconds: float


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def status_of(outcome: ChildOutcome) -> str:
    if outcome.exit_code is None:
        return "timed out"
    if outcome.result and "skipped" in outcome.result:
        return "skipped"
    if outcome.exit_code != 0 or outcome.result is None:
        return f"failed (exit {outcome.exit_code})"
    return "ran"


def table_rows(outcomes: list[ChildOutcome]) -> list[tuple[str, list[str]]]:
    def field(key, digits=1):
        return [fmt((o.result or {}).get(key), digits) for o in outcomes]

    def fast(o: ChildOutcome) -> str:
        fp = (o.result or {}).get("fast_path")
        if not fp:
            return "-"
        if fp.get("layers") is None:
            return "not reported"
        return f"{fp['qkv']}/{fp['o']}/{fp['mlp']} of {fp['layers']}"

    return [
        ("status", [status_of(o) for o in outcomes]),
        ("backend used", field("backend")),
        ("reason", [(o.result or {}).get("reason") or (o.result or {}).get("skipped") or "-" for o in outcomes]),
        ("fused QKV/O/MLP", [fast(o) for o in outcomes]),
        ("dtype / attention", [f"{fmt((o.result or {}).get('dtype'))} / {fmt((o.result or {}).get('attention'))}"
                               for o in outcomes]),
        ("tokens/s", field("tokens_per_s")),
        ("peak alloc GiB (train)", field("peak_alloc_gib", 2)),
        ("peak reserved GiB (train)", field("peak_reserved_gib", 2)),
        ("peak alloc GiB (load)", field("peak_load_alloc_gib", 2)),
        ("memory plan GiB (less overhead)", field("plan_allocated_gib", 2)),
        ("first -> final loss", [f"{fmt((o.result or {}).get('first_loss'), 4)} -> {fmt((o.result or {}).get('final_loss'), 4)}"
                                 for o in outcomes]),
        ("loss tokens per row", field("loss_tokens_per_row")),
        ("steps (timed) x seq len", [f"{fmt((o.result or {}).get('steps'))} ({fmt((o.result or {}).get('timed_steps'))}) "
                                     f"x {fmt((o.result or {}).get('seq_len'))}" for o in outcomes]),
        ("load s / train s", [f"{fmt((o.result or {}).get('load_s'))} / {fmt((o.result or {}).get('train_s'))}"
                              for o in outcomes]),
        ("child wall s", [f"{o.seconds:.1f}" for o in outcomes]),
    ]


def print_table(outcomes: list[ChildOutcome], profile, on_cuda: bool) -> None:
    """``profile``: gpu_check's Profile (its ``name`` titles the table)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 140)
    where = "GPU" if on_cuda else "CPU: tokens/s and memory mean nothing here"
    table = Table(title=f"fasttune GPU check, {profile.name} ({where})")
    table.add_column("")
    for outcome in outcomes:
        table.add_column(outcome.backend, overflow="fold")
    for label, cells in table_rows(outcomes):
        table.add_row(label, *cells)
    console.print(table)
    for outcome in outcomes:
        if status_of(outcome) not in ("ran", "skipped") and outcome.stderr_tail:
            console.print(f"[bold]{outcome.backend}[/]: last {len(outcome.stderr_tail)} lines of stderr:", highlight=False)
            console.print("\n".join(outcome.stderr_tail), markup=False, highlight=False)


def markdown_table(outcomes: list[ChildOutcome], profile, on_cuda: bool, machine: str) -> str:
    """The same rows as ``print_table``, as a Markdown table (for gpu_check.md and the README)."""
    where = machine if on_cuda else f"{machine}; CPU: tokens/s and memory mean nothing here"
    lines = [f"GPU check, {profile.name} ({where})", "", "| | " + " | ".join(o.backend for o in outcomes) + " |",
             "|---|" + "---:|" * len(outcomes)]
    for label, cells in table_rows(outcomes):
        lines.append(f"| {label} | " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def judge(outcomes: list[ChildOutcome], on_cuda: bool) -> tuple[bool, list[str]]:
    """``(passed, verdict lines)``. On CUDA an Unsloth that cannot be imported fails the check."""
    passed, lines = True, []
    for outcome in outcomes:
        status, result = status_of(outcome), outcome.result or {}
        if status == "skipped":
            ok = not (on_cuda and outcome.backend == "unsloth")
            lines.append(f"{'SKIP' if ok else 'FAIL'} {outcome.backend}: {result['skipped']}")
            passed &= ok
            continue
        if status != "ran":
            lines.append(f"FAIL {outcome.backend}: {status}")
            passed = False
            continue
        problems = []
        if result["backend"] != outcome.backend:
            problems.append(f"asked for {outcome.backend}, got {result['backend']} ({result['reason']})")
        if not result["loss_finite"]:
            problems.append("loss is not finite")
        if outcome.backend == "unsloth" and on_cuda:
            problems.extend(fast_path_problems(result.get("fast_path")))
        detail = "; ".join(problems) if problems else describe_pass(outcome.backend, result, on_cuda)
        lines.append(f"{'FAIL' if problems else 'PASS'} {outcome.backend}: {detail}")
        passed &= not problems
    lines.extend(speedup(outcomes, on_cuda))
    return passed, lines


def fast_path_problems(fast_path: dict | None) -> list[str]:
    if not fast_path or fast_path.get("layers") is None:
        return ["Unsloth reported no fused-layer counts"]
    zero = [name for name in ("qkv", "o", "mlp") if not fast_path.get(name)]
    return [f"no fused {', '.join(zero).upper()} layers ({fast_path.get('describe')})"] if zero else []


def describe_pass(backend: str, result: dict, on_cuda: bool) -> str:
    loss = f"loss {result['first_loss']:.4f} -> {result['final_loss']:.4f}, finite"
    if backend != "unsloth":
        return loss
    fast_path = result.get("fast_path") or {}
    if on_cuda:
        return f"{fast_path.get('describe')}; {loss}"
    return f"{loss} (Unsloth's CPU fallback: no fused kernels to count)"


def speedup(outcomes: list[ChildOutcome], on_cuda: bool) -> list[str]:
    speeds = {o.backend: (o.result or {}).get("tokens_per_s") for o in outcomes if status_of(o) == "ran"}
    if not (speeds.get("unsloth") and speeds.get("hf")):
        return []
    note = "" if on_cuda else " (CPU: not a measure of anything)"
    return [f"unsloth/hf tokens/s: {speeds['unsloth'] / speeds['hf']:.2f}x{note}"]


