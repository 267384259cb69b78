"""A recipe, resolved: named recipe + ``extends`` + command-line overrides, checked (torch-free).

fasttune's own sections (``model``, ``data``, ``eval``, ``export``, ``hooks``) are typed dataclasses below.
The sections that feed a library class pass through as mappings and are bound to that class by
:mod:`fasttune.binding` (``quantization`` → ``BitsAndBytesConfig``, ``lora`` → ``peft.LoraConfig``,
``train`` → ``trl.SFTConfig``), so every field of those classes is reachable without retyping them.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field

from fasttune import recipes
from fasttune.coercion import coerce, parse_value
from fasttune.errors import Problem, UserError, suggest
from fasttune.families import FAMILIES
from fasttune.families.chat_templates import TEMPLATES
from fasttune.gguf_types import GGUF_TYPES
from fasttune.output_paths import folder_problem
from fasttune.value_rules import value_problems

METHODS = ("qlora", "lora", "full")
LIBRARY_SECTIONS = {"quantization": "BitsAndBytesConfig", "lora": "peft.LoraConfig", "train": "trl.SFTConfig"}

# QLoRA as the QLoRA paper and Unsloth load it: NF4 with double quantization, 16-bit compute.
QLORA_DEFAULTS = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_compute_dtype": "bfloat16",
}


@dataclass
class ModelSection:
    name: str = ""
    """Hub id, local folder (safetensors), or ``package:<pkg>/<file>.gguf`` (a GGUF file shipped in an installed package)."""
    revision: typing.Optional[str] = None
    """Hub revision (branch, tag or commit) to load."""
    adapter: typing.Optional[str] = None
    """A LoRA adapter to train on from: a PEFT adapter folder, a fasttune run folder (its ``adapter/``) or a
    hub id. Its own ``adapter_config.json`` sets the LoRA settings; a ``lora:`` value that contradicts it is refused."""
    backend: typing.Literal["auto", "unsloth", "hf"] = "auto"
    """``unsloth`` (fused kernels), ``hf`` (transformers + PEFT), or ``auto``: Unsloth where it can run."""
    attn_implementation: typing.Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel for the ``hf`` backend."""
    dtype: typing.Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights/compute dtype; ``auto`` picks bf16 where the GPU supports it, fp16 below Ampere, fp32 on a CPU."""
    trust_remote_code: bool = False
    """Run Python code shipped with the checkpoint. Off unless the recipe says so."""


DATA_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
"""The row shapes fasttune reads (fasttune/data/formats.py converts each), in the order it detects them."""


@dataclass
class DataSection:
    path: typing.Union[str, list[str]] = ""
    """A .jsonl/.json/.csv/.parquet file, a ``save_to_disk`` folder, a hub dataset, or ``builtin:<task>``;
    several (a list, or commas on the command line) are read in order and must share one row shape."""
    split: str = "train"
    """Split to read from a hub dataset or ``save_to_disk`` folder."""
    format: typing.Literal[("auto", *DATA_FORMATS)] = "auto"
    """Row shape; ``auto`` detects it from the columns (after ``mapping``)."""
    mapping: typing.Optional[dict] = None
    """Column templates that build rows of a known shape: ``user``/``assistant`` (and ``system``) build a
    conversation, e.g. ``assistant: "<think>{Complex_CoT}</think>{Response}"``; ``prompt``/``completion`` or
    ``text`` build those columns. ``{Column}`` is a column of the data; see fasttune/data/mapping.py."""
    on_bad_row: typing.Literal["error", "skip"] = "error"
    """A row with a missing or empty field, an unknown role or no assistant turn: ``error`` stops and lists
    every kind; ``skip`` drops those rows and reports how many of each kind."""
    chat_template: str = "auto"
    """Training chat template (fasttune/families/templates). ``auto``: the one matching the
    tokenizer's own template when that is a known format, else the family's."""
    system_prompt: typing.Optional[str] = None
    """System turn added to conversations that have none."""
    eval_path: typing.Union[str, list[str], dict[str, typing.Union[str, list[str]]], None] = None
    """A separate held-out file, or several (same shape as ``path``); used instead of ``eval_fraction``. Or
    several eval sets, each evaluated and logged on its own: a mapping of a name (letters, digits, ``_``) to
    its file(s), e.g. ``{easy: easy.jsonl, hard: hard.jsonl}`` (``data.eval_path.easy=easy.jsonl`` on the
    command line); their losses are ``eval_<name>_loss``, and the task metric uses the first set."""
    eval_fraction: float = 0.0
    """Fraction of ``path`` held out for evaluation (seeded by ``seed``) when there is no ``eval_path``
    (refused together with named eval sets: name the held-out rows as a set of their own)."""
    max_rows: typing.Optional[int] = None
    """Use only the first N training rows."""
    eval_rows: typing.Optional[int] = None
    """Use only the first N evaluation rows (of each eval set)."""
    seed: int = 42
    """Seed for the train/eval split and generated data."""


@dataclass
class EvalSection:
    task: typing.Optional[str] = None
    """A task metric (``fasttune.tasks``) measured on the held-out rows before and after training."""
    max_new_tokens: int = 64
    """Generation length for the task metric and sample outputs."""
    samples: int = 3
    """How many held-out examples the report shows, before and after."""


@dataclass
class ExportSection:
    adapter: bool = True
    """Save the LoRA adapter (``adapter/``)."""
    merged: bool = False
    """Save the adapter merged into a 16-bit copy of the base (``merged/``)."""
    gguf: list[str] = dataclasses.field(default_factory=list)
    """GGUF files to write from the merged model (``gguf/``, each with an Ollama Modelfile): any of
    the types in fasttune/gguf_types.py (e.g. q8_0, q4_k_m). Implies ``merged``."""
    gguf_pre_tokenizer: typing.Optional[str] = None
    """llama.cpp's name for the BPE pre-tokenizer (``tokenizer.ggml.pre``); default: recognized from the tokenizer."""


