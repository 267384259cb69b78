"""The memory plan as people read it (a table, with what makes it fit) and as ``--json`` prints it."""
from __future__ import annotations

from fasttune.memory.cards import Card
from fasttune.memory.fit import Change
from fasttune.memory.plan import GIB, PARTS, MemoryPlan

WHAT = {
    "weights": "frozen parameters as stored",
    "quant_constants": "bitsandbytes' 4-bit block scales",
    "trainable": "what the optimizer updates",
    "gradients": "one per trainable parameter",
    "optimizer": "the optimizer's states",
    "activations": "what backward needs, worst micro-batch",
    "logits": "lm_head output and the loss, tokens x vocabulary",
    "overhead": "CUDA context + allocator slack",
}


def _gib(value: int | float) -> str:
    return f"{value / GIB:.2f}"


def describe_setup(plan: MemoryPlan) -> str:
    s = plan.setup
    rows = f"1 packed row of {s.batch} x {s.sequence}" if s.packing else f"{s.batch} rows x {s.sequence} tokens"
    dtype = "float32" if s.width == 4 else "16-bit"
    checkpointing = ("Unsloth's offloaded checkpointing" if s.offload_checkpoints else
                     "gradient checkpointing" if s.gradient_checkpointing else "no checkpointing")
    return f"{s.method}, {dtype}, {rows}, {checkpointing}, {s.optimizer}, {s.attention} attention, {s.backend} backend"


def verdict(plan: MemoryPlan, card: Card | None) -> str:
    if card is None:
        return f"needs about {_gib(plan.total)} GiB of RAM (CPU)"
    room = card.gib * GIB - plan.total
    if room >= 0:
        return f"fits {card.describe()}: {_gib(plan.total)} GiB predicted, {_gib(room)} GiB to spare"
    return f"does not fit {card.describe()}: {_gib(plan.total)} GiB predicted, {_gib(-room)} GiB too much"


def print_plan(console, plan: MemoryPlan, card: Card | None, where: str, changes: list[Change]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"memory of one training step ({escape(describe_setup(plan))})", title_justify="left")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    table.add_column("what")
    for name in PARTS:
        if plan.parts[name] or name in ("weights", "activations", "logits"):
            table.add_row(name, _gib(plan.parts[name]), WHAT[name])
    table.add_row("[bold]total[/]", f"[bold]{_gib(plan.total)}[/]", "")
    console.print(table)
    console.print(f"sequence length from {escape(where)}")
    for note in plan.notes:
        console.print(f"[yellow]note[/] {escape(note)}")
    fits = card is None or plan.total <= card.gib * GIB
    console.print(("[green]" if fits else "[red]") + escape(verdict(plan, card)) + "[/]")
    if changes:
        console.print("what makes it fit, cheapest first (each on top of those above):" if changes[-1].plan.total <= card.gib * GIB
                      else "even all of these do not make it fit (a larger card, or method qlora / a smaller model):")
        for change in changes:
            console.print(f"  {escape(' '.join(change.overrides))}  -> {_gib(change.plan.total)} GiB  ({escape(change.why)})")
        if changes[-1].plan.total <= card.gib * GIB:
            console.print("  or let the run apply them: train.auto_fit=true")


def as_json(plan: MemoryPlan, card: Card | None, changes: list[Change]) -> dict:
    return {
        "total_gib": round(sum(round(v / GIB, 4) for v in plan.parts.values()), 4),
        "parts": {name: round(plan.parts[name] / GIB, 4) for name in PARTS},
        "gpu_gib": card.gib if card is not None else None,
        "fits": None if card is None else plan.total <= card.gib * GIB,
        "suggestions": [{"overrides": list(c.overrides), "why": c.why, "total_gib": round(c.plan.total / GIB, 4)} for c in changes],
    }
