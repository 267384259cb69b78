"""fasttune.side_by_side.analysis and .results: the bench's analysis and report, from hand-built side documents.

Pure Python plus matplotlib (for bench.png): no torch, no training.
"""
from __future__ import annotations

import copy
import io
import json
import math

import pytest
from rich.console import Console

from fasttune.side_by_side import analysis
from fasttune.side_by_side import results as bench
from fasttune.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # PNG spec, section 5.2 (https://www.w3.org/TR/png-3/)

# Six steps, the first two warm-up. Timed steps: 1+2+4+2 = 9 s for 900 trained, 1350 real and
# 1800 total tokens. The warm-up steps are slow and padding-free so that counting them would move
# every figure.
STEP_TIMES = [5.0, 3.0, 1.0, 2.0, 4.0, 2.0]
TRAINED = [500, 500, 100, 200, 300, 300]
REAL = [500, 500, 150, 300, 300, 600]
TOTAL = [500, 500, 200, 400, 400, 800]
LOSSES = [2.0, 1.9, 1.8, 1.7, 1.6, 1.5]


def _settings(**overrides) -> dict:
    settings = {
        "model": "tiny/llama", "max_length": 256, "lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0,
        "target_modules": ["k_proj", "q_proj", "v_proj"], "learning_rate": 2e-4, "lr_scheduler_type": "linear",
        "warmup_steps": 0.0, "seed": 3407, "quantization": None, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1, "gradient_checkpointing": False, "packing": False, "examples": 12,
        "dtype": "float32",
    }
    return {**settings, **overrides}


def _side(name: str, cuda: bool = False, **overrides) -> dict:
    """A side document; ``settings`` in ``overrides`` is merged into the defaults."""
    settings = _settings(**overrides.pop("settings", {}))
    side = {
        "side": name, "settings": settings, "backend": "hf", "backend_reason": "asked for hf",
        "fast_path": None, "attention": "sdpa", "device": "NVIDIA H100 80GB HBM3" if cuda else "cpu",
        "versions": {"torch": "2.9.0", "transformers": "5.1.0", "trl": "1.2.0", "peft": "0.18.0"},
        "warmup": 2, "step_times_s": list(STEP_TIMES), "trained_tokens": list(TRAINED), "real_tokens": list(REAL),
        "total_tokens": list(TOTAL), "losses": list(LOSSES), "eval_loss": 1.4,
        "peak_gpu_alloc_gib": 10.0 if cuda else None, "peak_gpu_reserved_gib": 12.0 if cuda else None,
        "peak_rss_gib": 3.0, "load_s": 4.0, "train_s": 17.0, "wall_s": 22.0,
    }
    return {**side, **overrides}


def _faster(side: dict, factor: float) -> dict:
    """``side`` with every step ``factor`` times faster (train time too)."""
    return {**side, "step_times_s": [t / factor for t in side["step_times_s"]], "train_s": side["train_s"] / factor}


# -- summarize --


def test_summarize_excludes_warmup():
    s = analysis.summarize(_side("vanilla"))
    assert s["timed_steps"] == 4 and s["steps"] == 6 and s["warmup"] == 2
    assert s["timed_s"] == pytest.approx(9.0)
    assert s["trained_tokens_per_s"] == pytest.approx(100.0)
    assert s["real_tokens_per_s"] == pytest.approx(150.0)
    assert s["total_tokens_per_s"] == pytest.approx(200.0)
    assert s["padding_fraction"] == pytest.approx(0.25)
    # nearest rank over sorted [1, 2, 2, 4]: p50 is rank 2, p90 is rank ceil(3.6) = 4
    assert (s["step_time_p50_s"], s["step_time_p90_s"]) == (2.0, 4.0)
    assert s["trained_tokens_all_steps"] == sum(TRAINED)
    assert (s["peak_rss_gib"], s["eval_loss"], s["train_s"]) == (3.0, 1.4, 17.0)