@dataclass
class HooksSection:
    """Functions of the user's that SFTTrainer calls, each named ``module:attribute``. The module is
    imported from the current folder (as ``python -m`` does) or the installed packages; a Python caller
    gives the objects themselves (``fasttune.hooks.Hooks``)."""

    formatting_func: typing.Optional[str] = None
    """Called with each row (a dict of the data's own columns, train and eval), returns the text to train
    on, as TRL's ``SFTTrainer(formatting_func=...)`` does: the rows become ``text`` rows, every token is
    trained, EOS appended (trl 1.14.2, ``SFTTrainer._prepare_dataset``). Replaces ``data.mapping``/``format``."""
    compute_metrics: typing.Optional[str] = None
    """Called by every evaluation with a ``transformers.EvalPrediction``, returns ``{name: number}``
    (logged as ``eval_<name>``, or ``eval_<set>_<name>`` per named eval set)."""
    preprocess_logits_for_metrics: typing.Optional[str] = None
    """Called with ``(logits, labels)`` of each eval batch, returns what ``compute_metrics`` gets as
    predictions (e.g. ``logits.argmax(-1)``), so evaluation does not hold every logit in memory."""
    callbacks: list[str] = dataclasses.field(default_factory=list)
    """``transformers.TrainerCallback``s added to fasttune's own: a class (made with no arguments), an
    instance, or a function returning one."""

    def named(self) -> dict[str, str]:
        """``hooks.<key>`` (``hooks.callbacks[i]`` for each callback) -> its ``module:attribute``, for those set."""
        out = {f"hooks.{key}": getattr(self, key) for key in ("formatting_func", "compute_metrics", "preprocess_logits_for_metrics")}
        out.update({f"hooks.callbacks[{i}]": spec for i, spec in enumerate(self.callbacks)})
        return {key: spec for key, spec in out.items() if spec is not None}


EVAL_SET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
"""A named eval set: it becomes part of metric keys (``eval_<name>_loss``)."""

BUILTIN_PREFIX = "builtin:"
"""``data.path`` of a task fasttune generates itself (fasttune.tasks): ``builtin:<task>``."""

