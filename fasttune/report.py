"""The run directory's human-readable record: ``loss.png`` and ``report.md``.

Torch-free: everything here works from plain dicts (the records of ``metrics.jsonl`` and an
``info`` dict the runner fills), so a report can be rebuilt on a machine without the training
stack. matplotlib is imported only by ``plot_loss``.
"""
from __future__ import annotations

import json
import math
import os
import re
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from fasttune.atomic_io import atomic_file, atomic_write_text

REPORT_FILE = "report.md"
LOSS_PLOT_FILE = "loss.png"
METRICS_FILE = "metrics.jsonl"
"""Every logged metric of a run, one JSON object a line (written by fasttune.train.metrics_log)."""

# What a reader finds in a run directory, in the order the report lists it. Names not listed here
# are still shown, without a description.
_KNOWN_FILES = {
    "config.yaml": "the resolved recipe this run used",
    "adapter": "the LoRA adapter (PEFT format)",
    "model": "the fully fine-tuned model, 16-bit safetensors with its tokenizer (method full)",
    "merged": "the base model with the adapter merged in, 16-bit safetensors",
    "metrics.jsonl": "every logged metric, one JSON object per line",
    "loss.png": "training loss by step, evaluation loss as points",
    "gguf": "GGUF files for llama.cpp, Ollama and LM Studio, each with an Ollama Modelfile",
    "checkpoints": "trainer checkpoints, to resume from",
    "report.md": "this report",
}
_GGUF_DESCRIPTION = "GGUF export for llama.cpp / Ollama"
_CHECKPOINT_DESCRIPTION = "trainer checkpoint, to resume from"

