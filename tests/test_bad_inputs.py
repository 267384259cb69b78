"""Every bad input a user can give gets one clean refusal: exit code 2, one message naming the
thing (key, file or flag) with a fix, no traceback, nothing loaded, and nothing the user had changed.

One table of real mistakes is walked through the real entry point ``fasttune.cli.main(argv)`` in
one process (torch and the libraries import once), from a folder that holds a user's files: a tiny
local model, chat data, broken data and recipe files, run folders, output folders that already
hold files of their own. Each case asserts exit code 2, no "Traceback", the offending thing named,
a non-empty ``fix:``, and that every file and folder there is as it was (names, sizes, hashes).
A few cases run again as real processes (``python -m fasttune``), end to end.

``show`` checks fasttune's own rules without importing the libraries, so a library key's *type*
(``lora.r=many``) is refused by ``--dry-run`` (binding to LoraConfig), not by ``show``; its
*range* (``lora.r=0``) is refused by both.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from fasttune.cli import main

# ---------------------------------------------------------------------------------------------
# The cases. Paths are relative to the user's folder (the test chdirs there); see `world` below.
# ---------------------------------------------------------------------------------------------

MODEL, CHAT = "model", "chat.jsonl"
BASE = [f"model.name={MODEL}", f"data.path={CHAT}"]
# A real run that must be refused before it loads weights; should a refusal regress, it trains one step only.
RUN = ["recipe", "demo", *BASE, "train.max_steps=1", "eval.task=null", "export.merged=false", "export.gguf=[]", "data.eval_rows=0"]


def _unwritable() -> str | None:
    """A folder path this process cannot create files in: a read-only folder of the user's, or (for
    root, whom permissions do not stop) a path under /sys, where nothing can be created."""
    if os.geteuid() != 0:
        return "locked/out"
    try:
        handle, name = tempfile.mkstemp(dir="/sys")
    except OSError:
        return "/sys/fasttune-bad-inputs/out"
    os.close(handle)
    os.unlink(name)
    return None


UNWRITABLE = _unwritable()
CUDA = torch.cuda.is_available()  # GPU-only refusals (a GPU recipe on a CPU machine) cannot happen there
UNSLOTH = importlib.util.find_spec("unsloth") is not None


@dataclass(frozen=True)
class Case:
    verb: str
    argv: tuple[str, ...]
    needles: tuple[str, ...]
    """What the message must contain: the offending key, file or flag (and its value where useful)."""
    usage: bool = False
    """argparse's own refusal (usage line and ``error:``), which has no ``fix:`` line."""

    @property
    def id(self) -> str:
        return f"{self.verb}:{' '.join(self.argv)}".replace(" ".join(RUN), "RUN").replace(" ".join(BASE), "BASE")


def case(verb, argv, *needles, usage=False) -> Case:
    return Case(verb, tuple(argv), tuple(needles), usage)


def shown(value) -> str:
    """How the message prints a value: ``repr`` of what the command line parsed."""
    return repr(value)


# Keys with a rule, and values a user could type that break it. TYPE_BAD values break the type; the
# others the range (the first group's types are the libraries', checked when the recipe binds).
TYPE_BAD = ("abc", 2.5)
LIBRARY_VALUES = {
    "lora.r": (0, -1, 2.5, "abc"),
    "lora.lora_alpha": (0, -16, "abc"),
    "lora.lora_dropout": (-0.1, 1, 1.5, "abc"),
    "train.learning_rate": (0, -1, -2e-4, "abc"),
    "train.per_device_train_batch_size": (0, -1, 2.5, "abc"),
    "train.per_device_eval_batch_size": (0, -1, "abc"),
    "train.gradient_accumulation_steps": (0, -1, "abc"),
    "train.max_length": (0, -1, "abc"),
    "train.num_train_epochs": (0, -1, "abc"),
    "train.max_steps": (0, -2, "abc"),
    "train.warmup_steps": (-1, "abc"),
    "train.logging_steps": (0, -1, "abc"),
    "train.save_steps": (0, -5, "abc"),
    "train.eval_steps": (0, -1),
    "train.weight_decay": (-0.1, "abc"),
    "train.max_grad_norm": (-1, "abc"),
    "train.seed": (-1, "abc"),
}
OWNED_VALUES = {  # fasttune's own sections: type and range both checked when the recipe resolves
    "data.max_rows": (0, -1, "abc"),
    "data.eval_rows": (-1, "abc"),
    "data.eval_fraction": (-0.1, 1, 1.5, "abc"),
    "data.seed": ("abc",),
    "eval.max_new_tokens": (0, -1, "abc"),
    "eval.samples": (-1, "abc"),
    "gpu_memory_gb": (0, -1, "abc"),
}


def value_cases() -> list[Case]:
    out = []
    for key, values in {**LIBRARY_VALUES, **OWNED_VALUES}.items():
        for value in values:
            needle = f"{key} = {shown(value)}"
            if key in OWNED_VALUES or value not in TYPE_BAD:  # show does not bind: library types are the dry run's
                out.append(case("show", ["show", "demo", f"{key}={value}"], needle))
            out.append(case("recipe --dry-run", ["recipe", "demo", *BASE, f"{key}={value}", "--dry-run"], needle))
    return out