OWNED_SECTIONS = {"model": ModelSection, "data": DataSection, "eval": EvalSection, "export": ExportSection, "hooks": HooksSection}
TOP_LEVEL = ("name", "description", "family", "method", "gpu_memory_gb", "extends")
RUN_KEYS = ("machine", "python_hooks")
"""Keys fasttune adds to a run's config.yaml (what ran it): ignored when that file is read back as a recipe."""


@dataclass
class Recipe:
    """A resolved recipe. ``quantization``, ``lora`` and ``train`` are bound by fasttune.binding."""

    name: str
    description: str
    family: str
    method: str
    gpu_memory_gb: typing.Optional[int]
    """GPU memory the recipe is sized for; ``None`` means it runs on a CPU."""
    model: ModelSection
    data: DataSection
    eval: EvalSection
    export: ExportSection
    quantization: dict = field(default_factory=dict)
    lora: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    hooks: HooksSection = field(default_factory=HooksSection)

    @property
    def needs_gpu(self) -> bool:
        return self.gpu_memory_gb is not None

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (what ``show`` prints and ``config.yaml`` holds)."""
        out = {
            "name": self.name,
            "description": self.description,
            "family": self.family,
            "method": self.method,
            "gpu_memory_gb": self.gpu_memory_gb,
        }
        for section in OWNED_SECTIONS:
            if section != "hooks" or self.hooks.named():  # no hooks: config.yaml and `show` as before hooks existed
                out[section] = dataclasses.asdict(getattr(self, section))
        for section in LIBRARY_SECTIONS:
            value = getattr(self, section)
            if value or section == "train":
                out[section] = dict(value)
        return out


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``section.key=value`` strings applied onto a raw recipe mapping (a copy)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    problems = []
    set_by: dict[str, str] = {}  # dotted key -> the override that set it (else the recipe did)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(Problem("override", item, "overrides are written key=value (dotted keys: train.learning_rate=1e-4)",
                                    "write it as SECTION.KEY=VALUE"))
            continue
        parts = key.split(".")
        if not all(part.strip() for part in parts):
            problems.append(Problem("override", item, "a dotted key has an empty part", "write it as SECTION.KEY=VALUE, e.g. train.learning_rate=1e-4"))
            continue
        below = _below_a_value(out, parts, item, text, set_by)
        if below is not None:
            problems.append(below)
            continue
        target = out
        for part in parts[:-1]:
            nested = target.get(part)
            # a copy on the way down: data.eval_path.easy=... must not edit the recipe's own mapping
            nested = dict(nested) if isinstance(nested, dict) else {}
            target[part] = nested
            target = nested
        target[parts[-1]] = parse_value(text)
        set_by[key] = item
    if problems:
        raise UserError(problems, "bad command line")
    return out


def _below_a_value(out: dict, parts: list[str], item: str, text: str, set_by: dict[str, str]) -> Problem | None:
    """A dotted override that goes below a value that is set and is not a mapping (``data.eval_path=easy.jsonl``
    then ``data.eval_path.hard=hard.jsonl``) would replace that value with a mapping, silently: refused.
    An absent or null value becomes a mapping."""
    target = out
    for depth, part in enumerate(parts[:-1], start=1):
        value = target.get(part) if isinstance(target, dict) else None
        if value is None:
            return None
        if not isinstance(value, dict):
            above = ".".join(parts[:depth])
            source = f"by the override {set_by[above]}" if above in set_by else "by the recipe"
            name = re.sub(r"[^A-Za-z0-9_]", "_", str(value).rsplit("/", 1)[-1].split(".")[0]) if isinstance(value, str) else ""
            name = name if EVAL_SET_NAME.match(name) else "<name>"
            fix = (f"name every entry: {above}.{name}={_shown(value)} {'.'.join(parts)}={text.strip()} (or set {above} alone)"
                   if isinstance(value, (str, list)) else f"set {above} itself ({above}=VALUE), or drop {item}")
            return Problem("override", item, f"goes below {above}, which is {value!r} (set {source}), not a mapping: "
                           "it would replace that value", fix)
        target = value
    return None


def _shown(value: object) -> str:
    """A value as it is written on the command line."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _owned_section(section: str, cls: type, values: object, problems: list[Problem]) -> object:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        problems.append(Problem(section, values, "must be a mapping of keys to values", f"write `{section}:` followed by indented keys"))
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            hint = suggest(key, names)
            problems.append(Problem(f"{section}.{key}", value, f"is not a key of `{section}` (keys: {', '.join(names)})",
                                    hint or f"remove it, or use one of the keys of `{section}`"))
            continue
        try:
            kwargs[key] = coerce(value, hints[key])
        except ValueError as err:
            default = getattr(cls(), key)
            problems.append(Problem(f"{section}.{key}", value, str(err), f"set it to a valid value (default: {default!r})"))
    return cls(**kwargs)


