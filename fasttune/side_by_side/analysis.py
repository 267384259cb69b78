"""What ``python -m fasttune bench`` concludes from its two sides: the figures, before any report.

Each side (``"fasttune"``: the recipe as fasttune runs it; ``"vanilla"``: transformers +
bitsandbytes + PEFT + TRL's SFTTrainer with its default data handling, no packing) runs in its own
process and writes one side document (a dict: settings, per-step times, token counts and losses,
peak memory; fasttune/side_by_side/side.py writes it). Everything here works from those two dicts:
torch-free, so a result can be re-analysed on any machine. fasttune/side_by_side/results.py writes the
report from what this computes.

Speed figures skip the side's first ``warmup`` optimizer steps (compilation, allocator growth,
cache warm-up). Step-time percentiles use the nearest-rank method (no interpolation: every
percentile reported is a step time that was measured).
"""
from __future__ import annotations

import math
from typing import Any

from fasttune.errors import Problem, UserError
from fasttune.report import _is_number, _number

SIDE_LABELS = {"fasttune": "fasttune", "vanilla": "vanilla PEFT"}

# Settings that decide how much work a step is and where training ends up: if any differs, the
# two sides did not do the same training and the comparison would not be fair.
SETTINGS_THAT_MUST_MATCH = (
    "model", "max_length", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate",
    "lr_scheduler_type", "warmup_steps", "seed", "quantization", "dtype", "examples",
)
# Where the fasttune side may differ, because the difference is what fasttune brings: packing (the
# vanilla side never packs), the batch shape that goes with packed rows (only when it packs), and
# its gradient-checkpointing style (Unsloth's offloaded checkpointing or none).
BATCH_SETTINGS = ("per_device_train_batch_size", "gradient_accumulation_steps")
MAY_DIFFER = ("packing", *BATCH_SETTINGS, "gradient_checkpointing")

# Per-step lists of a side document: one entry per optimizer step each.
STEP_LISTS = ("step_times_s", "trained_tokens", "real_tokens", "total_tokens", "losses")
PERCENTILE_METHOD = "nearest-rank"

# Same batches (neither side packs): both sides see identical batches in identical order from the
# same seed, so their per-step training losses must agree up to floating-point noise.
# - Same backend (fasttune on its hf backend: transformers + PEFT, like the vanilla side): identical
#   pipelines in float32 on a CPU agree to about 1e-5 (only summation order differs). 1e-3 is 100x
#   that, and still catches a real difference (another loss mask, learning rate or dropout stream
#   shows up as percent, not 0.1%). On a GPU in bf16, reductions are not deterministic and their
#   drift can compound over steps: a same-backend miss there is worth a look, not proof of a bug.
SAME_BATCH_LOSS_RTOL = 1e-3
# - Different backends (Unsloth's fused kernels against PEFT's modules, bf16 on a GPU): the two
#   compute the same function in a different order and precision; their per-step losses are
#   expected to differ by around 2e-2, and the gap can grow over steps, so 5e-2: more than twice
#   that, and still half of a 10% drift.
SAME_BATCH_LOSS_RTOL_ACROSS_BACKENDS = 5e-2
# Packed (the fasttune side packs): batches hold different examples and there are fewer steps, so
# per-step losses are not comparable. The evaluation loss on the fixed held-out set after one pass
# over the same examples is: batch composition changes the path, not where one pass ends up.
# Seed-to-seed spread of a short LoRA run's eval loss is a few percent; 5% allows that and still
# fails a packing bug that leaks attention across examples or drops tokens.
PACKED_EVAL_LOSS_RTOL = 0.05

# The project's stated targets, as fasttune / vanilla ratios.
CPU_SPEED_TARGET = 1.5  # trained tokens/s on a CPU
CPU_RSS_TARGET = 1.0  # peak resident memory on a CPU: no higher than vanilla ...
# ... plus 2%: RSS peaks move by a percent or two run to run with glibc arena and allocator
# caching, which is noise, not a regression.
RSS_NOISE_ALLOWANCE = 0.02
GPU_SPEED_TARGET = 2.0  # trained tokens/s on a CUDA GPU
GPU_ALLOC_TARGET = 0.5  # peak torch-allocated GPU memory on a CUDA GPU


