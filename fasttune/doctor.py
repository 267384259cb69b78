"""``python -m fasttune doctor``: what this machine has, what a run would use, what to fix."""
from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from fasttune import config, machine
from fasttune.disk import free_bytes
from fasttune.errors import UserError
from fasttune.output_paths import folder_problem

# The tested version set ships as constraints.txt: in the wheel beside the package, in a
# checkout at the top of the repository (see pyproject.toml).
_PACKAGED = Path(__file__).parent / "constraints.txt"
_CHECKOUT = Path(__file__).parent.parent / "constraints.txt"
LOCKED = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "gguf", "rich",
          "sentencepiece", "protobuf")
MIN_FREE_GB = 20  # a 7B merge (15 GB in 16-bit) plus its GGUF needs about this much


def tested_versions() -> dict[str, str]:
    path = _PACKAGED if _PACKAGED.is_file() else _CHECKOUT
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s#]+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _free_gb(folder: Path) -> float:
    return free_bytes(folder) / 2**30


def doctor(output_dir: Path, console) -> int:
    from rich.markup import escape
    from rich.table import Table

    problem = folder_problem(output_dir, "--output-dir", "give the folder runs are written to (default: runs), one you can write")
    if problem is not None:  # the disk check below would answer for a place no run can be written
        raise UserError(problem)

    problems: list[tuple[str, str]] = []
    pins = tested_versions()
    table = Table(title="versions", title_justify="left")
    for column in ("package", "found", "tested"):
        table.add_column(column)
    for name in LOCKED:
        found, tested = _installed(name), pins.get(name, "?")
        # torch's CUDA/CPU builds carry a local tag (2.13.0+cpu): compare the public version.
        ok = found is not None and found.split("+")[0] == tested
        table.add_row(name, f"[{'green' if ok else 'red'}]{found or 'missing'}[/]", tested)
        if not ok:
            problems.append((f"{name} {found or 'missing'} (tested: {tested})",
                             "reinstall the tested set: pip install -c constraints.txt -e .  (or make demo)"))
    console.print(table)

    facts = machine.detect()
    if facts.cuda:
        console.print(f"[bold]GPU[/] {facts.device_name}, {facts.gpu_memory_gb} GB, bf16 {'yes' if facts.bf16 else 'no'}")
    else:
        console.print(f"[bold]GPU[/] no GPU (torch {facts.torch_version}); GPU recipes run with --dry-run or --cpu only")
    try:
        from bitsandbytes.cextension import BNB_BACKEND

        console.print(f"[bold]bitsandbytes[/] backend {BNB_BACKEND}")
    except Exception as err:  # a broken native library raises various errors on import
        console.print("[bold]bitsandbytes[/] [red]cannot load[/] " + escape(f"({type(err).__name__}: {err})"))
        problems.append(("bitsandbytes cannot load", "reinstall bitsandbytes==" + pins.get("bitsandbytes", "")))

    recipe = config.resolve("mistral_qlora")
    plan = machine.plan(recipe, facts)
    unsloth = "installed" if facts.unsloth_installed else "not installed"
    console.print(f"[bold]Unsloth[/] {unsloth}; would be used: "
                  + escape("yes" if plan.backend == "unsloth" else f"no ({plan.backend_reason})"))
    if facts.cuda and not facts.unsloth_installed:
        problems.append(("Unsloth is not installed on a CUDA machine", "pip install -c constraints.txt -e '.[unsloth]'"))

    free = _free_gb(output_dir)
    console.print(f"[bold]disk[/] {free:.1f} GB free in {output_dir.resolve()}")
    if free < MIN_FREE_GB:
        problems.append((f"only {free:.1f} GB free in {output_dir}", f"free up space: a 7B run with exports needs about {MIN_FREE_GB} GB"))

    console.print(f"[bold]a run here would use[/] {escape(plan.summary())}")
    for what, fix in problems:
        console.print(f"[red]problem[/] {escape(what)}\n    fix: {escape(fix)}")
    if not problems:
        console.print("[green]no problems found[/]")
    return 0