# Bad data files (in the user's folder), each with what the message must name.
DATA_FILES = {
    "bad/binary.jsonl": "binary.jsonl:1",
    "bad/latin1.jsonl": "latin1.jsonl:2",
    "bad/latin1.csv": "latin1.csv",
    "bad/binary.json": "binary.json",
    "bad/deep.json": "deep.json",
    "bad/deep.jsonl": "deep.jsonl:2",
    "bad/invalid.jsonl": "invalid.jsonl:2",
    "bad/not-objects.jsonl": "not-objects.jsonl:1",
    "bad/scalar.json": "scalar.json",
    "bad/empty.jsonl": "empty.jsonl",
    "bad/nul.csv": "nul.csv",
    "bad/extra-cells.csv": "extra-cells.csv:3",
    "bad/broken.parquet": "broken.parquet",
    "bad/rows.txt": "rows.txt",
    "missing.jsonl": "missing.jsonl",
    "bad/emptydir": "emptydir",
    "bad/no-assistant.jsonl": "no-assistant.jsonl",
    f"{CHAT},bad/text.jsonl": "sources must share one row shape",
    "builtin:nope": "builtin:nope",
    "bad/latin1.yaml": "latin1.yaml",
}


def data_cases() -> list[Case]:
    out = []
    for path, needle in DATA_FILES.items():
        out.append(case("recipe --dry-run", ["recipe", "demo", f"model.name={MODEL}", f"data.path={path}", "--dry-run"], needle))
        out.append(case("data inspect", ["data", "inspect", path, "--recipe", "demo", f"model.name={MODEL}"], needle))
    for path, needle in (("missing.jsonl", "data.eval_path = 'missing.jsonl'"), ("bad/binary.jsonl", "binary.jsonl:1"),
                         ("bad/empty.jsonl", "data.eval_path = 'bad/empty.jsonl'"), ("bad/text.jsonl", "bad/text.jsonl: 2 rows")):
        out.append(case("recipe --dry-run", ["recipe", "demo", *BASE, f"data.eval_path={path}", "--dry-run"], needle))
    return out


# model.name values that are not what they claim: refused when the recipe resolves (show too) ...
MODEL_AT_RESOLVE = {
    "bad/broken-config": "config.json that is not a JSON object",
    "bad/no-tokenizer": "has no tokenizer files",
    "bad/fake.gguf": "is not a GGUF file",
    "bad/missing.gguf": "no such GGUF file",
    "package:nopkg/model.gguf": "package:nopkg/model.gguf",
    "package:nopkg": "package:nopkg",
    "chat.jsonl": "is a file, not a model folder",
}
# ... and those only a run (or its dry run) finds, when it opens the folder.
MODEL_AT_LOAD = {
    "./no-such-model": "no such folder",
    "bad/no-weights": "holds no *.safetensors",
    "bad/pickled": "pickled weights",
}


def model_cases() -> list[Case]:
    out = []
    for name, needle in MODEL_AT_RESOLVE.items():
        out.append(case("show", ["show", "demo", f"model.name={name}"], "model.name", needle))
        out.append(case("recipe --dry-run", ["recipe", "demo", f"model.name={name}", f"data.path={CHAT}", "--dry-run"], "model.name", needle))
    for name, needle in MODEL_AT_LOAD.items():
        out.append(case("recipe --dry-run", ["recipe", "demo", f"model.name={name}", f"data.path={CHAT}", "--dry-run"], "model.name", needle))
    for name in ("bad/no-tokenizer", "bad/fake.gguf"):
        out.append(case("data inspect", ["data", "inspect", CHAT, f"model.name={name}"], "model.name", MODEL_AT_RESOLVE[name]))
    targets = [("lora.target_modules=[nope_proj]", "nope_proj"), ("lora.target_modules=[q_proj,v_prj]", "v_prj"),
               ("lora.target_modules=[]", "lora.target_modules"), ("family=phi3", "qkv_proj")]  # phi3's targets on a llama
    for override, needle in targets:
        out.append(case("show", ["show", "demo", f"model.name={MODEL}", override], "lora.target_modules", needle))
        out.append(case("recipe --dry-run", ["recipe", "demo", *BASE, override, "--dry-run"], "lora.target_modules", needle))
    return out


RECIPE_FILES = {
    "recipes/binary.yaml": "binary.yaml",
    "recipes/latin1.yaml": "latin1.yaml line 3",
    "recipes/bad-indent.yaml": "bad-indent.yaml line",
    "recipes/list.yaml": "list.yaml",
    "recipes/empty.yaml": "empty.yaml",
    "recipes/deep.yaml": "deep.yaml",
    "recipes/folder.yaml": "is a folder",
    "recipes/missing.yaml": "missing.yaml",
    "recipes/cycle-a.yaml": "cycle",
    "recipes/extends-unknown.yaml": "nope_recipe",
    "recipes/extends-list.yaml": "extends",
    "recipes/bad-values.yaml": "lora.r = 0",
    "mistral_qlroa": "did you mean `mistral_qlora`",
}

