"""Export a finished run: the adapter, the merged 16-bit model, GGUF files and Ollama Modelfiles.

Called at the end of training (the recipe's ``export:`` section) and by
``python -m fasttune export RUN_DIR``. Every output is written under a temporary name and renamed
when complete; before anything is written, the free disk is checked against what the outputs
will take, and a shortfall is named.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from fasttune.atomic_io import atomic_replace_dir, atomic_write_text, temp_dir_beside
from fasttune.config import Recipe, eval_sets
from fasttune.disk import gib, require_free
from fasttune.errors import Problem, UserError
from fasttune.export.merge import local_model_dir, merge_adapter
from fasttune.export.model_card import model_card
from fasttune.export.modelfile import ollama_template, write_modelfile
from fasttune.export.refusals import ExportRefused, system_prompt_problem
from fasttune.gguf_types import BITS_PER_WEIGHT
from fasttune.model.source import resolve_model_source
from fasttune.model.tokenizer import training_template
from fasttune.output_paths import folder_problem
from fasttune.report import read_metrics, training_summary

HEADROOM = 1.05
MANIFEST = "fasttune-export.json"
"""Written into an --out folder other than the run's: the run exported there and the outputs written."""


@dataclass
class ExportRequest:
    adapter: bool = False
    """Copy the adapter to ``out`` (it is always in the run folder already)."""
    merged: bool = False
    gguf: list[str] = field(default_factory=list)
    out: Path | None = None
    """Where to write; default: the run folder itself."""
    save_dtype: str = "bfloat16"
    """The merged model's dtype: bfloat16, or float16 for GPUs without bf16."""


def request_from_recipe(recipe: Recipe) -> ExportRequest:
    """What the recipe's ``export:`` asks for. A full fine-tune has nothing to merge: its ``model/``
    is the 16-bit model the GGUF files are written from."""
    merge = recipe.method != "full" and (recipe.export.merged or bool(recipe.export.gguf))
    return ExportRequest(adapter=False, merged=merge, gguf=list(recipe.export.gguf))


def export_run(run_dir: Path, recipe: Recipe, request: ExportRequest, console, tokenizer=None, card_info: dict | None = None) -> list[Path]:
    """Write what ``request`` asks for from ``run_dir``'s adapter (merged into the base first for
    GGUF), or, for a full fine-tune, from its 16-bit ``model/`` (nothing to merge); the paths written."""
    run_dir = Path(run_dir)
    out = Path(request.out or run_dir)
    full = recipe.method == "full"
    trained = run_dir / ("model" if full else "adapter")
    if not (trained / ("config.json" if full else "adapter_config.json")).is_file():
        raise UserError(Problem("RUN_DIR", str(run_dir), "has no model/ (the full fine-tune did not finish)" if full else
                                "has no adapter/ (the run did not finish, or trained without LoRA)",
                                "finish it first: python -m fasttune recipe NAME --resume" if full else
                                "export a finished LoRA/QLoRA run: python -m fasttune recipe NAME --resume finishes an interrupted one"))
    if full and request.adapter:
        raise UserError(Problem("--adapter", True, "a full fine-tune has no adapter: every parameter was trained",
                                f"use the 16-bit model in {trained}, or export --gguf"))
    claim = claim_outputs(out, run_dir, recipe, request)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(trained)
    if full:
        source, model_dir, need_merge = str(trained), trained, False
        if request.merged:
            console.print(f"[bold]merge[/] nothing to merge: {escape(str(trained))}/ is the 16-bit model")
    else:
        source, model_dir = resolve_model_source(recipe.model.name), out / "merged"
        need_merge = bool(request.merged or request.gguf) and not (model_dir / "config.json").is_file()
    check_disk(out, source, merge=need_merge, gguf=request.gguf)
    if claim is not None:  # recorded before the outputs are written (each appears whole, by rename)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / MANIFEST, json.dumps(claim, indent=1) + "\n")
    written = []
    if request.adapter and out.resolve() != run_dir.resolve():
        tmp = temp_dir_beside(out / "adapter")
        shutil.copytree(trained, tmp, dirs_exist_ok=True)
        written.append(atomic_replace_dir(tmp, out / "adapter"))
    if need_merge:
        if card_info is None and (run_dir / "metrics.jsonl").is_file():
            card_info = training_summary(read_metrics(run_dir / "metrics.jsonl"), eval_sets(recipe.data.eval_path))
        console.print(f"[bold]merge[/] adapter -> {escape(str(model_dir))}/ (16-bit, shard by shard)")
        result = merge_adapter(source, trained, model_dir, tokenizer, save_dtype=request.save_dtype,
                               revision=recipe.model.revision, card=model_card(recipe, card_info))
        written.append(result.path)
    elif not full and (request.merged or request.gguf):
        console.print(f"[bold]merge[/] {escape(str(model_dir))}/ exists; exporting from it")
    for index, gguf_type in enumerate(request.gguf):
        written.extend(_write_gguf(model_dir, out / "gguf", recipe, gguf_type, tokenizer, console, primary=index == 0))
    return written