def test_percentile_nearest_rank():
    values = [float(v) for v in range(1, 11)]
    assert analysis.percentile(values, 50) == 5.0
    assert analysis.percentile(values, 90) == 9.0
    assert analysis.percentile([7.0], 90) == 7.0


def test_summarize_too_few_steps():
    side = _side("fasttune", step_times_s=[1.0, 1.0], trained_tokens=[1, 1], real_tokens=[1, 1],
                 total_tokens=[1, 1], losses=[1.0, 1.0])
    with pytest.raises(ValueError, match="--examples.*--warmup"):
        analysis.summarize(side)
    assert analysis.summarize({**side, "warmup": 1})["timed_steps"] == 1


def test_summarize_refuses_ragged_lists():
    with pytest.raises(ValueError, match="differ in length"):
        analysis.summarize(_side("fasttune", losses=[1.0]))


# -- check_equal_settings --


def test_settings_mismatch_names_every_key():
    fasttune = _side("fasttune", settings={"learning_rate": 1e-4, "lora_r": 16})
    with pytest.raises(UserError) as caught:
        analysis.check_equal_settings(fasttune, _side("vanilla"))
    wheres = [p.where for p in caught.value.problems]
    assert wheres == ["settings.lora_r", "settings.learning_rate"]
    text = caught.value.render()
    assert "would not be fair" in text and "0.0001" in text and "0.0002" in text and "16" in text


def test_settings_missing_key_and_device_are_refused():
    vanilla = _side("vanilla", device="another device")
    del vanilla["settings"]["seed"]
    with pytest.raises(UserError) as caught:
        analysis.check_equal_settings(_side("fasttune"), vanilla)
    assert {p.where for p in caught.value.problems} == {"settings.seed", "device"}


def test_settings_allow_what_only_fasttune_may_differ_in():
    packed = _side("fasttune", settings={"packing": True, "per_device_train_batch_size": 1,
                                         "gradient_accumulation_steps": 4, "gradient_checkpointing": True})
    analysis.check_equal_settings(packed, _side("vanilla"))  # no error
    target_order = _side("vanilla", settings={"target_modules": ["q_proj", "v_proj", "k_proj"]})
    analysis.check_equal_settings(_side("fasttune"), target_order)


def test_settings_batch_size_must_match_without_packing():
    unpacked = _side("fasttune", settings={"per_device_train_batch_size": 4})
    with pytest.raises(UserError) as caught:
        analysis.check_equal_settings(unpacked, _side("vanilla"))
    assert [p.where for p in caught.value.problems] == ["settings.per_device_train_batch_size"]
    with pytest.raises(UserError, match="does not pack"):
        analysis.check_equal_settings(_side("fasttune"), _side("vanilla", settings={"packing": True}))


# -- loss_agreement --


def test_loss_agreement_same_batches():
    f, v = _side("fasttune"), _side("vanilla")
    same = analysis.loss_agreement({**f, "losses": [x * (1 + 1e-5) for x in LOSSES]}, v)
    assert same["mode"] == "same batches" and same["ok"]
    assert same["tolerance"] == analysis.SAME_BATCH_LOSS_RTOL and same["steps_compared"] == 6
    assert same["max_rel_diff"] == pytest.approx(1e-5)
    drift = analysis.loss_agreement({**f, "losses": [x * 1.10 for x in LOSSES]}, v)
    assert not drift["ok"] and drift["max_rel_diff"] == pytest.approx(0.10)


def test_loss_agreement_tolerance_follows_backends():
    f = {**_side("fasttune"), "backend": "unsloth", "losses": [x * 1.02 for x in LOSSES]}
    across = analysis.loss_agreement(f, _side("vanilla"))
    assert across["tolerance"] == analysis.SAME_BATCH_LOSS_RTOL_ACROSS_BACKENDS and across["ok"]
    assert not analysis.loss_agreement({**f, "losses": [x * 1.10 for x in LOSSES]}, _side("vanilla"))["ok"]