# Overrides that break a fasttune rule: refused by show and by a dry run alike.
RESOLVE_OVERRIDES = {
    "oops": "override = 'oops'",
    "=5": "override = '=5'",
    "train..learning_rate=1": "override = 'train..learning_rate=1'",
    "trian.learning_rate=1e-4": "trian = ['learning_rate']",
    "family=llamma": "family = 'llamma'",
    "method=qlroa": "method = 'qlroa'",
    "method=full": "lora = [",
    "lora=5": "lora = 5",
    "train=fast": "train = 'fast'",
    "data=5": "data = 5",
    "model.backend=turbo": "model.backend = 'turbo'",
    "model.dtype=float8": "model.dtype = 'float8'",
    "model.attn_implementation=fast": "model.attn_implementation = 'fast'",
    "model.name=": "model.name",
    "data.path=": "data.path",
    "data.format=csvish": "data.format = 'csvish'",
    "data.on_bad_row=ignore": "data.on_bad_row = 'ignore'",
    "data.chat_template=chatmlx": "data.chat_template = 'chatmlx'",
    "data.mapping={user: '{Question}'}": "data.mapping",
    "data.datapath=x.jsonl": "data.datapath",
    "data.path=builtin:json_extract,chat.jsonl": "data.path",
    "export.gguf=[q9_0]": "export.gguf",
    "quantization.load_in_4bit=true": "quantization = ['load_in_4bit']",
    "eval.task=nope": "eval.task = 'nope'",
    "eval.task=json-extract": "eval.task = 'json-extract'",
    "train.output_dir=chat.jsonl": "train.output_dir = 'chat.jsonl': is a file",
    "train.output_dir=chat.jsonl/run": "train.output_dir = 'chat.jsonl/run'",
    "train.eval_strategy=steps": "train.eval_strategy = 'steps'",
}
QLORA_OVERRIDES = {  # quantization settings bitsandbytes refuses only when the weights load
    "quantization.bnb_4bit_quant_type=nf5": "quantization.bnb_4bit_quant_type = 'nf5'",
    "quantization.bnb_4bit_compute_dtype=fp16": "quantization.bnb_4bit_compute_dtype = 'fp16'",
}
# Mistakes only binding to the library classes finds (a dry run and a run; show does not import them).
BIND_OVERRIDES = {
    "train.learnin_rate=1e-4": "did you mean `train.learning_rate`",
    "lora.rank=8": "lora.rank",
    "lora.bias=sometimes": "lora.bias = 'sometimes'",
    "train.lr_scheduler_type=zigzag": "train.lr_scheduler_type = 'zigzag'",
    "train.optim=sgdx": "train.optim = 'sgdx'",
    "train.eval_strategy=sometimes": "train.eval_strategy",
    "train.packing=maybe": "train.packing = 'maybe'",
    "quantization.bnb_4bit_quant_type=nf4": "quantization",  # on a lora recipe
}


def recipe_cases() -> list[Case]:
    out = []
    for path, needle in RECIPE_FILES.items():
        out.append(case("show", ["show", path], needle))
        out.append(case("recipe --dry-run", ["recipe", path, "--dry-run"], needle))
    for override, needle in RESOLVE_OVERRIDES.items():
        out.append(case("show", ["show", "demo", *BASE, override], needle))
        out.append(case("recipe --dry-run", ["recipe", "demo", *BASE, override, "--dry-run"], needle))
    for override, needle in QLORA_OVERRIDES.items():
        out.append(case("show", ["show", "demo", "method=qlora", override], needle))
        out.append(case("recipe --dry-run", ["recipe", "demo", *BASE, "method=qlora", override, "--dry-run", "--cpu"], needle))
    for override, needle in BIND_OVERRIDES.items():
        out.append(case("recipe --dry-run", ["recipe", "demo", *BASE, override, "--dry-run"], needle))
    out.append(case("recipe --dry-run", ["recipe", "demo", "data.path=bad/text.jsonl", f"model.name={MODEL}", "--dry-run"],
                    "train.assistant_only_loss"))
    if not UNSLOTH:
        out.append(case("recipe --dry-run", ["recipe", "demo", *BASE, "model.backend=unsloth", "--dry-run"], "model.backend"))
    if not CUDA:
        out.append(case("recipe --dry-run", ["recipe", "demo", *BASE, "model.attn_implementation=flash_attention_2", "--dry-run"],
                        "model.attn_implementation"))
    if UNWRITABLE:
        out.append(case("show", ["show", "demo", f"train.output_dir={UNWRITABLE}"], "train.output_dir", "cannot be written"))
    out.append(case("recipe --dry-run", ["recipe", "demo", *BASE, "--dry-run", "--resume", "runs/none-here"], "--resume"))
    out.append(case("recipe --dry-run", ["recipe", "demo", "--dry-run", "--bogus"], "--bogus", usage=True))
    return out