def source_paths(spec: typing.Union[str, list, None]) -> list[str]:
    """The sources named by ``data.path``: a list, or one string with commas between sources."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec or "").split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def _data_problems(data: DataSection, train: typing.Optional[dict] = None) -> list[Problem]:
    """Checks of ``data`` fields beyond their types (the files themselves are read by fasttune.data)."""
    problems = []
    paths = source_paths(data.path)
    if len(paths) > 1 and any(p.startswith(BUILTIN_PREFIX) for p in paths):
        problems.append(Problem("data.path", data.path, "a builtin: task cannot be combined with other sources",
                                "use the builtin task alone, or only files and hub datasets"))
    if isinstance(data.eval_path, dict):
        problems.extend(_eval_set_problems(data, train or {}))
    for key in ("max_rows", "eval_rows"):
        value = getattr(data, key)
        if value is not None and value < (1 if key == "max_rows" else 0):
            problems.append(Problem(f"data.{key}", value, "must be a positive number of rows" if key == "max_rows" else "must be 0 or more",
                                    "set it to a row count, or null for all rows"))
    return problems


def eval_sets(spec: typing.Union[str, list, dict, None]) -> dict[str, list[str]]:
    """The named eval sets of ``data.eval_path`` (name -> its sources), or ``{}`` when it is one set."""
    return {str(name): source_paths(paths) for name, paths in spec.items()} if isinstance(spec, dict) else {}


def _eval_set_problems(data: DataSection, train: dict) -> list[Problem]:
    """Named eval sets: each name a simple identifier (it becomes a metric key), each with sources, and a
    best-model metric (``train``: the recipe's train section) that names one set's metric."""
    problems = []
    if not data.eval_path:
        problems.append(Problem("data.eval_path", data.eval_path, "is an empty mapping of eval sets",
                                "name at least one set (data.eval_path.easy=easy.jsonl), or leave data.eval_path out"))
    for name, paths in data.eval_path.items():
        if not isinstance(name, str) or not EVAL_SET_NAME.match(name):
            problems.append(Problem(f"data.eval_path.{name}", paths, "an eval set's name must be letters, digits and _ (not first a "
                                    "digit): it becomes the metric key eval_<name>_loss",
                                    f"rename it, e.g. {_set_name(name)}"))
        elif not isinstance(paths, (str, list)) or not source_paths(paths):
            problems.append(Problem(f"data.eval_path.{name}", paths, "must name a file (or a list of files) of held-out rows",
                                    f"set data.eval_path.{name}=<file.jsonl>"))
        elif any(p.startswith(BUILTIN_PREFIX) for p in source_paths(paths)):
            problems.append(Problem(f"data.eval_path.{name}", paths, "an eval set is read from files or hub datasets, not a builtin: task",
                                    "point it at a file"))
    if data.eval_fraction > 0:
        problems.append(Problem("data.eval_fraction", data.eval_fraction, "holds rows out of data.path, but data.eval_path names eval "
                                "sets: which set would they join?", "set data.eval_fraction=0, and give the held-out rows a file "
                                                                     "of their own in data.eval_path"))
    problems.extend(_best_model_problems([str(name) for name in data.eval_path], train))
    return problems


BEST_MODEL_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")
"""lr_scheduler_type values transformers steps by ``metric_for_best_model`` after each evaluation."""


def _best_model_problems(names: list[str], train: dict) -> list[Problem]:
    """With named eval sets transformers' Trainer logs ``eval_<name>_loss`` and no ``eval_loss``, so a
    best-model metric must name one set's: ``train.metric_for_best_model``, which defaults to ``loss``
    (``eval_loss``) under ``load_best_model_at_end`` or a plateau scheduler (transformers 5.17,
    TrainingArguments.__post_init__), is looked up at the first save (``Trainer._determine_best_metric``)
    or evaluation and raises KeyError there, after training started."""
    if not names:
        return []
    metric = train.get("metric_for_best_model")
    examples = ", ".join(f"eval_{name}_loss" for name in names)
    if metric is not None:
        key = str(metric) if str(metric).startswith("eval_") else f"eval_{metric}"
        if any(key.startswith(f"eval_{name}_") and len(key) > len(f"eval_{name}_") for name in names):
            return []
        return [Problem("train.metric_for_best_model", metric, f"is looked up as {key}, which named eval sets do not log: each "
                        f"set's metrics are eval_<name>_<metric> ({examples}, ...); the run would fail at its first save",
                        f"name one set's metric, e.g. train.metric_for_best_model=eval_{names[0]}_loss")]
    best, scheduler = train.get("load_best_model_at_end"), train.get("lr_scheduler_type")
    asks = [("train.load_best_model_at_end", best)] if best is True or str(best).lower() == "true" else []
    if str(getattr(scheduler, "value", scheduler)) in BEST_MODEL_SCHEDULERS:
        asks.append(("train.lr_scheduler_type", scheduler))
    return [Problem(key, value, "compares evaluations by transformers' default metric_for_best_model=loss (eval_loss), which "
                    f"named eval sets do not log ({examples}); the run would fail at its first "
                    f"{'save' if key.endswith('at_end') else 'evaluation'}",
                    f"set train.metric_for_best_model to one set's metric, e.g. eval_{names[0]}_loss")
            for key, value in asks]


def _set_name(name: object) -> str:
    """A valid eval set name close to ``name``: ``bad-name`` -> ``bad_name``, ``1st`` -> ``set_1st``."""
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", str(name))
    return cleaned if cleaned and not cleaned[0].isdigit() else f"set_{cleaned or 1}"


def hook_form_problems(hooks: HooksSection) -> list[Problem]:
    """Each hook is written ``module:attribute`` (whether it imports is fasttune.hooks' check)."""
    problems = []
    for key, spec in hooks.named().items():
        module, sep, attribute = spec.partition(":")
        if not sep or not module.strip() or not attribute.strip() or ":" in attribute:
            problems.append(Problem(key, spec, "is written module:attribute, e.g. my_hooks:format_row (a module in the current folder "
                                    "or an installed package, then the name in it)",
                                    f"write it as MODULE:NAME, e.g. {spec.replace('.', ':', 1) if '.' in spec and not sep else 'my_hooks:' + spec.strip(':')}"))
    return problems


def formatting_func_problems(recipe: "Recipe", func: object, where: str = "hooks.formatting_func") -> list[Problem]:
    """What a formatting_func (``func``: its ``module:attribute``, or the object) cannot be combined
    with: it builds text rows from the data's own columns, so the settings that build or read other
    row shapes would be silently unused."""
    problems = []
    data = recipe.data
    if data.mapping is not None:
        problems.append(Problem(where, func, "builds each row from the data's columns, and so does data.mapping",
                                "keep one of them: remove data.mapping, or hooks.formatting_func"))
    if data.format != "auto":
        problems.append(Problem("data.format", data.format, f"does not apply with {where}: it makes every row a text row",
                                "leave data.format at auto"))
    if data.system_prompt is not None:
        problems.append(Problem("data.system_prompt", data.system_prompt, f"adds a system turn to conversations; {where} makes text rows",
                                "write the system text in the formatting function, or remove data.system_prompt"))
    if recipe.train.get("completion_only_loss") is True:
        # trl 1.14.2 SFTTrainer.__init__ refuses the same: formatted rows are language modelling rows.
        problems.append(Problem("train.completion_only_loss", True, f"contradicts {where}: its text rows have no completion, "
                                "every token trains (TRL refuses the pair too)", "drop train.completion_only_loss"))
    if recipe.eval.task:
        problems.append(Problem("eval.task", recipe.eval.task, f"generates answers from conversation rows, and {where} makes text rows",
                                "set eval.task=null"))
    return problems


def _eval_data_problems(data: DataSection, train: dict) -> list[Problem]:
    """transformers' Trainer refuses an eval_strategy without held-out rows, but only once it is built
    (after the weights load): say so here, with the keys that give it rows."""
    strategy = train.get("eval_strategy")
    if strategy not in ("steps", "epoch"):  # "no", or a value SFTConfig refuses itself when the recipe binds
        return []
    builtin = any(p.startswith(BUILTIN_PREFIX) for p in source_paths(data.path))
    if not builtin and (data.eval_rows == 0 or not (data.eval_path or data.eval_fraction > 0)):
        why = "data.eval_rows is 0" if data.eval_rows == 0 else "neither data.eval_path nor data.eval_fraction is set"
        return [Problem("train.eval_strategy", strategy, f"evaluates held-out rows, but there are none ({why})",
                        "set data.eval_fraction=0.05 or data.eval_path=<file>, or train.eval_strategy=no")]
    return []


def _output_dir_problems(library: dict[str, dict]) -> list[Problem]:
    """A train.output_dir that cannot be written (read from disk, torch-free)."""
    output_dir = library["train"].get("output_dir")
    if isinstance(output_dir, str) and output_dir:
        found = folder_problem(output_dir, "train.output_dir", "point train.output_dir at a folder you can write, or leave it out "
                                                               "for runs/<recipe>-<time>")
        return [found] if found else []
    if output_dir is not None and not isinstance(output_dir, str):
        return [Problem("train.output_dir", output_dir, "must be a folder path", "e.g. train.output_dir=runs/my-run")]
    return []


def resolve(name_or_path: str, overrides: typing.Sequence[str] = (),
            checks: typing.Sequence[typing.Callable[["Recipe"], list[Problem]]] = ()) -> Recipe:
    """Read, merge, override and check a recipe; all problems are raised together.

    These are fasttune's own rules. ``checks`` are the stations' (the data mapping compiles, a
    local model is what it claims: fasttune.prepare.resolve passes them); each gets the recipe as
    read, and what they find is raised with the rest."""
    source = recipes.load_merged(name_or_path)
    raw = apply_overrides(source.raw, list(overrides))
    problems: list[Problem] = []

    known = (*TOP_LEVEL, *OWNED_SECTIONS, *LIBRARY_SECTIONS, *RUN_KEYS)
    for key in raw:
        if key not in known:
            hint = suggest(key, known)
            shown = sorted(map(str, raw[key])) if isinstance(raw[key], dict) else raw[key]  # a section's keys, not its contents
            problems.append(Problem(key, shown, f"is not a recipe key (sections: {', '.join((*OWNED_SECTIONS, *LIBRARY_SECTIONS))})",
                                    hint or "remove it"))

    family = raw.get("family")
    if family not in FAMILIES:
        problems.append(Problem("family", family, f"must be one of {', '.join(sorted(FAMILIES))}",
                                suggest(str(family), FAMILIES) or "set `family:` to the base model's config.model_type"))
    method = raw.get("method", "qlora")
    if method not in METHODS:
        problems.append(Problem("method", method, f"must be one of {', '.join(METHODS)}", suggest(str(method), METHODS) or "use qlora"))
    gpu = raw.get("gpu_memory_gb")
    try:
        gpu = coerce(gpu, typing.Optional[int])
        if gpu is not None and gpu <= 0:
            raise ValueError("must be a positive number of GB")
    except ValueError as err:
        problems.append(Problem("gpu_memory_gb", gpu, f"{err} (null: the recipe runs on a CPU)", "set the GPU memory in GB the recipe is sized for"))
        gpu = None

    sections = {name: _owned_section(name, cls, raw.get(name), problems) for name, cls in OWNED_SECTIONS.items()}
    library = {}
    for name in LIBRARY_SECTIONS:
        value = raw.get(name) or {}
        if not isinstance(value, dict):
            problems.append(Problem(name, value, "must be a mapping of keys to values", f"write `{name}:` followed by indented keys"))
            value = {}
        library[name] = dict(value)

    model, data = sections["model"], sections["data"]
    if not model.name:
        problems.append(Problem("model.name", None, "every recipe names a base model", "set model.name=<hub id or local folder>"))
    if not data.path:
        problems.append(Problem("data.path", None, "every recipe names its training data", "set data.path=<file.jsonl>"))
    if not 0.0 <= data.eval_fraction < 1.0:
        problems.append(Problem("data.eval_fraction", data.eval_fraction, "must be in [0, 1)", "use e.g. 0.05 for a 5% held-out split"))
    problems.extend(_data_problems(data, library["train"]))
    problems.extend(hook_form_problems(sections["hooks"]))
    bad = [t for t in sections["export"].gguf if t not in GGUF_TYPES]
    if bad:
        problems.append(Problem("export.gguf", sections["export"].gguf, f"types must be among {', '.join(GGUF_TYPES)}",
                                suggest(str(bad[0]), GGUF_TYPES) or "use e.g. [q8_0] or [q4_k_m]"))

    if model.adapter and isinstance(library["lora"], dict):
        # The adapter's own settings replace what a shipped recipe brings; only the user's own lora
        # values (the command line's, the user's recipe file's) are checked against the adapter.
        own = set(recipes.own_section(name_or_path, "lora")) | {
            item.partition("=")[0].strip().split(".")[1] for item in overrides if item.strip().startswith("lora.") and "=" in item}
        library["lora"] = {key: value for key, value in library["lora"].items() if key in own}
    if family in FAMILIES:
        fam = FAMILIES[family]
        if method in ("qlora", "lora") and not model.adapter:  # an adapter brings its own targets
            library["lora"].setdefault("target_modules", list(fam.target_modules))
    if data.chat_template != "auto" and data.chat_template not in TEMPLATES:
        problems.append(Problem("data.chat_template", data.chat_template, f"must be auto or one of {', '.join(sorted(TEMPLATES))}",
                                suggest(str(data.chat_template), TEMPLATES) or "leave it at auto"))

    if method == "qlora":
        library["quantization"] = {**QLORA_DEFAULTS, **library["quantization"]}
    elif method in METHODS and library["quantization"]:
        problems.append(Problem("quantization", sorted(library["quantization"]), f"applies to method qlora only (this recipe is {method})",
                                "remove the quantization section, or set method=qlora"))
    if method == "full" and model.adapter:
        problems.append(Problem("model.adapter", model.adapter, "trains a LoRA adapter on (methods qlora and lora); "
                                "method full trains every parameter", "set method=lora or method=qlora, or remove model.adapter"))
    if method == "full" and library["lora"]:
        problems.append(Problem("lora", sorted(library["lora"]), "applies to methods qlora and lora (this recipe is full)",
                                "remove the lora section, or set method=lora"))
    problems.extend(value_problems({**library, "eval": dataclasses.asdict(sections["eval"])}))
    problems.extend(_eval_data_problems(data, library["train"]))
    problems.extend(_output_dir_problems(library))

    recipe = Recipe(
        name=str(raw.get("name") or source.name),
        description=str(raw.get("description") or ""),
        family=family,
        method=method,
        gpu_memory_gb=gpu,
        quantization=library["quantization"],
        lora=library["lora"],
        train=library["train"],
        **sections,
    )
    if recipe.hooks.formatting_func is not None:
        problems.extend(formatting_func_problems(recipe, recipe.hooks.formatting_func))
    for check in checks:
        problems.extend(check(recipe))
    if problems:
        named = raw.get("name") if isinstance(raw.get("name"), str) and raw.get("name") else source.name  # a run's config.yaml
        raise UserError(problems, f"recipe {named!r} is not valid")
    return recipe