# -- checks --


def check_equal_settings(fasttune: dict[str, Any], vanilla: dict[str, Any]) -> None:
    """Raise :class:`UserError` listing every setting that makes the two sides' work differ.

    Every key of ``SETTINGS_THAT_MUST_MATCH`` must be present and equal on both sides, as must any
    other setting a side records, except ``MAY_DIFFER``: the fasttune side may pack (the vanilla
    side may not), may use another batch size and gradient accumulation when it packs, and may
    checkpoint gradients its own way. Both sides must also have run on the same device.
    """
    f, v = fasttune.get("settings") or {}, vanilla.get("settings") or {}
    problems = []
    others = sorted((f.keys() | v.keys()) - set(SETTINGS_THAT_MUST_MATCH) - set(MAY_DIFFER))
    for key in (*SETTINGS_THAT_MUST_MATCH, *others):
        if not _same_setting(f, v, key):
            problems.append(_mismatch(key, f, v, "both sides must train with the same value"))
    if v.get("packing"):
        problems.append(Problem("settings.packing (vanilla side)", True,
                                "the vanilla side is TRL's default data handling, which does not pack",
                                "run the vanilla side with packing off"))
    if not f.get("packing"):
        for key in BATCH_SETTINGS:
            if not _same_setting(f, v, key):
                problems.append(_mismatch(key, f, v, "without packing both sides must feed the same batches"))
    if fasttune.get("device") != vanilla.get("device"):
        problems.append(Problem("device", {"fasttune": fasttune.get("device"), "vanilla": vanilla.get("device")},
                                "both sides must run on the same device",
                                "run both sides on the same machine and device"))
    if problems:
        raise UserError(problems, title="the comparison would not be fair")


def _same_setting(f: dict[str, Any], v: dict[str, Any], key: str) -> bool:
    if key not in f or key not in v:
        return False
    a, b = f[key], v[key]
    if isinstance(a, list) and isinstance(b, list):  # target_modules: order carries no meaning
        return sorted(a, key=str) == sorted(b, key=str)
    return a == b


def _mismatch(key: str, f: dict[str, Any], v: dict[str, Any], rule: str) -> Problem:
    shown = {side: settings.get(key, "(missing)") for side, settings in (("fasttune", f), ("vanilla", v))}
    return Problem(f"settings.{key}", shown, f"{rule}, or the comparison would not be fair",
                   f"give both sides the same {key}: the vanilla side must copy the recipe's value, "
                   "not fall back to its own default")


# -- analysis --