def run_cases() -> list[Case]:
    """Real runs (no --dry-run) that must stop before any weights load."""
    out = [case("recipe", [*RUN, override], needle) for override, needle in (
        ("lora.r=0", "lora.r = 0"), ("train.learning_rate=0", "train.learning_rate = 0"),
        ("train.per_device_train_batch_size=0", "train.per_device_train_batch_size = 0"),
        ("train.output_dir=chat.jsonl", "train.output_dir"), ("lora.target_modules=[nope_proj]", "nope_proj"),
        ("eval.task=nope", "eval.task"), ("model.name=bad/fake.gguf", "is not a GGUF file"),
        ("lora.lora_dropout=1.5", "lora.lora_dropout"), ("train.lr_scheduler_type=zigzag", "train.lr_scheduler_type"),
        ("model.name=bad/no-tokenizer", "has no tokenizer files"))]
    if not CUDA:
        out.append(case("recipe", ["recipe", "mistral_qlora"], "needs a CUDA GPU"))
        out.append(case("recipe", [*RUN, "model.attn_implementation=flash_attention_2"], "model.attn_implementation"))
    if not UNSLOTH:
        out.append(case("recipe", [*RUN, "model.backend=unsloth"], "model.backend"))
    out.append(case("recipe", [*RUN, "--resume", "runs/none-here"], "--resume"))
    # run folder ownership: implemented in fasttune/train/
    out.append(case("recipe", [*RUN, "train.output_dir=outs/notes"], "train.output_dir", "outs/notes"))
    out.append(case("recipe", [*RUN, "--resume", "runs/broken-config"], "runs/broken-config"))
    out.append(case("recipe", [*RUN, "--resume", "runs/other-recipe"], "runs/other-recipe"))
    out.append(case("recipe", [*RUN, "--force"], "--force", "only applies with --resume"))
    return out


def cp_cases() -> list[Case]:
    out = [
        case("cp", ["cp", "demo", "mine.yaml"], "mine.yaml", "already exists"),
        case("cp", ["cp", "demo", "chat.jsonl/x.yaml"], "chat.jsonl/x.yaml", "is a file"),
        case("cp", ["cp", "demo", "bad"], "'bad'", "is a folder"),
        case("cp", ["cp", "demo", "bad", "--force"], "'bad'", "is a folder"),
        case("cp", ["cp", "mistral_qlroa", "new.yaml"], "mistral_qlroa"),
        case("cp", ["cp", "recipes/binary.yaml", "new.yaml"], "binary.yaml"),
        case("cp", ["cp", "demo"], "PATH", usage=True),
    ]
    if UNWRITABLE:
        out.append(case("cp", ["cp", "demo", f"{UNWRITABLE}/x.yaml"], "cannot be written"))
    return out


def inspect_cases() -> list[Case]:
    base = ["data", "inspect", CHAT, f"model.name={MODEL}"]
    return [
        case("data inspect", [*base, "-n", "-1"], "-n = -1"),
        case("data inspect", [*base, "-n", "two"], "-n", usage=True),
        case("data inspect", ["data", "inspect", CHAT, "--recipe", "nope_recipe"], "nope_recipe"),
        case("data inspect", ["data", "inspect", CHAT, "--recipe", "recipes/binary.yaml"], "binary.yaml"),
        case("data inspect", [*base, "lora.r=0"], "lora.r = 0"),
        case("data inspect", [*base, "train.max_length=0"], "train.max_length = 0"),
        case("data inspect", [*base, "train.max_length=many"], "train.max_length = 'many'"),
        case("data inspect", [*base, "data.max_rows=0"], "data.max_rows = 0"),
        case("data inspect", ["data", "inspect", "bad/text.jsonl", f"model.name={MODEL}"], "train.assistant_only_loss"),
        case("data inspect", ["data", "inspect", "bad/binary.jsonl", "--json", f"model.name={MODEL}"], "binary.jsonl"),
        case("data inspect", ["data", "dump", CHAT], "dump", usage=True),
    ]