def test_loss_agreement_refuses_different_tokens_or_steps():
    f, v = _side("fasttune"), _side("vanilla")
    masked = analysis.loss_agreement({**f, "trained_tokens": [t + 1 for t in TRAINED]}, v)
    assert not masked["ok"] and "mask" in masked["detail"]
    shorter = analysis.loss_agreement({**f, "losses": LOSSES[:5]}, v)
    assert not shorter["ok"] and shorter["steps_compared"] == 5


def test_loss_agreement_packed_uses_eval_loss():
    packed = _side("fasttune", settings={"packing": True}, losses=[9.0, 9.0], eval_loss=1.45)
    result = analysis.loss_agreement(packed, _side("vanilla", eval_loss=1.40))
    assert result["mode"] == "eval loss" and result["tolerance"] == analysis.PACKED_EVAL_LOSS_RTOL
    assert result["max_rel_diff"] == pytest.approx(0.05 / 1.40) and result["ok"]
    assert not analysis.loss_agreement({**packed, "eval_loss": 1.60}, _side("vanilla"))["ok"]
    missing = analysis.loss_agreement({**packed, "eval_loss": None}, _side("vanilla"))
    assert not missing["ok"] and missing["max_rel_diff"] is None


# -- ratios and targets --


def test_ratios():
    f = analysis.summarize(_faster(_side("fasttune", peak_rss_gib=1.5), 2.0))
    v = analysis.summarize(_side("vanilla"))
    r = analysis.ratios(f, v)
    assert r["trained_tokens_per_s"] == pytest.approx(2.0) and r["total_tokens_per_s"] == pytest.approx(2.0)
    assert r["train_time_speedup"] == pytest.approx(2.0)
    assert r["peak_rss"] == pytest.approx(0.5)
    assert r["peak_gpu_alloc"] is None and r["peak_gpu_reserved"] is None
    gpu = analysis.ratios(analysis.summarize(_side("fasttune", cuda=True, peak_gpu_alloc_gib=4.0)),
                       analysis.summarize(_side("vanilla", cuda=True)))
    assert gpu["peak_gpu_alloc"] == pytest.approx(0.4) and gpu["peak_gpu_reserved"] == pytest.approx(1.0)


def test_targets_cpu_met_and_missed():
    met = analysis.targets({"trained_tokens_per_s": 1.6, "peak_rss": 1.01}, device_is_cuda=False)
    assert [t["met"] for t in met] == [True, True] and all(t["target"].startswith("CPU") for t in met)
    assert met[0]["measured"] == 1.6
    missed = analysis.targets({"trained_tokens_per_s": 1.4, "peak_rss": 1.05}, device_is_cuda=False)
    assert [t["met"] for t in missed] == [False, False]


def test_targets_gpu_met_and_missed():
    met = analysis.targets({"trained_tokens_per_s": 2.1, "peak_gpu_alloc": 0.5}, device_is_cuda=True)
    assert [t["met"] for t in met] == [True, True] and all(t["target"].startswith("GPU") for t in met)
    missed = analysis.targets({"trained_tokens_per_s": 1.9, "peak_gpu_alloc": None}, device_is_cuda=True)
    assert [t["met"] for t in missed] == [False, False] and missed[1]["measured"] is None


# -- write_results --


SUMMARY_KEYS = {"trained_tokens_per_s", "total_tokens_per_s", "real_tokens_per_s", "step_time_p50_s",
                "step_time_p90_s", "padding_fraction", "timed_steps", "peak_gpu_alloc_gib",
                "peak_gpu_reserved_gib", "peak_rss_gib", "eval_loss"}