def summarize(side: dict[str, Any]) -> dict[str, Any]:
    """Speed, padding and memory of one side, over its optimizer steps after ``warmup``.

    Returns ``steps``, ``warmup``, ``timed_steps``, ``timed_s``, ``trained_tokens_per_s`` (tokens
    with a label, summed over the timed steps, over their summed wall time), ``real_tokens_per_s``
    (non-padding), ``total_tokens_per_s`` (every position fed, padding included),
    ``step_time_p50_s`` and ``step_time_p90_s`` (nearest-rank), ``padding_fraction`` (1 - real /
    total over the timed steps), ``trained_tokens_all_steps`` (warm-up included: the work done),
    and, carried over, ``peak_gpu_alloc_gib``, ``peak_gpu_reserved_gib``, ``peak_rss_gib``,
    ``eval_loss``, ``load_s``, ``train_s`` and ``wall_s``.

    Raises ValueError when the per-step lists differ in length, or when no step is left after
    the warm-up.
    """
    name = side.get("side", "?")
    lengths = {key: len(side[key]) for key in STEP_LISTS}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"the {name} side's per-step lists differ in length ({lengths}); "
                         "each must hold one entry per optimizer step")
    steps, warmup = lengths["step_times_s"], int(side.get("warmup", 0))
    if warmup < 0:
        raise ValueError(f"the {name} side's warmup is {warmup}; it must be 0 or more steps")
    if steps < warmup + 1:
        raise ValueError(f"the {name} side recorded {steps} optimizer step(s) and the first {warmup} are warm-up, "
                         "so no step is left to time: raise --examples or --steps, or lower --warmup")
    timed = {key: side[key][warmup:] for key in STEP_LISTS}
    seconds = math.fsum(timed["step_times_s"])
    total = sum(timed["total_tokens"])
    if seconds <= 0 or total <= 0:
        raise ValueError(f"the {name} side's timed steps took {seconds} s for {total} tokens: "
                         "both must be positive")
    real = sum(timed["real_tokens"])
    return {
        "steps": steps,
        "warmup": warmup,
        "timed_steps": steps - warmup,
        "timed_s": seconds,
        "trained_tokens_per_s": sum(timed["trained_tokens"]) / seconds,
        "real_tokens_per_s": real / seconds,
        "total_tokens_per_s": total / seconds,
        "step_time_p50_s": percentile(timed["step_times_s"], 50),
        "step_time_p90_s": percentile(timed["step_times_s"], 90),
        "percentile_method": PERCENTILE_METHOD,
        "padding_fraction": 1.0 - real / total,
        "trained_tokens_all_steps": sum(side["trained_tokens"]),
        **{key: side.get(key) for key in ("peak_gpu_alloc_gib", "peak_gpu_reserved_gib", "peak_rss_gib",
                                           "eval_loss", "load_s", "train_s", "wall_s")},
    }


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile: the smallest value with at least p% of ``values`` at or below it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def ratios(f: dict[str, Any], v: dict[str, Any]) -> dict[str, float | None]:
    """fasttune against vanilla, from two :func:`summarize` results.

    ``trained_tokens_per_s`` and ``total_tokens_per_s``: fasttune / vanilla (above 1: faster).
    ``train_time_speedup``: vanilla / fasttune wall train time (above 1: faster).
    ``peak_gpu_alloc``, ``peak_gpu_reserved``, ``peak_rss``: fasttune / vanilla (below 1: less
    memory). A ratio is ``None`` where either side lacks the figure (GPU memory on a CPU run).
    """
    return {
        "trained_tokens_per_s": _ratio(f.get("trained_tokens_per_s"), v.get("trained_tokens_per_s")),
        "total_tokens_per_s": _ratio(f.get("total_tokens_per_s"), v.get("total_tokens_per_s")),
        "train_time_speedup": _ratio(v.get("train_s"), f.get("train_s")),
        "peak_gpu_alloc": _ratio(f.get("peak_gpu_alloc_gib"), v.get("peak_gpu_alloc_gib")),
        "peak_gpu_reserved": _ratio(f.get("peak_gpu_reserved_gib"), v.get("peak_gpu_reserved_gib")),
        "peak_rss": _ratio(f.get("peak_rss_gib"), v.get("peak_rss_gib")),
    }


def _ratio(top: float | None, bottom: float | None) -> float | None:
    if not _is_number(top) or not _is_number(bottom) or bottom == 0:
        return None
    return top / bottom


def loss_agreement(f: dict[str, Any], v: dict[str, Any]) -> dict[str, Any]:
    """Whether the two side documents trained the same model, judged from their losses.

    When neither side packs (mode ``"same batches"``), step *i* of both sides saw the same batch:
    the per-step training losses must agree within ``SAME_BATCH_LOSS_RTOL`` (same backend) or
    ``SAME_BATCH_LOSS_RTOL_ACROSS_BACKENDS`` (one side on Unsloth); the sides must also have the
    same number of steps and the same trained tokens per step, or the losses are averages over
    different tokens. When the fasttune side packs (mode ``"eval loss"``), the evaluation losses
    after training must agree within ``PACKED_EVAL_LOSS_RTOL``.

    Differences are relative to the vanilla side: ``|fasttune - vanilla| / |vanilla|``. Returns
    ``{"mode", "max_rel_diff" (None when nothing could be compared), "tolerance", "ok",
    "steps_compared" (None in eval-loss mode), "detail" (one sentence for the report)}``.
    """
    if (f.get("settings") or {}).get("packing") or (v.get("settings") or {}).get("packing"):
        return _eval_loss_agreement(f.get("eval_loss"), v.get("eval_loss"))
    across = _uses_unsloth(f) != _uses_unsloth(v)
    tolerance = SAME_BATCH_LOSS_RTOL_ACROSS_BACKENDS if across else SAME_BATCH_LOSS_RTOL
    which = "different backends" if across else "same backend"
    compared = min(len(f["losses"]), len(v["losses"]))
    diffs = [_rel_diff(a, b) for a, b in zip(f["losses"], v["losses"])]
    worst = max(diffs) if diffs else None
    ok = worst is not None and worst <= tolerance
    detail = f"per-step training loss on the same batches, {compared} steps ({which})"
    if len(f["losses"]) != len(v["losses"]):
        ok = False
        detail += f"; but the sides ran {len(f['losses'])} and {len(v['losses'])} steps, so their batches differ"
    elif f["trained_tokens"] != v["trained_tokens"]:
        ok = False
        differing = sum(a != b for a, b in zip(f["trained_tokens"], v["trained_tokens"]))
        detail += (f"; but the trained tokens differ at {differing} step(s): the sides mask labels differently, "
                   "so their losses average over different tokens")
    return {"mode": "same batches", "max_rel_diff": worst, "tolerance": tolerance, "ok": ok,
            "steps_compared": compared, "detail": detail}