def export_cases() -> list[Case]:
    run = "runs/finished"
    out = [
        case("export", ["export", "runs/none-here"], "runs/none-here"),
        case("export", ["export", "chat.jsonl"], "chat.jsonl"),
        case("export", ["export", "bad"], "RUN_DIR = 'bad'"),
        case("export", ["export", "runs/broken-config"], "config.yaml"),
        case("export", ["export", "runs/binary-config"], "config.yaml"),
        case("export", ["export", "runs/list-config"], "config.yaml"),
        case("export", ["export", "runs/invalid-recipe"], "lora.r = 0"),
        case("export", ["export", "runs/unfinished", "--merged"], "has no adapter/"),
        case("export", ["export", run, "--gguf", "zzz"], "--gguf = 'zzz'"),
        case("export", ["export", run, "--gguf", ","], "--gguf = ','"),
        case("export", ["export", run, "--gguf", "q8_0,q9"], "--gguf = 'q8_0,q9'"),
        case("export", ["export", run, "--merged", "--out", "chat.jsonl"], "--out = 'chat.jsonl'", "is a file"),
        case("export", ["export", run, "--merged", "--out", "chat.jsonl/sub"], "--out = 'chat.jsonl/sub'"),
        case("export", ["export", run, "--adapter", "--out", "outs/adapter"], "--out = 'outs/adapter'", "adapter"),
        case("export", ["export", run, "--merged", "--out", "outs/merged"], "--out = 'outs/merged'", "merged"),
        case("export", ["export", run, "--gguf", "q8_0", "--out", "outs/gguf"], "gguf/demo-q8_0.gguf"),
        case("export", ["export", run, "--gguf", "--out", "outs/modelfile"], "gguf/Modelfile"),
        case("export", ["export", run, "--adapter", "--out", "outs/other-export"], "--out = 'outs/other-export'", "adapter"),
        case("export", ["export", run, "--adapter", "--out", "outs/garbage-manifest"], "fasttune-export.json"),
        case("export", ["export", run, "--adapter", "--out", "runs/other-finished"], "--out = 'runs/other-finished'", "adapter"),
        case("export", ["export", run, "--zip"], "--zip", usage=True),
    ]
    if UNWRITABLE:
        out.append(case("export", ["export", run, "--merged", "--out", UNWRITABLE], "--out", "cannot be written"))
    return out


def bench_cases() -> list[Case]:
    base = ["bench", "demo", *BASE]
    out = [
        case("bench", [*base, "--examples", "0"], "--examples = 0"),
        case("bench", [*base, "--examples", "-5"], "--examples = -5"),
        case("bench", [*base, "--steps", "0"], "--steps = 0"),
        case("bench", [*base, "--warmup", "-1"], "--warmup = -1"),
        case("bench", [*base, "--timeout", "0"], "--timeout = 0"),
        case("bench", [*base, "--examples", "lots"], "--examples", usage=True),
        case("bench", [*base, "--examples", "4", "--warmup", "2"], "--examples = 4"),
        case("bench", ["bench", "nope_recipe"], "nope_recipe"),
        case("bench", [*base, "lora.r=0"], "lora.r = 0"),
        case("bench", [*base, "method=full", "lora={}"], "method = 'full'"),
        case("bench", [*base, "train.lr_scheduler_type=zigzag"], "train.lr_scheduler_type = 'zigzag'"),
        case("bench", [*base, "train.learnin_rate=1e-4"], "train.learnin_rate"),
        case("bench", [*base, "data.path=bad/binary.jsonl"], "binary.jsonl:1"),
        case("bench", ["bench", "demo", "--random-init", "model.name=someone/unknown-7b", f"data.path={CHAT}"], "model.name"),
        case("bench", [*base, "--out", "chat.jsonl"], "--out = 'chat.jsonl'", "is a file"),
        case("bench", [*base, "--out", "chat.jsonl/sub"], "--out = 'chat.jsonl/sub'"),
        case("bench", [*base, "--out", "outs/bench-results"], "results.json"),
        case("bench", [*base, "--out", "outs/bench-report"], "report.md", "bench.png"),
        case("bench", [*base, "--out", "outs/bench-log"], "vanilla.log"),
        case("bench", [*base, "--out", "outs/bench-work"], "work"),
    ]
    if UNWRITABLE:
        out.append(case("bench", [*base, "--out", UNWRITABLE], "--out", "cannot be written"))
    return out


def small_verb_cases() -> list[Case]:
    out = [
        case("recipes", ["recipes", "extra"], "extra", usage=True),
        case("recipes", ["recipes", "--all"], "--all", usage=True),
        case("recipes", [], "VERB", usage=True),
        case("recipes", ["train", "demo"], "train", usage=True),
        case("doctor", ["doctor", "--output-dir", "chat.jsonl"], "--output-dir = 'chat.jsonl'"),
        case("doctor", ["doctor", "--output-dir", "chat.jsonl/runs"], "--output-dir = 'chat.jsonl/runs'"),
        case("doctor", ["doctor", "extra"], "extra", usage=True),
        case("doctor", ["doctor", "--gpu"], "--gpu", usage=True),
    ]
    if UNWRITABLE:
        out.append(case("doctor", ["doctor", "--output-dir", UNWRITABLE], "--output-dir", "cannot be written"))
    return out


CASES = [*value_cases(), *data_cases(), *model_cases(), *recipe_cases(), *run_cases(), *cp_cases(), *inspect_cases(),
         *export_cases(), *bench_cases(), *small_verb_cases()]


# ---------------------------------------------------------------------------------------------
# The user's folder.
# ---------------------------------------------------------------------------------------------

CHAT_ROW = {"messages": [{"role": "user", "content": "Capital of Italy?"}, {"role": "assistant", "content": "Rome."}]}