DEFAULT_VERSION_PACKAGES = ("torch", "transformers", "trl", "peft")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read ``metrics.jsonl`` (or the one inside a run directory) as a list of dicts.

    A last line cut short by a kill is skipped. A damaged line anywhere else is not something
    ``MetricsLog`` produces, so it raises ``ValueError`` with the file and line number.
    """
    path = metrics_path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON line ({err.msg}); the file is damaged") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def metrics_path(path: str | os.PathLike[str]) -> Path:
    """The metrics file for ``path``: itself if it names a ``.jsonl`` file, else ``path/metrics.jsonl``."""
    path = Path(path)
    return path if path.suffix == ".jsonl" else path / METRICS_FILE


def installed_versions(packages: tuple[str, ...] = DEFAULT_VERSION_PACKAGES) -> dict[str, str]:
    """Versions of ``packages`` installed here, read from package metadata (imports none of them).

    Packages that are not installed are left out. Meant for ``info["versions"]``.
    """
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def training_summary(metrics: list[dict[str, Any]], eval_sets: Iterable[str] = ()) -> dict[str, Any]:
    """The ``info`` keys that ``metrics.jsonl`` records can supply, for ``write_report``.

    Returns any of ``steps``, ``epochs``, ``wall_time_s``, ``tokens_per_s``,
    ``final_train_loss`` (the last logged loss), ``mean_train_loss`` (the trainer's average over
    the run), ``eval_loss`` (the last evaluation) and ``eval_losses`` (named eval sets: name -> the
    last ``eval_<name>_loss``), each only when the records hold it. ``eval_sets`` are the names of the
    run's named eval sets (the keys of ``data.eval_path``; none for one eval set): see :func:`eval_set_of`.
    """
    summary: dict[str, Any] = {}
    train_losses = [r["loss"] for r in metrics if r.get("loss") is not None]
    eval_losses = [r["eval_loss"] for r in metrics if r.get("eval_loss") is not None]
    per_set = {name: loss for _, name, loss in eval_set_losses(metrics, eval_sets)}
    if per_set:
        summary["eval_losses"] = per_set
    if metrics:
        summary["steps"] = max(r.get("step", 0) for r in metrics)
        epochs = [r["epoch"] for r in metrics if r.get("epoch") is not None]
        if epochs:
            summary["epochs"] = max(epochs)
    if train_losses:
        summary["final_train_loss"] = train_losses[-1]
    if eval_losses:
        summary["eval_loss"] = eval_losses[-1]
    for record in reversed(metrics):
        if record.get("train_runtime") is not None:
            summary["wall_time_s"] = record["train_runtime"]
            if record.get("train_loss") is not None:
                summary["mean_train_loss"] = record["train_loss"]
            break
    # transformers logs train_tokens_per_second at each logging step when it counts tokens
    # (include_num_input_tokens_seen); TRL's SFTTrainer logs a running num_tokens instead.
    rates = [r["train_tokens_per_second"] for r in metrics if r.get("train_tokens_per_second")]
    counts = [r["num_tokens"] for r in metrics if r.get("num_tokens")]
    if rates:
        summary["tokens_per_s"] = rates[-1]
    elif counts and summary.get("wall_time_s"):
        summary["tokens_per_s"] = counts[-1] / summary["wall_time_s"]
    return summary


TRL_UNNAMED_EVAL_KEYS = ("eval_entropy", "eval_mean_token_accuracy", "eval_num_tokens")
"""What TRL 1.14.2's ``SFTTrainer.log`` adds to every evaluation's logs without the eval set's name
(fasttune.train.metrics_log.name_the_eval_set names them after the set)."""


def eval_set_of(record: dict[str, Any], eval_sets: Iterable[str]) -> str:
    """The named eval set an evaluation's logs (or a ``metrics.jsonl`` record) are of, or "" for a
    single eval set, no known names, or a record that is not an evaluation of one of them.

    ``eval_sets`` are the known names: the keys of ``data.eval_path`` (``PreparedData.eval_sets``,
    ``trainer.eval_dataset`` when it is a dict, ``summary.json``'s ``eval_sets``). transformers 5.17's
    ``Trainer.evaluate`` of a dict evaluates each set on its own and prefixes every key of its metrics
    ``eval_<name>_``, so the name is read from the known names, never guessed from a key's ending (a
    compute_metrics key ``gen_runtime`` is ``eval_easy_gen_runtime``). Each key is of the longest name
    whose ``eval_<name>_`` prefixes it (sets ``easy`` and ``easy_gen``: ``eval_easy_gen_loss`` is
    ``easy_gen``'s); the record is of the shortest of those, as every key of set ``easy`` starts with
    ``eval_easy_`` while only its user metrics named ``gen_...`` would also read as ``easy_gen``'s.
    TRL's unnamed keys (:data:`TRL_UNNAMED_EVAL_KEYS`) name no set (``eval_num_tokens`` is not of a set ``num``)."""
    names = sorted({str(name) for name in eval_sets}, key=len, reverse=True)
    found = []
    for key in record:
        if key in TRL_UNNAMED_EVAL_KEYS or not key.startswith("eval_"):
            continue
        name = next((name for name in names if key.startswith(f"eval_{name}_")), None)
        if name is not None:
            found.append(name)
    return min(found, key=len, default="")


def eval_set_losses(metrics: list[dict[str, Any]], eval_sets: Iterable[str] = ()) -> list[tuple[int | None, str, float]]:
    """(step, set name, loss) of each evaluation of a named eval set, in order: the ``eval_<name>_loss`` of
    each record :func:`eval_set_of` finds of a set among the names ``eval_sets``. Without names (a single
    eval set, or a run that did not record them), none: a compute_metrics key ``token_loss`` of a single set
    (``eval_token_loss``) is not taken for a set."""
    found = []
    for record in metrics:
        name = eval_set_of(record, eval_sets)
        if name and record.get(f"eval_{name}_loss") is not None:
            found.append((record.get("step"), name, record[f"eval_{name}_loss"]))
    return found


def plot_loss(metrics: list[dict[str, Any]], png_path: str | os.PathLike[str], eval_sets: Iterable[str] = ()) -> Path | None:
    """Draw training loss against step (a line) and evaluation loss (points, one series per named eval set
    of ``eval_sets``) into ``png_path``.

    ``metrics`` are ``metrics.jsonl`` records. Returns the path written, or ``None`` when the
    records hold no loss at all (nothing is written then). The file is replaced atomically.
    """
    train = [(r["step"], r["loss"]) for r in metrics if r.get("loss") is not None and "step" in r]
    evals = [(r["step"], r["eval_loss"]) for r in metrics if r.get("eval_loss") is not None and "step" in r]
    per_set: dict[str, list[tuple[int, float]]] = {}
    for step, name, loss in eval_set_losses(metrics, eval_sets):
        if step is not None:
            per_set.setdefault(name, []).append((step, loss))
    if not train and not evals and not per_set:
        return None

    # The Agg canvas on a bare Figure: no pyplot global state and no display needed, and the
    # process-wide matplotlib backend is left as the caller set it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o", label="eval loss", markersize=5)
    for name, points in per_set.items():
        ax.plot(*zip(*points), "o", label=f"eval loss ({name})", markersize=5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(png_path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_report(run_dir: str | os.PathLike[str], info: dict[str, Any]) -> Path:
    """Write ``run_dir/report.md`` (atomically) from ``info`` and the files in ``run_dir``.

    Every key is optional; a section, table row or line whose keys are absent is left out.

    What ran:
        ``recipe`` (str, also the title), ``base_model`` (str), ``method`` (``"lora"``,
        ``"qlora"``), ``adapter`` (str, the adapter the run trained on from), ``backend`` (``"unsloth"``, ``"hf"``), ``backend_reason`` (str, why that
        backend was chosen, shown beside it), ``dtype`` (str), ``attention`` (str,
        the attention implementation), ``fast_path`` (str, Unsloth's patched-layer counts),
        ``kernels`` (str, extra kernels applied, e.g. Liger), ``device`` (str, e.g.
        ``"NVIDIA H100 80GB HBM3"``), ``processes`` (int, data-parallel processes),
        ``versions`` (dict package -> version; see ``installed_versions``).
    Data:
        ``data_source`` (str), ``data_format`` (str, e.g. ``"messages"``), ``train_rows`` (int),
        ``eval_rows`` (int), ``eval_sets`` (dict name -> rows, for named eval sets).
    Training:
        ``steps`` (int), ``epochs`` (float), ``wall_time_s`` (float), ``tokens_per_s`` (float),
        ``trainable_params`` (int), ``total_params`` (int).
    Final metrics:
        ``final_train_loss`` (float), ``mean_train_loss`` (float), ``eval_loss`` (float),
        ``eval_losses`` (dict name -> float, for named eval sets).
    Task metric:
        ``task``: ``{"name": str, "before": {metric: number}, "after": {metric: number}}``;
        either side may be missing.
    Sample outputs:
        ``samples``: list of ``{"prompt": str, "before": str, "after": str, "reference": str}``
        (each field optional but ``prompt``).
    Metrics records:
        ``metrics`` (list of ``metrics.jsonl`` records, from ``read_metrics``): fills every key that
        ``training_summary`` returns and ``info`` does not set itself; the records' named eval sets are
        those ``eval_sets`` names (a report rebuilt from ``summary.json`` reads them from there).

    The files section lists what is in ``run_dir`` when the report is written, and the loss plot
    is embedded when ``loss.png`` is there. Returns the report's path.
    """
    run_dir = Path(run_dir)
    info = {**training_summary(info.get("metrics") or [], info.get("eval_sets") or ()), **info}
    sections = [
        _what_ran(info),
        _data(info),
        _training(info),
        _final_metrics(info),
        _task(info.get("task")),
        _samples(info.get("samples")),
        _files(run_dir),
    ]
    title = f"# fasttune run: {info['recipe']}" if info.get("recipe") else f"# fasttune run: {run_dir.name}"
    text = "\n\n".join([title, *(s for s in sections if s)]) + "\n"
    return atomic_write_text(run_dir / REPORT_FILE, text)


# -- sections: each returns markdown, or "" when info has nothing for it --


def _fields(rows: list[tuple[str, Any]]) -> list[str]:
    return [f"| {label} | {_cell(value)} |" for label, value in rows if value is not None and value != ""]


def _section(heading: str, rows: list[str]) -> str:
    if not rows:
        return ""
    return "\n".join([f"## {heading}", "", "| | |", "|---|---|", *rows])


def _what_ran(info: dict[str, Any]) -> str:
    rows = _fields(
        [
            ("recipe", info.get("recipe")),
            ("base model", _code(info.get("base_model"))),
            ("method", info.get("method")),
            ("trained on from", _code(info.get("adapter"))),
            ("backend", _with_reason(info.get("backend"), info.get("backend_reason"))),
            ("dtype", info.get("dtype")),
            ("fast path", info.get("fast_path")),
            ("kernels", info.get("kernels")),
            ("attention", info.get("attention")),
            ("device", info.get("device")),
            ("processes", info.get("processes")),
        ]
    )
    versions = info.get("versions") or {}
    if versions:
        rows.append(f"| versions | {_cell(', '.join(f'{name} {v}' for name, v in versions.items()))} |")
    return _section("What ran", rows)


def _data(info: dict[str, Any]) -> str:
    rows = _fields(
        [
            ("source", _code(info.get("data_source"))),
            ("format", info.get("data_format")),
            ("train rows", info.get("train_rows")),
            ("eval rows", info.get("eval_rows")),
            *((f"eval rows ({name})", count) for name, count in (info.get("eval_sets") or {}).items()),
        ]
    )
    return _section("Data", rows)


def _training(info: dict[str, Any]) -> str:
    trainable, total = info.get("trainable_params"), info.get("total_params")
    if trainable is not None and total:
        params = f"{trainable:,} / {total:,} ({100 * trainable / total:.3g}%)"
    elif trainable is not None:
        params = f"{trainable:,} trainable"
    else:
        params = None
    wall = info.get("wall_time_s")
    tokens_per_s = info.get("tokens_per_s")
    rows = _fields(
        [
            ("steps", info.get("steps")),
            ("epochs", info.get("epochs")),
            ("wall time", _duration(wall) if wall is not None else None),
            ("tokens/s", f"{tokens_per_s:,.0f}" if tokens_per_s is not None else None),
            ("trainable / total params", params),
        ]
    )
    return _section("Training", rows)


def _final_metrics(info: dict[str, Any]) -> str:
    rows = _fields(
        [
            ("final train loss", info.get("final_train_loss")),
            ("mean train loss", info.get("mean_train_loss")),
            ("eval loss", info.get("eval_loss")),
            *((f"eval loss ({name})", loss) for name, loss in (info.get("eval_losses") or {}).items()),
        ]
    )
    return _section("Final metrics", rows)


def _task(task: dict[str, Any] | None) -> str:
    if not task:
        return ""
    before, after = task.get("before") or {}, task.get("after") or {}
    names = list(dict.fromkeys([*before, *after]))
    if not names:
        return ""
    lines = [f"## Task: {task['name']}" if task.get("name") else "## Task", ""]
    lines += ["| metric | before | after | change |", "|---|---:|---:|---:|"]
    for name in names:
        b, a = before.get(name), after.get(name)
        change = _number(a - b, signed=True) if _is_number(a) and _is_number(b) else ""
        shown = ["" if value is None else _cell(value) for value in (b, a)]
        lines.append(f"| {_cell(name)} | {shown[0]} | {shown[1]} | {change} |")
    return "\n".join(lines)


def _samples(samples: list[dict[str, Any]] | None) -> str:
    if not samples:
        return ""
    lines = ["## Sample outputs"]
    for number, sample in enumerate(samples, start=1):
        lines += ["", f"### Sample {number}"]
        for key, label in (("prompt", "Prompt"), ("before", "Output before training"),
                           ("after", "Output after training"), ("reference", "Reference")):
            if sample.get(key) is not None:
                lines += ["", f"{label}:", "", _fenced(str(sample[key]))]
    return "\n".join(lines)


def _files(run_dir: Path) -> str:
    if not run_dir.is_dir():
        return ""
    entries = {p.name: p for p in run_dir.iterdir() if not p.name.startswith(".")}
    entries.setdefault(REPORT_FILE, run_dir / REPORT_FILE)
    order = [name for name in _KNOWN_FILES if name in entries]
    order += sorted(name for name in entries if name not in _KNOWN_FILES)
    lines = ["## Files", ""]
    for name in order:
        shown = f"{name}/" if entries[name].is_dir() else name
        description = _KNOWN_FILES.get(name)
        if description is None and name.endswith(".gguf"):
            description = _GGUF_DESCRIPTION
        elif description is None and name.startswith("checkpoint-"):
            description = _CHECKPOINT_DESCRIPTION
        lines.append(f"- `{shown}`" + (f": {description}" if description else ""))
    if LOSS_PLOT_FILE in entries:
        lines += ["", f"![loss by step]({LOSS_PLOT_FILE})"]
    return "\n".join(lines)


# -- formatting --


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: float | int, signed: bool = False) -> str:
    sign = "+" if signed else ""
    if isinstance(value, int):
        return f"{value:{sign},}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:{sign}.4g}"


def _cell(value: Any) -> str:
    text = _number(value) if _is_number(value) else str(value)
    # A pipe would end the table cell; a newline would end the row.
    return text.replace("|", "\\|").replace("\n", " ")


def _with_reason(value: Any, reason: Any) -> Any:
    return f"{value} ({reason})" if value and reason else value


def _code(value: Any) -> str | None:
    return f"`{value}`" if value else None


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min {secs:02d} s"
    return f"{minutes} min {secs:02d} s"


def _fenced(text: str) -> str:
    # The fence must be longer than any backtick run inside, or a sample that itself contains
    # a code block would close ours early (CommonMark 0.31, "Fenced code blocks").
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"
