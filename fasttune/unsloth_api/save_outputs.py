"""The folders and files fasttune's Unsloth saving calls write (fasttune/unsloth_api/saving.py).

The adapter alone; the 16-bit model (the LoRA merged into the 16-bit base it was loaded from, shard
by shard, by ``export.merge.merge_adapter``, never into 4-bit weights; a model without LoRA as it is,
by ``train.runner.save_16bit``); and GGUF files from that, by fasttune's own writer, with an Ollama
Modelfile. Each folder is written beside its place and renamed when whole (``atomic_io``); a folder
that holds anything but a saved model is never replaced.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from fasttune.atomic_io import atomic_dir, atomic_write_text, temp_dir_beside
from fasttune.disk import gib
from fasttune.errors import Problem, UserError
from fasttune.families import FAMILIES
from fasttune.model.gguf_import import imported_from
from fasttune.families.chat_templates import TEMPLATES, get_template, recognize
from fasttune.output_paths import folder_problem

SAVING = "cannot save the model"


SAVE_RECORD = "fasttune-save.json"
"""Written into every folder these saving calls write: what they wrote, so a later save may replace it."""


def save_adapter(model, out: Path, tokenizer) -> Path:
    """``out``: the LoRA adapter (PEFT's safetensors) and, if given, the tokenizer."""
    if not has_lora(model):
        raise UserError(Problem("save_method", "lora", "this model has no LoRA adapter (full fine-tuning trains every weight)",
                                "save_method='merged_16bit' writes the whole model in 16 bits"), SAVING)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record_save(tmp)
    print(f"fasttune: saved the LoRA adapter to {out}")
    return out


def save_16bit_model(model, merged_dtype: str, out: Path, tokenizer) -> Path:
    """``out``: the LoRA merged into the 16-bit base, or a model without LoRA as it is, in 16 bits."""
    if has_lora(model):
        return merge_into_base(model, out, tokenizer, merged_dtype)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise UserError(Problem("model", type(model).__name__, "is quantized and has no LoRA: there is nothing trained to "
                                "merge, and its quantized weights are not the 16-bit model",
                                "attach LoRA with FastLanguageModel.get_peft_model and train it first, or load with "
                                "full_finetuning=True to train and save the whole model"), SAVING)
    from fasttune.train.runner import save_16bit

    with atomic_dir(out) as tmp:
        save_16bit(model, tmp, merged_dtype)
        tokenizer.save_pretrained(tmp)
        record_save(tmp)
    print(f"fasttune: saved the model in {merged_dtype} to {out}")
    return out


def merge_into_base(model, out: Path, tokenizer, dtype: str) -> Path:
    """The adapter, saved to a temporary folder (deleted after), merged into the base its config names."""
    from fasttune.export.merge import merge_adapter

    adapter = temp_dir_beside(out.with_name(f"{out.name}-adapter"))
    try:
        model.save_pretrained(adapter, safe_serialization=True)
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        base = config.get("base_model_name_or_path")
        if not base:
            raise UserError(Problem("model", type(model).__name__, "its adapter does not name the base model it was "
                                    "attached to", "load the base with FastLanguageModel.from_pretrained(name)"), SAVING)
        result = merge_adapter(base, adapter, out, tokenizer, save_dtype=dtype, revision=config.get("revision"), finish=record_save)
    finally:
        shutil.rmtree(adapter, ignore_errors=True)
    print(f"fasttune: merged {result.merged_modules} LoRA modules into {base} -> {result.path} ({dtype})")
    return result.path


def write_ggufs(model_dir: Path, gguf_dir: Path, presets: list[str], tokenizer, stem: str) -> tuple[list[Path], Path | None]:
    """One GGUF per preset from ``model_dir``, and a Modelfile for each where the chat template has an
    Ollama counterpart (``Modelfile`` for the first, ``Modelfile.<preset>`` for the others); the GGUF files
    and the first Modelfile."""
    from fasttune.export.gguf_writer import write_gguf
    from fasttune.export.modelfile import ollama_template, write_modelfile
    from fasttune.export.refusals import NoOllamaTemplate

    # fasttune's own template, or the known format a publisher's template speaks (its turn tokens;
    # the family's format first: Qwen3 and ChatML open turns alike)
    family = FAMILIES.get(json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("model_type"))
    exact = next((t for t in TEMPLATES.values() if t.source() == tokenizer.chat_template), None)
    template = exact or recognize(tokenizer.chat_template, tokenizer.get_vocab(),
                                  prefer=get_template(family.chat_template) if family else None)
    try:
        ollama = ollama_template(template) if template else None
    except NoOllamaTemplate:
        ollama = None
    written, modelfile = [], None
    for index, preset in enumerate(presets):
        name = f"{stem}.{preset.upper()}.gguf"  # Unsloth's file name (save_to_gguf)
        # BOS where the training template put one: the runtime adds it, the Modelfile leaves it out.
        result = write_gguf(model_dir, gguf_dir / name, preset, chat_template=tokenizer.chat_template,
                            add_bos=ollama.bos_from_runtime if ollama else None)
        for note in result.notes:
            print(f"fasttune: gguf {note}")
        print(f"fasttune: wrote {result.path} ({gib(result.size_bytes)}, {result.seconds:.1f} s)")
        written.append(result.path)
        if ollama is not None:
            path = write_modelfile(gguf_dir, name, template, name="Modelfile" if index == 0 else f"Modelfile.{preset}")
            print(f"fasttune: wrote {path} ({template.name} template): ollama create NAME -f {path}")
            modelfile = modelfile or path
    if ollama is None:
        why = ("the tokenizer has no chat template" if not tokenizer.chat_template else
               f"the tokenizer's chat template speaks none of fasttune's formats ({', '.join(sorted(TEMPLATES))})")
        print(f"fasttune: no Modelfile written: {why}, so its Ollama TEMPLATE is unknown; set tokenizer.chat_template = "
              "fasttune.families.chat_templates.get_template(name).source() before training to get one")
    return written, modelfile


def claim_folder(save_directory, loaded_from: tuple[str, ...] = ()) -> Path:
    """``save_directory``, refused unless absent, empty, or a folder a save of these calls wrote
    (its SAVE_RECORD lists everything in it): the save replaces it whole, and fasttune never deletes
    what it did not write (a Trainer's output_dir, notes beside a model, the model itself). A folder
    the model was loaded from (``loaded_from``: its base, its adapter) is refused too."""
    out = Path(save_directory).expanduser()
    problem = folder_problem(out, "save_directory", "give a folder you can write")
    if problem is not None:
        raise UserError(problem, SAVING)
    if out.exists() and str(out.resolve()) in loaded_from:
        raise UserError(Problem("save_directory", str(out), "is the folder this model was loaded from: a save replaces "
                                "the whole folder, and the model would lose its own weights", "give a new folder"), SAVING)
    entries = sorted(out.iterdir()) if out.is_dir() else []
    recorded = _recorded(out)
    foreign = [e for e in entries if e.name != SAVE_RECORD and e.name not in recorded]
    if foreign:
        shown = ", ".join(e.name + "/" * e.is_dir() for e in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise UserError(Problem("save_directory", str(out), f"holds {shown}, which no fasttune save wrote; a save replaces "
                                "the whole folder", "give a new folder, or move those yourself (fasttune never deletes "
                                "what it did not write)"), SAVING)
    return out


def _recorded(folder: Path) -> set[str]:
    """The names SAVE_RECORD in ``folder`` says a save wrote there (none when it is absent or unreadable)."""
    try:
        record = json.loads((folder / SAVE_RECORD).read_text(encoding="utf-8"))
        return {str(name) for name in record.get("files", [])}
    except (OSError, ValueError, AttributeError):
        return set()


def record_save(folder: Path) -> None:
    """Write SAVE_RECORD into ``folder``: every file a save put there, so the next save may replace them."""
    names = sorted(p.name for p in Path(folder).iterdir() if p.name != SAVE_RECORD)
    atomic_write_text(Path(folder) / SAVE_RECORD, json.dumps({"written_by": "fasttune.FastLanguageModel", "files": names},
                                                             indent=1) + "\n")


def has_lora(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def model_stem(model) -> str:
    """The GGUF file stem: the last part of the base model's name, as Unsloth's ``_model_basename``; for a
    base fasttune converted from a GGUF file, that file's name without its type (``SmolLM2-135M-Instruct``)."""
    name = Path(str(getattr(model, "name_or_path", "") or "model"))
    source = imported_from(name) if name.is_dir() else None
    if source is not None:
        return re.sub(r"[.-](?:I?Q\d\w*|F16|BF16|F32)$", "", source.stem, flags=re.IGNORECASE) or source.stem
    return name.name or "model"