def planned_outputs(recipe: Recipe, request: ExportRequest) -> list[str]:
    """The paths, relative to the output folder, that ``request`` writes (or, for merged/, reuses)."""
    outputs = ["adapter"] if request.adapter else []
    if (request.merged or request.gguf) and recipe.method != "full":
        outputs.append("merged")
    for index, gguf_type in enumerate(request.gguf):
        outputs += [f"gguf/{recipe.name}-{gguf_type}.gguf", "gguf/Modelfile" if index == 0 else f"gguf/Modelfile.{gguf_type}"]
    return outputs


def claim_outputs(out: Path, run_dir: Path, recipe: Recipe, request: ExportRequest) -> dict | None:
    """Refuse, before anything is written, an --out that cannot be written or that already holds
    outputs this export did not write; else the MANIFEST record to write there (None in the run folder).

    In the run folder itself everything is the run's own. Elsewhere, an existing ``adapter/``,
    ``merged/`` or GGUF file is replaced (or, for ``merged/``, exported from) only when MANIFEST says
    an export of this same run wrote it: fasttune never deletes, nor builds on, what it did not write.
    """
    where = "--out" if request.out is not None else "RUN_DIR"
    problem = folder_problem(out, where, "give --out a folder you can write" if where == "--out" else
                             "give --out a folder you can write; the run folder itself cannot be")
    if problem is not None:
        raise UserError(problem, "cannot export there")
    if out.resolve() == run_dir.resolve():
        return None
    manifest = out / MANIFEST
    owned: list[str] = []
    foreign = []
    if manifest.exists():
        try:
            record = json.loads(manifest.read_text(encoding="utf-8"))
            if record.get("run") == str(run_dir.resolve()):
                owned = [str(p) for p in record.get("outputs", [])]
        except (OSError, ValueError, AttributeError):
            foreign.append(MANIFEST)  # not one this export wrote: never overwritten
    planned = planned_outputs(recipe, request)
    foreign += [rel for rel in planned if (out / rel).exists() and rel not in owned]
    if foreign:
        raise UserError(Problem("--out", str(out), f"already holds {', '.join(foreign)}, which an export of this run did not write",
                                "give another --out, or move or remove them yourself (fasttune never deletes what it did not write)"),
                        "cannot export there")
    return {"run": str(run_dir.resolve()), "outputs": sorted(set(owned) | set(planned))}


def _write_gguf(merged_dir: Path, gguf_dir: Path, recipe: Recipe, gguf_type: str, tokenizer, console, primary: bool) -> list[Path]:
    from fasttune.export.gguf_writer import write_gguf

    gguf_dir.mkdir(parents=True, exist_ok=True)
    name = f"{recipe.name}-{gguf_type}.gguf"
    console.print(f"[bold]gguf[/] {gguf_type} -> {escape(str(gguf_dir / name))}")
    template = training_template(tokenizer, recipe)
    # BOS at the start of a prompt exactly where the training template put one (llama3, mistral,
    # gemma): the runtime adds it, so the Modelfile's template leaves it out.
    result = write_gguf(merged_dir, gguf_dir / name, gguf_type, pre_tokenizer=recipe.export.gguf_pre_tokenizer,
                        chat_template=tokenizer.chat_template, add_bos=ollama_template(template).bos_from_runtime)
    for note in result.notes:
        console.print(f"[yellow]gguf[/] {escape(note)}")
    console.print(f"[bold]gguf[/] {name}: {gib(result.size_bytes)} in {result.seconds:.1f} s")
    system = recipe.data.system_prompt
    if system and not ollama_template(template).system:
        console.print(f"[yellow]modelfile[/] the {template.name} template has no system turn: data.system_prompt is not written to it")
        system = None
    try:
        modelfile = write_modelfile(gguf_dir, name, template, system=system,
                                    name="Modelfile" if primary else f"Modelfile.{gguf_type}")
    except ExportRefused:
        raise
    except ValueError as err:
        raise UserError(system_prompt_problem(system, err)) from None
    return [result.path, modelfile]


def parameter_count(source: str) -> int:
    """Parameters in ``source``'s safetensors, from the file headers (no weights are read)."""
    from safetensors import safe_open

    total = 0
    for shard in local_model_dir(source).glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as reader:
            for key in reader.keys():
                count = 1
                for dim in reader.get_slice(key).get_shape():
                    count *= dim
                total += count
    return total


def check_disk(out: Path, source: str, merge: bool, gguf: list[str]) -> None:
    """Refuse, naming the shortfall, when ``out``'s disk cannot hold what will be written."""
    params = parameter_count(source)
    needed = (2 * params if merge else 0) + sum(params * BITS_PER_WEIGHT[t] / 8 for t in gguf)
    require_free(out, needed * HEADROOM, "the export", "--out", "free some space, export fewer GGUF types, or give --out on a larger disk")