def _write(root: Path, rel: str, content: str | bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


def _jsonl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _run_config(model: str, **changes) -> str:
    from fasttune import config

    document = {**config.resolve("demo", [f"model.name={model}", f"data.path={CHAT}"]).to_dict(), "machine": {"dtype": "float32"}}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        document[section][key] = value
    return yaml.safe_dump(document, sort_keys=False)


def build_world(root: Path) -> None:
    """The files of a user who has made every mistake in the table (and some good files)."""
    import shutil

    import pyarrow
    import pyarrow.parquet

    from fixtures.tiny_models import build_tiny_model, write_chat_jsonl
    from fixtures.tokenizers import load_tokenizer

    model = build_tiny_model("llama", load_tokenizer("smollm2"), root / MODEL)
    write_chat_jsonl(root / CHAT, 8)
    _write(root, "mine.yaml", "# my own recipe, not to be overwritten\nextends: demo\n")
    tokenizer_files = [p for p in model.iterdir() if p.name.startswith("tokenizer") or p.suffix == ".jinja"]
    # data
    _write(root, "bad/binary.jsonl", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\xff\x00binary")
    _write(root, "bad/latin1.jsonl", _jsonl(CHAT_ROW).encode() + b'{"text": "caf\xe9"}\n')
    _write(root, "bad/latin1.csv", b"prompt,completion\ncaf\xe9,ok\n")
    _write(root, "bad/binary.json", b"\x00\x01\x02\xff\xfe")
    _write(root, "bad/deep.json", "[" * 5000 + "]" * 5000)
    _write(root, "bad/deep.jsonl", _jsonl(CHAT_ROW) + '{"messages": ' + "[" * 5000 + "]" * 5000 + "}\n")
    _write(root, "bad/invalid.jsonl", _jsonl(CHAT_ROW) + '{"messages": [\n')
    _write(root, "bad/not-objects.jsonl", "[1, 2]\n")
    _write(root, "bad/scalar.json", "42\n")
    _write(root, "bad/empty.jsonl", "")
    _write(root, "bad/nul.csv", b"prompt,completion\nhi\x00,there\n")
    _write(root, "bad/extra-cells.csv", "prompt,completion\nhi,there\nhello,there,again\n")
    _write(root, "bad/broken.parquet", b"PAR1 this is not a parquet body PAR1")
    _write(root, "bad/rows.txt", "one row per line\n")
    (root / "bad" / "emptydir").mkdir(parents=True)
    _write(root, "bad/no-assistant.jsonl", _jsonl({"messages": [{"role": "user", "content": "hi"}]}))
    _write(root, "bad/text.jsonl", _jsonl({"text": "The sky is blue."}, {"text": "Grass is green."}))
    _write(root, "bad/latin1.yaml", b"family: llama\nmodel:\n  name: caf\xe9\n")
    # models
    _write(root, "bad/broken-config/config.json", '{"model_type": "llama",')
    for path in tokenizer_files:
        shutil.copy(path, root / "bad" / "broken-config" / path.name)
    _write(root, "bad/no-tokenizer/config.json", (model / "config.json").read_text())
    _write(root, "bad/no-tokenizer/model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    _write(root, "bad/no-weights/config.json", (model / "config.json").read_text())
    _write(root, "bad/pickled/config.json", (model / "config.json").read_text())
    _write(root, "bad/pickled/pytorch_model.bin", b"PK\x03\x04 a pickle")
    for folder in ("no-weights", "pickled"):
        for path in tokenizer_files:
            shutil.copy(path, root / "bad" / folder / path.name)
    _write(root, "bad/fake.gguf", "not a GGUF file\n")
    # recipe files
    _write(root, "recipes/binary.yaml", b"\x7fELF\x02\x01\x01\x00\x00\x00")
    _write(root, "recipes/latin1.yaml", b"family: llama\nmodel:\n  name: caf\xe9\n")
    _write(root, "recipes/bad-indent.yaml", "family: llama\nmodel:\n  name: x\n   bad: indent\n")
    _write(root, "recipes/list.yaml", "- family: llama\n- method: lora\n")
    _write(root, "recipes/empty.yaml", "")
    _write(root, "recipes/deep.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n")
    (root / "recipes" / "folder.yaml").mkdir(parents=True)
    _write(root, "recipes/cycle-a.yaml", "extends: recipes/cycle-b.yaml\n")
    _write(root, "recipes/cycle-b.yaml", "extends: recipes/cycle-a.yaml\n")
    _write(root, "recipes/extends-unknown.yaml", "extends: nope_recipe\n")
    _write(root, "recipes/extends-list.yaml", "extends: [demo, mistral_qlora]\n")
    _write(root, "recipes/bad-values.yaml", "extends: demo\nlora:\n  r: 0\n")
    # run folders
    adapter = json.dumps({"peft_type": "LORA", "r": 16, "base_model_name_or_path": MODEL})
    _write(root, "runs/finished/config.yaml", _run_config(MODEL))
    _write(root, "runs/finished/adapter/adapter_config.json", adapter)
    _write(root, "runs/other-finished/config.yaml", _run_config(MODEL))
    _write(root, "runs/other-finished/adapter/adapter_config.json", adapter)
    _write(root, "runs/unfinished/config.yaml", _run_config(MODEL))
    _write(root, "runs/broken-config/config.yaml", "name: demo\nlora: [unclosed\n")
    _write(root, "runs/binary-config/config.yaml", b"\x00\xff\xfe binary")
    _write(root, "runs/list-config/config.yaml", "- demo\n")
    _write(root, "runs/invalid-recipe/config.yaml", _run_config(MODEL, lora__r=0))
    other = yaml.safe_load(_run_config(MODEL))
    other.update(name="mistral_lora", description="another recipe's run")
    _write(root, "runs/other-recipe/config.yaml", yaml.safe_dump(other, sort_keys=False))
    # output folders holding the user's own files
    _write(root, "outs/notes/notes.txt", "mine")
    _write(root, "outs/adapter/adapter/adapter_config.json", '{"mine": true}')
    _write(root, "outs/merged/merged/config.json", '{"model_type": "llama", "mine": true}')
    _write(root, "outs/gguf/gguf/demo-q8_0.gguf", b"GGUF my own quantization")
    _write(root, "outs/modelfile/gguf/Modelfile", "FROM ./mine.gguf\n")
    _write(root, "outs/other-export/fasttune-export.json", json.dumps({"run": "/elsewhere/run", "outputs": ["adapter"]}))
    _write(root, "outs/other-export/adapter/adapter_config.json", '{"from": "another run"}')
    _write(root, "outs/garbage-manifest/fasttune-export.json", "my notes, not JSON")
    _write(root, "outs/bench-results/results.json", '{"measured": "last week"}')
    _write(root, "outs/bench-report/report.md", "# my bench\n")
    _write(root, "outs/bench-report/bench.png", b"\x89PNG mine")
    _write(root, "outs/bench-log/vanilla.log", "my log\n")
    _write(root, "outs/bench-work/work/keep.txt", "mine")
    if UNWRITABLE == "locked/out":
        (root / "locked").mkdir()
        (root / "locked").chmod(0o555)
    pyarrow.parquet.write_table(pyarrow.table({"prompt": ["a"], "completion": ["b"]}), root / "good.parquet")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    build_world(root)
    yield root
    if (root / "locked").exists():
        (root / "locked").chmod(0o755)


_digests: dict[tuple, str] = {}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root``: name -> (size, content hash) for files, "dir" for folders.
    A hash is recomputed only when the file's size, mtime or inode changed (as git's index does)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            found[os.path.relpath(os.path.join(dirpath, name), root)] = ("dir",)
        for name in filenames:
            path = os.path.join(dirpath, name)
            stat = os.stat(path)
            key = (path, stat.st_size, stat.st_mtime_ns, stat.st_ino)
            if key not in _digests:
                with open(path, "rb") as handle:
                    _digests[key] = hashlib.blake2b(handle.read(), digest_size=16).hexdigest()
            found[os.path.relpath(path, root)] = (stat.st_size, _digests[key])
    return found


def changes(before: dict, after: dict) -> list[str]:
    return sorted([f"+ {k}" for k in after.keys() - before.keys()] + [f"- {k}" for k in before.keys() - after.keys()]
                  + [f"~ {k}" for k in before.keys() & after.keys() if before[k] != after[k]])


def check_refusal(c: Case, code, out: str, err: str) -> None:
    text = out + err
    assert code == 2, f"exit {code}\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    for needle in c.needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    if c.usage:
        assert "error:" in err
    else:
        assert len(re.findall(r"^fasttune: ", err, flags=re.M)) == 1, f"one message, not several:\n{err}"
        fixes = re.findall(r"^\s+fix: (.*)$", err, flags=re.M)
        assert fixes and all(f.strip() for f in fixes), f"every problem needs a fix:\n{err}"


@pytest.mark.parametrize("c", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input_is_refused_cleanly(c: Case, world: Path, monkeypatch, capsys):
    monkeypatch.chdir(world)
    before = snapshot(world)
    try:
        code = main(list(c.argv))
    except SystemExit as stop:  # argparse refuses by exiting
        code = stop.code
    captured = capsys.readouterr()
    check_refusal(c, code, captured.out, captured.err)
    assert changes(before, snapshot(world)) == [], "the user's folder changed"


def test_the_sweep_covers_every_verb_with_enough_cases():
    verbs = {}
    for c in CASES:
        verbs[c.verb] = verbs.get(c.verb, 0) + 1
    assert len(CASES) >= 150, len(CASES)
    assert set(verbs) == {"recipes", "show", "cp", "recipe --dry-run", "recipe", "data inspect", "export", "bench", "doctor"}, verbs
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


SUBPROCESS_CASES = [
    case("show", ["show", "demo", "lora.r=0"], "lora.r = 0"),
    case("recipe --dry-run", ["recipe", "demo", f"model.name={MODEL}", "data.path=bad/latin1.jsonl", "--dry-run"], "latin1.jsonl:2"),
    case("export", ["export", "runs/finished", "--adapter", "--out", "outs/adapter"], "--out = 'outs/adapter'"),
    case("bench", ["bench", "demo", *BASE, "--out", "outs/bench-results"], "results.json"),
    case("cp", ["cp", "demo", "chat.jsonl/x.yaml"], "chat.jsonl/x.yaml"),
]


@pytest.mark.parametrize("c", [pytest.param(c, id=c.id) for c in SUBPROCESS_CASES])
def test_bad_input_is_refused_by_the_real_command(c: Case, world: Path):
    before = snapshot(world)
    result = subprocess.run([sys.executable, "-m", "fasttune", *c.argv], capture_output=True, text=True, cwd=world, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    check_refusal(c, result.returncode, result.stdout, result.stderr)
    assert changes(before, snapshot(world)) == []


# ---------------------------------------------------------------------------------------------
# What the refusals must not become: over-refusal, silence, and internal errors in disguise.
# ---------------------------------------------------------------------------------------------

def test_an_internal_error_is_one_line_and_a_file(monkeypatch, capsys, tmp_path):
    from fasttune import cli

    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "cmd_recipes", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["recipes"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    match = re.fullmatch(r"fasttune: internal error: RuntimeError: boom; the full traceback is in (\S+)\n", err)
    assert match, err
    saved = Path(match.group(1)).read_text()
    assert Path(match.group(1)).parent == tmp_path / "fasttune-errors"
    assert "Traceback" in saved and "second line" in saved and "python -m fasttune recipes" in saved


def test_a_user_mistake_is_never_an_internal_error(world, monkeypatch, capsys):
    monkeypatch.chdir(world)
    assert main(["show", "demo", "lora.r=0"]) == 2
    assert "internal error" not in capsys.readouterr().err


def test_max_rows_says_it_left_rows_out(world, monkeypatch, capsys):
    monkeypatch.chdir(world)
    assert main(["recipe", "demo", *BASE, "data.max_rows=3", "--dry-run"]) == 0
    assert "data.max_rows=3: using 3 of 8 rows" in capsys.readouterr().out
    assert main(["data", "inspect", CHAT, f"model.name={MODEL}", "data.max_rows=3"]) == 0
    assert "data.max_rows=3: using 3 of 8 rows" in capsys.readouterr().out


def test_good_inputs_next_to_the_bad_ones_still_pass(world, monkeypatch, capsys):
    """The rules refuse mistakes only: valid edge values and an --out of the user's own are accepted."""
    monkeypatch.chdir(world)
    for override in ("lora.lora_dropout=0", "train.warmup_steps=0", "train.max_steps=-1", "train.max_length=null",
                     "train.eval_strategy=steps", "data.eval_fraction=0.25"):
        assert main(["show", "demo", *BASE, "data.eval_fraction=0.25", override]) == 0, capsys.readouterr().err
    assert main(["recipe", "demo", *BASE, "train.output_dir=outs/new-run", "--dry-run"]) == 0, capsys.readouterr().err
    assert main(["recipe", "demo", "data.path=good.parquet", f"model.name={MODEL}", "train.assistant_only_loss=false",
                 "--dry-run"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert not (world / "outs" / "new-run").exists()


def test_export_may_replace_what_an_export_of_the_same_run_wrote(world, tmp_path):
    from fasttune import config
    from fasttune.errors import UserError
    from fasttune.export.exporter import MANIFEST, ExportRequest, claim_outputs

    run = world / "runs" / "finished"
    recipe = config.resolve(str(run / "config.yaml"))
    out = tmp_path / "exported"
    request = ExportRequest(adapter=True, gguf=["q8_0"], out=out)
    fresh = claim_outputs(out, run, recipe, request)
    assert fresh == {"run": str(run.resolve()), "outputs": ["adapter", "gguf/Modelfile", "gguf/demo-q8_0.gguf", "merged"]}
    (out / "adapter").mkdir(parents=True)
    (out / MANIFEST).write_text(json.dumps(fresh))
    again = claim_outputs(out, run, recipe, ExportRequest(adapter=True, gguf=["q4_k_m"], out=out))
    assert set(again["outputs"]) == {*fresh["outputs"], "gguf/demo-q4_k_m.gguf"}
    with pytest.raises(UserError, match="already holds adapter"):
        claim_outputs(out, world / "runs" / "other-finished", recipe, request)


def test_a_failed_bench_side_gives_its_last_error_not_its_traceback():
    from fasttune.bench.harness import last_error

    crash = ("loading...\nTraceback (most recent call last):\n  File \"x.py\", line 3, in <module>\n    run()\n"
             "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    assert last_error(crash) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    refused = "note\nfasttune: cannot run this: 1 problem\n  - data.path = 'x.jsonl': no such file\n    fix: check the path\n"
    assert last_error(refused) == "cannot run this: 1 problem - data.path = 'x.jsonl': no such file fix: check the path"
    assert last_error("") == "it wrote nothing to its log"