def _eval_loss_agreement(f_eval: float | None, v_eval: float | None) -> dict[str, Any]:
    result = {"mode": "eval loss", "max_rel_diff": None, "tolerance": PACKED_EVAL_LOSS_RTOL, "ok": False,
              "steps_compared": None}
    if not _is_number(f_eval) or not _is_number(v_eval):
        return {**result, "detail": "the fasttune side packs, so only the eval losses compare, and a side has none"}
    diff = _rel_diff(f_eval, v_eval)
    return {**result, "max_rel_diff": diff, "ok": diff <= PACKED_EVAL_LOSS_RTOL,
            "detail": f"the fasttune side packs, so the eval losses after training compare: "
                      f"{_number(f_eval)} against {_number(v_eval)}"}


def _uses_unsloth(side: dict[str, Any]) -> bool:
    # Any backend but Unsloth is transformers + PEFT modules, the vanilla side's own stack.
    return str(side.get("backend", "")).lower() == "unsloth"


def _rel_diff(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    if b == 0:
        return 0.0 if a == 0 else math.inf
    return abs(a - b) / abs(b)


def targets(ratios: dict[str, float | None], device_is_cuda: bool) -> list[dict[str, Any]]:
    """The project's stated targets for this device, each ``{"target", "measured", "met"}``.

    CPU: trained tokens/s at least ``CPU_SPEED_TARGET`` x vanilla, and peak RSS no higher
    (ratio at most ``CPU_RSS_TARGET + RSS_NOISE_ALLOWANCE``). CUDA: trained tokens/s at least
    ``GPU_SPEED_TARGET`` x vanilla, and peak allocated GPU memory at most ``GPU_ALLOC_TARGET`` x.
    Each dict also names the ``ratio`` it reads, its ``sense`` (``">="`` or ``"<="``) and its
    ``threshold``; a target whose ratio is missing is not met.
    """
    label = SIDE_LABELS["vanilla"]
    if device_is_cuda:
        wanted = [
            ("trained_tokens_per_s", ">=", GPU_SPEED_TARGET, f"GPU: trained tokens/s >= {GPU_SPEED_TARGET:g}x {label}"),
            ("peak_gpu_alloc", "<=", GPU_ALLOC_TARGET, f"GPU: peak GPU memory allocated <= {GPU_ALLOC_TARGET:g}x {label}"),
        ]
    else:
        rss_limit = CPU_RSS_TARGET + RSS_NOISE_ALLOWANCE
        wanted = [
            ("trained_tokens_per_s", ">=", CPU_SPEED_TARGET, f"CPU: trained tokens/s >= {CPU_SPEED_TARGET:g}x {label}"),
            ("peak_rss", "<=", rss_limit, f"CPU: peak RSS no higher than {label} "
                                          f"(<= {rss_limit:g}x: {RSS_NOISE_ALLOWANCE:.0%} allocator noise)"),
        ]
    found = []
    for key, sense, threshold, text in wanted:
        measured = ratios.get(key)
        met = measured is not None and (measured >= threshold if sense == ">=" else measured <= threshold)
        found.append({"target": text, "measured": measured, "met": met, "ratio": key, "sense": sense,
                      "threshold": threshold})
    return found