def test_write_results_cpu(tmp_path):
    fasttune = _faster(_side("fasttune", peak_rss_gib=3.3), 1.2)  # 1.2x: both CPU targets missed
    vanilla = _side("vanilla")
    originals = copy.deepcopy((fasttune, vanilla))
    out = tmp_path / "bench"
    returned = bench.write_results(out, fasttune, vanilla, "python -m fasttune bench tiny --cpu")
    assert (fasttune, vanilla) == originals  # inputs untouched
    assert sorted(p.name for p in out.iterdir()) == ["bench.png", "report.md", "results.json"]  # no temporaries

    written = json.loads((out / "results.json").read_text())
    for name, side in (("fasttune", fasttune), ("vanilla", vanilla)):
        assert set(side) <= set(written[name]) and SUMMARY_KEYS <= set(written[name]["summary"])
    assert set(written["ratios"]) == {"trained_tokens_per_s", "total_tokens_per_s", "train_time_speedup",
                                      "peak_gpu_alloc", "peak_gpu_reserved", "peak_rss"}
    assert set(written["loss_agreement"]) >= {"mode", "max_rel_diff", "tolerance", "ok"}
    assert [t["met"] for t in written["targets"]] == [False, False]
    assert written["command"] == "python -m fasttune bench tiny --cpu" and written["created"]
    assert written["device_is_cuda"] is False
    assert written["ratios"] == pytest.approx(returned["ratios"])

    report = (out / "report.md").read_text()
    for row in ("| trained tokens/s |", "| total tokens/s (padding included) |", "| padding |",
                "| step time p50 / p90 |", "| peak RSS (process) |", "| eval loss |", "| train time |",
                "| backend |", "## Targets", "## Loss agreement", "## Settings", "## Command", "Measured on CPU"):
        assert row in report, row
    assert "**MISSED**" in report and "1.20x" in report and "peak GPU memory" not in report
    assert "| learning_rate | 0.0002 |" in report and "bench.png" in report

    png = (out / "bench.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


def test_write_results_gpu_packed(tmp_path):
    fasttune = _side("fasttune", cuda=True, backend="unsloth", fast_path="28 QKV, 28 O, 28 MLP",
                     settings={"packing": True, "per_device_train_batch_size": 1},
                     peak_gpu_alloc_gib=4.0, eval_loss=1.41)
    fasttune = _faster(fasttune, 2.5)
    results = bench.write_results(tmp_path, fasttune, _side("vanilla", cuda=True), "python -m fasttune bench tiny")
    assert [t["met"] for t in results["targets"]] == [True, True]
    assert results["loss_agreement"]["mode"] == "eval loss" and results["loss_agreement"]["ok"]
    report = (tmp_path / "report.md").read_text()
    assert "MISSED" not in report and "Measured on GPU: NVIDIA H100 80GB HBM3" in report
    assert "| peak GPU memory allocated |" in report and "| peak GPU memory reserved |" in report
    assert "unsloth (fast path: 28 QKV, 28 O, 28 MLP)" in report
    assert (tmp_path / "bench.png").read_bytes().startswith(PNG_SIGNATURE)

    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(bench.render_table(results))
    shown = console.file.getvalue()
    assert "trained tokens/s" in shown and "2.50x" in shown and "met" in shown and "MISSED" not in shown


def test_write_results_refuses_unfair_sides_before_writing(tmp_path):
    with pytest.raises(UserError):
        bench.write_results(tmp_path / "out", _side("fasttune", settings={"seed": 1}), _side("vanilla"), "cmd")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="side"):
        bench.write_results(tmp_path / "out", _side("vanilla"), _side("vanilla"), "cmd")


def test_non_finite_losses_write_valid_json(tmp_path):
    broken = _side("fasttune", losses=[*LOSSES[:-1], math.nan])
    results = bench.write_results(tmp_path, broken, _side("vanilla"), "cmd")
    assert not results["loss_agreement"]["ok"]
    written = json.loads((tmp_path / "results.json").read_text())  # strict JSON: NaN written as null
    assert written["fasttune"]["losses"][-1] is None and written["loss_agreement"]["max_rel_diff"] is None
    assert "DISAGREE" in (tmp_path / "report.md").read_text()
