"""The bench's report: results.json, report.md and bench.png from the two sides' documents.

The figures come from fasttune/side_by_side/analysis.py (torch-free); this module writes them down, each
file atomically. matplotlib is imported only to draw ``bench.png``, rich only by ``render_table``.
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fasttune.atomic_io import atomic_file, atomic_write_text
from fasttune.side_by_side.analysis import (
    MAY_DIFFER,
    PERCENTILE_METHOD,
    SETTINGS_THAT_MUST_MATCH,
    SIDE_LABELS,
    check_equal_settings,
    loss_agreement,
    ratios,
    summarize,
    targets,
)
from fasttune.report import _cell, _code, _duration, _fenced

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PLOT_FILE = "bench.png"


# -- writing --


def write_results(out_dir: Path, fasttune: dict[str, Any], vanilla: dict[str, Any], command: str) -> dict[str, Any]:
    """Check, analyse and write ``results.json``, ``bench.png`` and ``report.md`` into ``out_dir``.

    Raises :class:`UserError` (via :func:`check_equal_settings`) before writing anything when the
    sides' settings differ, and ValueError when a side has no timed step or the wrong ``side``
    label. Each file is replaced atomically. ``results.json`` holds ``fasttune`` and ``vanilla``
    (each side document with its :func:`summarize` result under ``"summary"``), ``ratios``,
    ``loss_agreement``, ``targets``, ``device``, ``device_is_cuda``, ``command`` and ``created``
    (UTC, ISO 8601); non-finite numbers are written as null. Returns that dict. Prints nothing.
    """
    for expected, side in (("fasttune", fasttune), ("vanilla", vanilla)):
        if side.get("side") != expected:
            raise ValueError(f"expected the {expected} side document, got side={side.get('side')!r}")
    check_equal_settings(fasttune, vanilla)
    summaries = {"fasttune": summarize(fasttune), "vanilla": summarize(vanilla)}
    device_is_cuda = all(s.get("peak_gpu_alloc_gib") is not None for s in (fasttune, vanilla))
    found = ratios(summaries["fasttune"], summaries["vanilla"])
    results = {
        "fasttune": {**fasttune, "summary": summaries["fasttune"]},
        "vanilla": {**vanilla, "summary": summaries["vanilla"]},
        "ratios": found,
        "loss_agreement": loss_agreement(fasttune, vanilla),
        "targets": targets(found, device_is_cuda),
        "device": fasttune.get("device"),
        "device_is_cuda": device_is_cuda,
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_bench(results, out_dir / PLOT_FILE)
    atomic_write_text(out_dir / REPORT_FILE, report_markdown(results))
    text = json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n"
    atomic_write_text(out_dir / RESULTS_FILE, text)
    return results


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


# -- report.md --


def report_markdown(results: dict[str, Any]) -> str:
    """The text of ``report.md``: a table to paste into an issue, then targets, loss agreement,
    settings, environment and the command."""
    model = (results["fasttune"].get("settings") or {}).get("model", "")
    sections = [
        f"# fasttune bench: {model}" if model else "# fasttune bench",
        _device_line(results),
        _comparison(results),
        _targets_section(results["targets"]),
        _loss_section(results["loss_agreement"]),
        _settings_section(results["fasttune"], results["vanilla"]),
        _environment(results["fasttune"], results["vanilla"]),
        "## Command\n\n" + _fenced(results["command"]),
        f"![trained tokens/s, peak memory and loss by step]({PLOT_FILE})",
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _device_label(results: dict[str, Any]) -> str:
    """``GPU: <name>``, ``CPU: <name>``, or ``CPU`` when the side names it just ``cpu``."""
    device = str(results.get("device") or "").strip()
    if results["device_is_cuda"]:
        return f"GPU: {device or 'CUDA device'}"
    return f"CPU: {device}" if device and device.lower() != "cpu" else "CPU"


def _device_line(results: dict[str, Any]) -> str:
    line = f"Measured on {_cell(_device_label(results))}."
    if not results["device_is_cuda"]:
        line += " CPU figures do not predict GPU speed; the GPU targets need a run on a CUDA device."
    return line


def _comparison(results: dict[str, Any]) -> str:
    f, v = results["fasttune"]["summary"], results["vanilla"]["summary"]
    r = results["ratios"]
    rows = [
        ("trained tokens/s", _rate(f["trained_tokens_per_s"]), _rate(v["trained_tokens_per_s"]),
         _times(r["trained_tokens_per_s"])),
        ("total tokens/s (padding included)", _rate(f["total_tokens_per_s"]), _rate(v["total_tokens_per_s"]),
         _times(r["total_tokens_per_s"])),
        ("padding", _percent(f["padding_fraction"]), _percent(v["padding_fraction"]), ""),
        ("step time p50 / p90", _step_times(f), _step_times(v), ""),
        ("optimizer steps", _steps(f), _steps(v), ""),
        ("trained tokens (all steps)", f"{f['trained_tokens_all_steps']:,}", f"{v['trained_tokens_all_steps']:,}", ""),
    ]
    memory = [("peak GPU memory allocated", "peak_gpu_alloc_gib", "peak_gpu_alloc"),
              ("peak GPU memory reserved", "peak_gpu_reserved_gib", "peak_gpu_reserved")] if results["device_is_cuda"] else []
    memory.append(("peak RSS (process)", "peak_rss_gib", "peak_rss"))
    rows += [(label, _gib(f.get(key)), _gib(v.get(key)), _times(r.get(ratio))) for label, key, ratio in memory]
    rows += [
        ("eval loss", _maybe(f.get("eval_loss")), _maybe(v.get("eval_loss")), ""),
        ("train time", _seconds(f.get("train_s")), _seconds(v.get("train_s")),
         _times(r["train_time_speedup"], "faster")),
        ("backend", _backend(results["fasttune"]), _backend(results["vanilla"]), ""),
        ("attention", _maybe(results["fasttune"].get("attention")), _maybe(results["vanilla"].get("attention")), ""),
    ]
    lines = [f"| | {SIDE_LABELS['fasttune']} | {SIDE_LABELS['vanilla']} | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {label} | {a} | {b} | {ratio} |" for label, a, b, ratio in rows]
    note = (f"Speed figures skip each side's warm-up steps; step-time percentiles are {PERCENTILE_METHOD}. "
            "Ratio: fasttune / vanilla for tokens/s (above 1: faster) and memory (below 1: less); "
            "vanilla / fasttune for train time (above 1: faster).")
    return "\n".join(["## Speed and memory", "", *lines, "", note])


def _targets_section(found: list[dict[str, Any]]) -> str:
    lines = ["## Targets", "", "| target | measured | result |", "|---|---:|---|"]
    for target in found:
        result = "met" if target["met"] else "**MISSED**"
        lines.append(f"| {_cell(target['target'])} | {_times(target['measured']) or 'not measured'} | {result} |")
    return "\n".join(lines)


def _loss_section(agreement: dict[str, Any]) -> str:
    diff = agreement["max_rel_diff"]
    result = "agree" if agreement["ok"] else "**DISAGREE**"
    return "\n".join([
        "## Loss agreement", "",
        f"- mode: {agreement['mode']} ({_cell(agreement['detail'])})",
        f"- largest relative difference: {'not measured' if diff is None else f'{diff:.3g}'}",
        f"- tolerance: {agreement['tolerance']:g}",
        f"- result: {result}",
    ])


def _settings_section(fasttune: dict[str, Any], vanilla: dict[str, Any]) -> str:
    f, v = fasttune.get("settings") or {}, vanilla.get("settings") or {}
    others = sorted(f.keys() - set(SETTINGS_THAT_MUST_MATCH) - set(MAY_DIFFER))
    shared = [key for key in (*SETTINGS_THAT_MUST_MATCH, *others) if key in f]
    lines = ["## Settings", "", "Shared by both sides:", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {_setting(key, f[key])} |" for key in shared]
    lines += ["", "Per side:", "", f"| | {SIDE_LABELS['fasttune']} | {SIDE_LABELS['vanilla']} |", "|---|---|---|"]
    for key in MAY_DIFFER:
        lines.append(f"| {key} | {_setting(key, f.get(key))} | {_setting(key, v.get(key))} |")
    lines.append(f"| warm-up steps not timed | {fasttune.get('warmup', 0)} | {vanilla.get('warmup', 0)} |")
    return "\n".join(lines)


def _environment(fasttune: dict[str, Any], vanilla: dict[str, Any]) -> str:
    rows = [("device", _maybe(fasttune.get("device")))]
    sides = (fasttune, vanilla)
    if fasttune.get("versions") == vanilla.get("versions"):
        rows.append(("versions", _versions(fasttune.get("versions"))))
    else:
        rows += [(f"versions ({SIDE_LABELS[side['side']]})", _versions(side.get("versions"))) for side in sides]
    rows += [(f"backend choice ({SIDE_LABELS[side['side']]})", _maybe(side.get("backend_reason"))) for side in sides]
    lines = ["## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {label} | {value} |" for label, value in rows if value]
    return "\n".join(lines)


# -- cell formatting (numbers through fasttune.report's helpers) --


def _rate(value: float) -> str:
    return f"{value:,.0f}"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} GiB"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else _duration(value)


def _times(ratio: float | None, suffix: str = "") -> str:
    if ratio is None:
        return ""
    return f"{ratio:.2f}x" + (f" {suffix}" if suffix else "")


def _maybe(value: Any) -> str:
    return "n/a" if value is None or value == "" else _cell(value)


def _step_times(summary: dict[str, Any]) -> str:
    return f"{summary['step_time_p50_s']:.3g} s / {summary['step_time_p90_s']:.3g} s"


def _steps(summary: dict[str, Any]) -> str:
    return f"{summary['steps']} ({summary['timed_steps']} timed)"


def _backend(side: dict[str, Any]) -> str:
    backend = _maybe(side.get("backend"))
    return f"{backend} (fast path: {_cell(side['fast_path'])})" if side.get("fast_path") else backend


def _setting(key: str, value: Any) -> str:
    if key == "model" and value:
        return _code(value) or ""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):  # a seed or a length, not a quantity: no thousands separator
        return str(value)
    if isinstance(value, list):
        return _cell(", ".join(map(str, value)))
    if isinstance(value, dict):
        return _cell(json.dumps(value, sort_keys=True))
    return _maybe(value)


def _versions(versions: dict[str, str] | None) -> str:
    return _cell(", ".join(f"{name} {v}" for name, v in versions.items())) if versions else ""


# -- bench.png --


def plot_bench(results: dict[str, Any], png_path: Path) -> Path:
    """Draw trained tokens/s, peak memory (GPU allocated on CUDA, else RSS) and both sides'
    training loss by optimizer step into ``png_path``, atomically; return the path."""
    # The Agg canvas on a bare Figure, as fasttune.report.plot_loss: no pyplot global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    speed, memory, loss = fig.subplots(1, 3, width_ratios=[1, 1, 2])
    summaries = [results[side]["summary"] for side in SIDE_LABELS]
    ratio = results["ratios"]["trained_tokens_per_s"]
    _bars(speed, [s["trained_tokens_per_s"] for s in summaries], "{:,.0f}",
          f"trained tokens/s ({_times(ratio) or 'n/a'})", "tokens/s")
    key, what, ratio_key = (("peak_gpu_alloc_gib", "peak GPU memory allocated", "peak_gpu_alloc")
                            if results["device_is_cuda"] else ("peak_rss_gib", "peak RSS", "peak_rss"))
    _bars(memory, [s.get(key) for s in summaries], "{:.2f}",
          f"{what} ({_times(results['ratios'].get(ratio_key)) or 'n/a'})", "GiB")
    _loss_panel(loss, results)
    path = Path(png_path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _bars(ax, values: list[float | None], fmt: str, title: str, unit: str) -> None:
    heights = [0.0 if value is None else value for value in values]
    bars = ax.bar(list(SIDE_LABELS.values()), heights, color=["C0", "C1"])
    ax.bar_label(bars, labels=["n/a" if value is None else fmt.format(value) for value in values])
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(unit)
    ax.margins(y=0.15)


def _loss_panel(ax, results: dict[str, Any]) -> None:
    # Vanilla dashed on top: where the two sides agree, both lines stay visible.
    for color, style, side in zip(("C0", "C1"), ("-", "--"), SIDE_LABELS):
        losses = results[side]["losses"]
        ax.plot(range(1, len(losses) + 1), losses, style, color=color, linewidth=1.2, label=SIDE_LABELS[side])
    packed = bool((results["fasttune"].get("settings") or {}).get("packing"))
    note = "x = step index: a packed fasttune step holds more examples" if packed else "x = step index: same batches"
    ax.set_title(f"training loss by optimizer step\n({note})", fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()


# -- terminal --


def render_table(results: dict[str, Any]):
    """A short rich Table for the CLI to print last: trained tokens/s, peak memory, train time and
    loss agreement per side, their ratios, and each target met or MISSED."""
    from rich.markup import escape
    from rich.table import Table

    f, v = results["fasttune"]["summary"], results["vanilla"]["summary"]
    r = results["ratios"]
    by_ratio = {target["ratio"]: target for target in results["targets"]}
    memory = [("peak GPU memory allocated", "peak_gpu_alloc_gib", "peak_gpu_alloc")] if results["device_is_cuda"] else []
    memory.append(("peak RSS", "peak_rss_gib", "peak_rss"))
    table = Table(title=f"fasttune bench, {escape(_device_label(results))}", title_justify="left")
    table.add_column("")
    for name in (*SIDE_LABELS.values(), "ratio"):
        table.add_column(name, justify="right")
    table.add_column("target")
    rows = [("trained tokens/s", _rate(f["trained_tokens_per_s"]), _rate(v["trained_tokens_per_s"]), "trained_tokens_per_s")]
    rows += [(label, _gib(f.get(key)), _gib(v.get(key)), ratio) for label, key, ratio in memory]
    rows.append(("train time", _seconds(f.get("train_s")), _seconds(v.get("train_s")), "train_time_speedup"))
    for label, a, b, ratio in rows:
        table.add_row(label, a, b, _times(r.get(ratio)), _target_cell(by_ratio.get(ratio)))
    agreement = results["loss_agreement"]
    diff = agreement["max_rel_diff"]
    verdict = "[green]agree[/]" if agreement["ok"] else "[bold red]DISAGREE[/]"
    table.add_row(f"loss agreement ({agreement['mode']})", "", "", "n/a" if diff is None else f"{diff:.2g}",
                  f"<= {agreement['tolerance']:g} {verdict}")
    return table


def _target_cell(target: dict[str, Any] | None) -> str:
    if target is None:
        return ""
    verdict = "[green]met[/]" if target["met"] else "[bold red]MISSED[/]"
    return f"{target['sense']} {target['threshold']:g}x {verdict}"
